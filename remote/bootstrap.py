"""Bootstrap the trainer: ai-toolkit at a pinned commit in a cached venv, or tiny's imports.

For ai-toolkit the work is done once per instance and remembered by a done-marker holding the
repo and commit, so a second run skips all of it. An install that already exists is used instead
of building another (image pulls and pip installs are paid GPU minutes): the spec's
``training.ai_toolkit.path``, or the checkout the ai-toolkit Docker image carries at
``/app/ai-toolkit``. Access to a gated base model is checked with the user's token before any
download: 401/403 means the license was not accepted and fails the stage with that message.

The install follows ai-toolkit's own at the pinned commit (27a03a91: ``manager/spec.py``, the
README's manual install and ``docker/Dockerfile``): a Python its requirements have wheels for
(3.10 to 3.12: ``scipy==1.12.0`` has no wheels past cp312; its manager provisions 3.12), then
``torch==2.13.0 torchvision==0.28.0 torchaudio==2.11.0`` from the CUDA index the driver can run
(``_cuda_flavor``: cu130 for CUDA 13.0+, cu126 for 12.6+), then ``requirements.txt``, then
``torchcodec==0.15.0`` with ``-U`` over the requirements' pin. An existing checkout at another
commit than the pin is used, and the log says so: the agent relies on nothing only the pin has.

Knobs (environment): ``FLUX_REMOTE_SKIP_TORCH_INSTALL=1`` skips the torch and torchcodec install;
``FLUX_REMOTE_VENV_ARGS`` adds arguments to ``python -m venv`` (tests use
``--system-site-packages --without-pip`` to build in a second with no download).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from remote.install_lock import install_lock
from remote.status import StageFailed

IMAGE_CHECKOUTS = ("/app/ai-toolkit",)
DONE_MARKER = ".flux-remote-bootstrap.json"
TORCH_INDEX = "https://download.pytorch.org/whl/{tag}"
HF_ENDPOINT = "https://huggingface.co"
TINY_IMPORTS = ("torch", "numpy", "PIL", "safetensors", "yaml", "remote.trainers.tiny")

Log = Callable[[str], None]


@dataclass
class BootstrapResult:
    trainer: str
    aitk_dir: str | None = None
    python: str | None = None
    source: str = ""  # "tiny" | "spec path" | "image" | "built" | "cached"
    commit: str | None = None
    hf_access: str = "skipped"
    steps: list[str] = field(default_factory=list)
    pin_mismatch: str | None = None  # an existing checkout at another commit than the pin

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# manager/spec.py TORCH and TORCHCODEC at the pinned commit; README "Manual installation"
AITK_TORCH = ("torch==2.13.0", "torchvision==0.28.0", "torchaudio==2.11.0")
AITK_TORCHCODEC = "torchcodec==0.15.0"
# requirements.txt pins scipy==1.12.0 (wheels cp39..cp312); manager/spec.py python_version 3.12
AITK_PYTHONS = ((3, 12), (3, 11), (3, 10))


def _version(text: str | None) -> tuple[int, ...] | None:
    match = re.match(r"\d+(?:\.\d+)*", text or "")
    return tuple(int(x) for x in match.group().split(".")) if match else None


def torch_cuda_tag(driver: str | None, cuda: str | None = None) -> str:
    """The CUDA wheel index for the pinned torch, as ``manager/spec.py`` ``_cuda_flavor`` picks
    it from the highest CUDA the driver supports (nvidia-smi's "CUDA Version"): cu130 from 13.0,
    cu126 from 12.6, else too old. Without that figure the driver's own version decides (CUDA
    13.0 needs driver 580+, 12.6 needs 560+); with neither, cu130, as ai-toolkit assumes."""
    cuda_v, driver_v = _version(cuda), _version(driver)
    if cuda_v is None and driver_v is not None:
        cuda_v = (13, 0) if driver_v >= (580,) else (12, 6) if driver_v >= (560,) else (0,)
    if cuda_v is None or cuda_v >= (13, 0):
        return "cu130"
    if cuda_v >= (12, 6):
        return "cu126"
    raise StageFailed(f"the NVIDIA driver ({driver or 'unknown'}, CUDA {cuda or 'unknown'}) is "
                      "too old for the torch ai-toolkit pins (cu126 wheels need CUDA 12.6, "
                      "driver 560+): choose an offer with a newer driver", cause="driver")


def aitk_python(*, current: tuple[int, ...] = tuple(sys.version_info[:2]),
                executable: str = sys.executable,
                which: Callable[[str], str | None] = shutil.which) -> str | None:
    """A Python ai-toolkit's requirements have wheels for: the agent's own when it is one, else
    ``python3.12``/``3.11``/``3.10`` from PATH; None when the machine has none."""
    if tuple(current[:2]) in AITK_PYTHONS:
        return executable
    for major, minor in AITK_PYTHONS:
        found = which(f"python{major}.{minor}")
        if found:
            return found
    return None


def aitk_python_problem(*, current: tuple[int, ...] = tuple(sys.version_info[:2]),
                        which: Callable[[str], str | None] = shutil.which) -> str | None:
    """The checks stage's message when no supported Python exists, else None."""
    if aitk_python(current=current, which=which) is not None:
        return None
    wanted = ", ".join(f"{a}.{b}" for a, b in AITK_PYTHONS)
    return (f"ai-toolkit's requirements have wheels for Python {wanted} (scipy==1.12.0 stops at "
            f"3.12); this image has Python {'.'.join(map(str, current[:2]))} and no "
            f"python3.12/3.11/3.10: use an image with one (e.g. pytorch/pytorch with "
            f"Python 3.12) or training.ai_toolkit.path to an install")


