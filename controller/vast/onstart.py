"""What a Vast.ai instance does at boot for us, and how the controller knows it is done.

Three facts of the service shape this module (sources in ``docs/launch.md``):

* ``running`` is reported when the container starts; the onstart script runs after that. What
  it installs (rsync) may not be there yet, so the controller waits for the marker the script
  writes last (:func:`wait_for_onstart`) before the first rsync.
* ``CONTAINER_ID`` / ``CONTAINER_API_KEY`` are set for the container's PID 1 and the onstart
  script, not for SSH sessions (docs.vast.ai, instances/docker-environment). The script hands
  them to the agent in a 0600 file (:func:`instance_env_file`); they are never printed, and the
  script itself names them only as ``$VARIABLES`` (it is stored in the create request).
* Images such as ``pytorch/pytorch`` put their Python on the image's ``PATH``
  (``/opt/conda/bin``), which SSH sessions do not inherit. The script records that ``PATH``
  (``IMAGE_PATH``) and :func:`find_python` looks there, in PID 1's environment, in known
  locations, then for ``python3``.
"""

from __future__ import annotations

import re
import shlex
import time
from typing import TYPE_CHECKING, Callable

from controller.errors import ProviderError, TransportError

if TYPE_CHECKING:
    from controller.hosts.base import Host

DEFAULT_VAST_URL = "https://console.vast.ai"
ONSTART_S = 900.0  # apt-get update + install on a slow mirror can take minutes
ONSTART_POLL_S = 3.0
# Where the image's Python may be when neither its PATH nor PID 1's says (conda images first).
KNOWN_PYTHONS = ("/opt/conda/bin/python3", "/opt/conda/bin/python", "/usr/local/bin/python3",
                 "/usr/bin/python3")
# What the agent needs from the interpreter before bootstrap: Python 3.10+ and the image's torch.
PYTHON_PROBE = "import sys, torch; assert sys.version_info >= (3, 10)"
SAFE_PATH = re.compile(r"/[A-Za-z0-9._+/-]{1,250}")


def instance_dir(remote_root: str) -> str:
    """Outside every run dir: nothing that ships or fetches a run dir can carry these files."""
    return f"{remote_root.rstrip('/')}/.instance"


def instance_env_file(remote_root: str) -> str:
    """The 0600 ``KEY=value`` file with the container variables the agent's watchdog needs."""
    return f"{instance_dir(remote_root)}/vast.env"


def onstart_marker(remote_root: str) -> str:
    return f"{instance_dir(remote_root)}/onstart.done"


def onstart_script(remote_root: str, vast_url: str | None = None) -> str:
    """The onstart script: rsync installed, the variables handed over, the marker written last.

    ``vast_url``: where the agent's self-stop goes when it is not Vast's own API (tests)."""
    d = shlex.quote(instance_dir(remote_root))
    env = shlex.quote(instance_env_file(remote_root))
    marker = shlex.quote(onstart_marker(remote_root))
    url = (vast_url or DEFAULT_VAST_URL).rstrip("/")
    lines = [
        f"mkdir -p {d} && chmod 700 {d}",
        f"rm -f {marker}",
        # Pytorch images may lack rsync (ship and fetch need it on both ends).
        "command -v rsync >/dev/null 2>&1 || (apt-get update -qq && "
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync openssh-client) "
        f">{d}/onstart.log 2>&1",
        # Written, never echoed: the per-instance key stays out of every log.
        f"(umask 077; {{ printf 'CONTAINER_ID=%s\\n' \"$CONTAINER_ID\"; "
        f"printf 'CONTAINER_API_KEY=%s\\n' \"$CONTAINER_API_KEY\"; "
        f"printf 'IMAGE_PATH=%s\\n' \"$PATH\"; "
        f"printf 'VAST_URL=%s\\n' {shlex.quote(url)}; }} > {env}.tmp && mv {env}.tmp {env})",
        f"date +%s > {marker}",
    ]
    return "\n".join(lines) + "\n"


def wait_for_onstart(host: "Host", remote_root: str, *, deadline_s: float = ONSTART_S,
                     poll_s: float = ONSTART_POLL_S,
                     clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> float:
    """Wait until the onstart marker exists; returns the seconds waited.

    Raises ProviderError after ``deadline_s`` (the caller destroys the instance and tries the
    next offer): an instance whose boot script never finished would fail the run later."""
    marker = shlex.quote(onstart_marker(remote_root))
    started = clock()
    while True:
        try:
            if host.run(f"test -f {marker}", timeout=30, check=False).ok:
                return clock() - started
        except TransportError:
            pass  # the container may restart its sshd while onstart runs: look again
        if clock() - started >= deadline_s:
            log = instance_dir(remote_root) + "/onstart.log"
            raise ProviderError(f"the instance's onstart script did not finish within "
                                f"{deadline_s:.0f} s (no {onstart_marker(remote_root)})",
                                hint=f"its output is in {log} on the instance")
        sleep(poll_s)


def _probe_script(remote_root: str, explicit: str | None) -> str:
    """Shell that prints ``OK <path>`` for the first candidate with the agent's needs, else
    one ``NO <path>`` line per candidate tried."""
    env = shlex.quote(instance_env_file(remote_root))
    probe = shlex.quote(PYTHON_PROBE)
    if explicit:
        candidates = shlex.quote(explicit)
    else:
        candidates = (
            f'$(p=$(sed -n "s/^IMAGE_PATH=//p" {env} 2>/dev/null); '
            "q=$(tr '\\0' '\\n' </proc/1/environ 2>/dev/null | sed -n 's/^PATH=//p'); "
            'for dir in $(printf "%s:%s" "$p" "$q" | tr ":" " "); do '
            'printf "%s/python3 %s/python " "$dir" "$dir"; done) '
            + " ".join(KNOWN_PYTHONS) + " $(command -v python3)")
    return (f"for py in {candidates}; do [ -x \"$py\" ] || continue; "
            f"if \"$py\" -c {probe} >/dev/null 2>&1; then echo \"OK $py\"; exit 0; fi; "
            "echo \"NO $py\"; done; exit 1")


def find_python(host: "Host", remote_root: str, explicit: str | None = None) -> str:
    """The interpreter the agent runs with: the image's own (see the module docstring).

    ``explicit``: the spec named one; it is only verified. Raises ProviderError naming every
    interpreter tried when none has Python 3.10+ with torch."""
    result = host.run(_probe_script(remote_root, explicit), timeout=120, check=False)
    lines = [line.strip() for line in (result.stdout or "").splitlines()]
    # What the instance prints is untrusted: only a plain absolute path is taken.
    found = [line[3:] for line in lines
             if line.startswith("OK ") and SAFE_PATH.fullmatch(line[3:])]
    if found:
        return found[0]
    tried = sorted({line[3:] for line in lines if line.startswith("NO ")})
    raise ProviderError(
        "no Python on the instance can run the agent (needs Python 3.10+ with torch); tried: "
        + (", ".join(tried) or "none found"),
        hint="use a CUDA PyTorch image (gpu.image), or name its interpreter in "
             "provider.remote_python")