def _git_head(checkout: Path) -> str | None:
    probe = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"],
                           capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin", "GIT_CEILING_DIRECTORIES":
                                str(checkout.parent)})
    return probe.stdout.strip() if probe.returncode == 0 else None


def _pinned(commit: str | None, pin: str) -> bool:
    """``commit`` is the pin; a pin that is not a commit id (a branch) cannot be compared."""
    if not re.fullmatch(r"[0-9a-fA-F]{7,40}", pin):
        return True
    return bool(commit) and commit.lower().startswith(pin.lower())


def _run(argv: list[str], *, log: Log, cwd: str | None = None,
         env: Mapping[str, str] | None = None) -> None:
    """Run a command, streaming its output into the log (a pip install can take minutes);
    a failure fails the stage with the last lines it printed."""
    log("$ " + " ".join(argv))
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with subprocess.Popen(argv, cwd=cwd, env=dict(env) if env is not None else None,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log(line.rstrip("\n"))
            tail.append(line.rstrip("\n"))
    if proc.returncode != 0:
        raise StageFailed(f"`{' '.join(argv[:4])}` failed with exit code {proc.returncode}:\n"
                          + "\n".join(tail), cause="bootstrap_command")


def _torch_version(python: str, env: Mapping[str, str]) -> str | None:
    """The torch version ``python`` imports (local tag dropped), None without torch."""
    probe = subprocess.run([python, "-c", "import torch; print(torch.__version__)"],
                           capture_output=True, text=True, env=dict(env))
    return probe.stdout.strip().split("+")[0] if probe.returncode == 0 else None


def _imports_ok(python: str, module: str, env: Mapping[str, str]) -> bool:
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True,
                           env=dict(env))
    return probe.returncode == 0


def _missing_imports(modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` cannot be found (without importing them: torch alone takes seconds)."""
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


def _checkout_python(checkout: Path) -> str:
    for venv in ("venv", ".venv"):
        candidate = checkout / venv / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    return sys.executable


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / DONE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def install_ai_toolkit(repo: str, commit: str, directory: Path, *, driver: str | None,
                       wandb: bool, env: Mapping[str, str], log: Log,
                       cuda: str | None = None) -> BootstrapResult:
    """Clone or update ``repo`` at ``commit`` into ``directory`` and build its venv (idempotent)."""
    result = BootstrapResult(trainer="ai-toolkit", aitk_dir=str(directory),
                             python=str(directory / "venv" / "bin" / "python"), source="built")
    marker = _read_marker(directory)
    if marker and marker.get("repo") == repo and marker.get("commit") == commit:
        result.source, result.commit = "cached", marker.get("resolved")
        return result
    directory.parent.mkdir(parents=True, exist_ok=True)
    # never prompt; never mistake a repository above the cache for this checkout
    git_env = {**env, "GIT_TERMINAL_PROMPT": "0", "GIT_CEILING_DIRECTORIES": str(directory.parent)}
    if not (directory / ".git").exists():
        _run(["git", "clone", "--quiet", repo, str(directory)], log=log, env=git_env)
        result.steps.append("clone")
    else:
        try:
            _run(["git", "-C", str(directory), "fetch", "--quiet", "origin"], log=log,
                 env=git_env)
            result.steps.append("fetch")
        except StageFailed:  # e.g. a clone cut short by a killed agent: start afresh
            log(f"the checkout in {directory} is broken; cloning again")
            shutil.rmtree(directory)
            _run(["git", "clone", "--quiet", repo, str(directory)], log=log, env=git_env)
            result.steps.append("clone")
    remote_ref = subprocess.run(["git", "-C", str(directory), "rev-parse", "--verify", "--quiet",
                                 f"origin/{commit}^{{commit}}"], capture_output=True, text=True)
    target = f"origin/{commit}" if remote_ref.returncode == 0 else commit
    _run(["git", "-C", str(directory), "checkout", "--quiet", "--force", "--detach", target],
         log=log, env=git_env)
    resolved = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
    result.commit = resolved
    python = result.python
    assert python is not None
    skip_torch = env.get("FLUX_REMOTE_SKIP_TORCH_INSTALL") == "1"
    if not Path(python).exists():
        base = aitk_python()
        if base is None:
            raise StageFailed(aitk_python_problem() or "no supported Python", cause="python")
        extra = shlex.split(env.get("FLUX_REMOTE_VENV_ARGS", ""))
        _run([base, "-m", "venv", *extra, str(directory / "venv")], log=log, env=env)
        result.steps.append("venv" if base == sys.executable else f"venv: {Path(base).name}")
    if skip_torch or _torch_version(python, env) == AITK_TORCH[0].split("==")[1]:
        result.steps.append("torch: present")
    else:
        tag = torch_cuda_tag(driver, cuda)
        _run([python, "-m", "pip", "install", "--quiet", *AITK_TORCH,
              "--index-url", TORCH_INDEX.format(tag=tag)], log=log, env=env)
        result.steps.append(f"torch: {tag}")
    requirements = directory / "requirements.txt"
    if requirements.exists():
        _run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r",
              str(requirements)], log=log, env=env, cwd=str(directory))
        result.steps.append("requirements")
    if not skip_torch:  # docker/Dockerfile: after the requirements, -U over their pin
        _run([python, "-m", "pip", "install", "--quiet", "-U", AITK_TORCHCODEC], log=log,
             env=env)
        result.steps.append("torchcodec")
    if wandb:
        _run([python, "-m", "pip", "install", "--quiet", "wandb"], log=log, env=env)
        result.steps.append("wandb")
    from remote.plan import write_json_atomic

    write_json_atomic(directory / DONE_MARKER, {"repo": repo, "commit": commit,
                                                "resolved": resolved})
    return result


def check_hf_access(model: str, *, token: str | None, env: Mapping[str, str],
                    opener: Callable[..., Any] = urllib.request.urlopen) -> str:
    """Can this token read ``model`` on the hub? Returns a short outcome, raises on 401/403.

    Skipped for local paths, without a token, or offline (``HF_HUB_OFFLINE=1``); a network
    failure is reported, not fatal (the download will say more).
    """
    if not model or "/" not in model or model.startswith(("/", ".")) or Path(model).exists():
        return "skipped: local model path"
    if env.get("HF_HUB_OFFLINE") == "1":
        return "skipped: offline"
    if not token:
        return "skipped: no HF_TOKEN (a gated model will fail to download)"
    base = (env.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
    request = urllib.request.Request(f"{base}/api/models/{model}/auth-check",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with opener(request, timeout=30) as response:
            code = response.status
    except urllib.error.HTTPError as exc:
        code = exc.code
    except (urllib.error.URLError, OSError) as exc:
        return f"unverified: {exc}"
    if code in (401, 403):
        raise StageFailed(
            f"Hugging Face refused access to {model} (HTTP {code}): accept the license at "
            f"{HF_ENDPOINT}/{model} with the account that owns HF_TOKEN, or check the token",
            cause="hf_auth")
    if code == 404:
        raise StageFailed(f"Hugging Face has no model {model} (HTTP 404)", cause="hf_auth")
    return "ok" if 200 <= code < 300 else f"unverified: HTTP {code}"


def _extras_wanted(spec: dict[str, Any], trainer_python: str,
                   agent_python: str) -> list[tuple[str, str, bool]]:
    """(python, package = module, required) for each extra the spec's options need."""
    wanted: list[tuple[str, str, bool]] = []
    if (spec.get("wandb") or {}).get("enabled"):
        wanted.append((trainer_python, "wandb", False))
    if (spec.get("captioning") or {}).get("mode") == "model":
        wanted.append((agent_python, "transformers", True))
    return wanted


def install_extras(spec: dict[str, Any], trainer_python: str, *, env: Mapping[str, str],
                   log: Log, agent_python: str = sys.executable) -> list[str]:
    """Install what the spec's options need and the Pythons lack; returns the steps taken.

    ``wandb`` goes into the trainer's Python when ``wandb.enabled`` (ai-toolkit's requirements
    lack it, and an image's or a cached install may too); it is optional logging, so a failed
    install is a warning. ``transformers`` goes into the agent's own Python for
    ``captioning.mode: model`` (the caption stage runs there); without it captioning fails, so a
    failed install fails the stage now, before anything else is paid for.
    """
    steps = []
    for python, package, required in _extras_wanted(spec, trainer_python, agent_python):
        if _imports_ok(python, package, env):
            continue
        try:
            _run([python, "-m", "pip", "install", "--quiet", package], log=log, env=env)
        except StageFailed as exc:
            if required:
                raise
            log(f"warning: installing {package} failed; continuing without it ({exc})")
            continue
        steps.append(package)
    return steps


def bootstrap(spec: dict[str, Any], *, cache_root: Path, env: Mapping[str, str], log: Log,
              driver: str | None = None, base_model: str | None = None,
              image_checkouts: tuple[str, ...] = IMAGE_CHECKOUTS,
              opener: Callable[..., Any] = urllib.request.urlopen,
              cuda: str | None = None) -> BootstrapResult:
    """Install the trainer and the extras the spec needs. Whatever installs does so one agent of
    this machine at a time (:mod:`remote.install_lock`: runs sharing an instance share its cache
    root); using an existing install takes no lock and writes nothing to the cache."""
    result = _bootstrap_trainer(spec, cache_root=cache_root, env=env, log=log, driver=driver,
                                base_model=base_model, image_checkouts=image_checkouts,
                                opener=opener, cuda=cuda)
    if _extras_wanted(spec, result.python or sys.executable, sys.executable):
        with install_lock(cache_root, log=log):
            result.steps += install_extras(spec, result.python or sys.executable, env=env,
                                           log=log)
    return result


def _bootstrap_trainer(spec: dict[str, Any], *, cache_root: Path, env: Mapping[str, str],
                       log: Log, driver: str | None, base_model: str | None,
                       image_checkouts: tuple[str, ...], opener: Callable[..., Any],
                       cuda: str | None = None) -> BootstrapResult:
    training = spec.get("training") or {}
    if training.get("trainer") == "tiny":
        missing = _missing_imports(TINY_IMPORTS)
        if missing:
            raise StageFailed(f"the tiny trainer cannot import {', '.join(missing)}",
                              cause="import_error")
        return BootstrapResult(trainer="tiny", python=sys.executable, source="tiny",
                               hf_access="skipped: tiny trainer")
    aitk = training.get("ai_toolkit") or {}
    token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")
    hf_access = check_hf_access(base_model or "", token=token, env=env, opener=opener)
    pin = str(aitk.get("commit") or "")
    existing = [aitk.get("path")] if aitk.get("path") else list(image_checkouts)
    for candidate in existing:
        checkout = Path(candidate)
        if (checkout / "run.py").exists():
            log(f"using the ai-toolkit install at {checkout}")
            head = _git_head(checkout)
            result = BootstrapResult(trainer="ai-toolkit", aitk_dir=str(checkout),
                                     python=_checkout_python(checkout), hf_access=hf_access,
                                     source="spec path" if aitk.get("path") else "image",
                                     commit=head)
            if not _pinned(head, pin):
                result.pin_mismatch = (f"the ai-toolkit at {checkout} is at "
                                       f"{head or 'an unknown commit (no git metadata)'}, "
                                       f"not the pinned {pin or '(none)'}: its config keys, "
                                       "printed lines and install may differ from what this "
                                       "version of flux-remote was checked against")
                log("warning: " + result.pin_mismatch)
            return result
    if aitk.get("path"):
        raise StageFailed(f"training.ai_toolkit.path {aitk['path']} holds no run.py")
    commit = str(aitk.get("commit") or "main")
    directory = cache_root / "ai-toolkit" / re.sub(r"[^A-Za-z0-9._-]", "_", commit)
    with install_lock(cache_root, log=log):  # a second agent waits, then finds it done
        result = install_ai_toolkit(str(aitk.get("repo")), commit, directory, driver=driver,
                                    wandb=bool((spec.get("wandb") or {}).get("enabled")),
                                    env=env, log=log, cuda=cuda)
    result.hf_access = hf_access
    return result
