"""A misbehaving "instance" for the tests: an agent that speaks the run-dir contract and lies.

:func:`install` writes a stand-in ``remote`` package whose ``python -m remote run plan.json``
plays one hostile part, chosen by ``FLUX_REMOTE_AGENT_HOSTILE`` (the controller forwards
``FLUX_REMOTE_AGENT_*`` variables to the agent, ``controller.run.ship.FORWARDED_PREFIXES``), and
points ``controller.run.ship.remote_package_dir`` at it. Everything else is the production path:
the local provider, ``LocalHost``, the real rsync, the orchestrator, the CLI. Only the agent is
replaced. The files it writes follow DESIGN.md's run directory (status.json replaced atomically,
events.jsonl, agent.log, publish/ with SHA256SUMS); what it puts in them is the attack.

Parts (``FLUX_REMOTE_AGENT_HOSTILE``):
  ``links``        publish/README.md is a link to a laptop file (``..._TARGET``), listed in
                   SHA256SUMS with that file's digest; publish/samples links to ``/``
  ``paths``        status.json's last_checkpoint points outside the run dir (escapes in it)
  ``text``         rich markup, ESC/CSI, OSC 52, clear-screen and BEL in status and log; a good
                   bundle whose run.yaml names another Hub repo, public
  ``numbers``      step is not a number
  ``nonutf8``      a good bundle whose SHA256SUMS is not UTF-8
  ``huge``         a status.json over the size limit and a log line with no end
  ``ignore_stop``  trains for ever and ignores STOP
"""

from __future__ import annotations

from pathlib import Path

MODE_ENV = "FLUX_REMOTE_AGENT_HOSTILE"
TARGET_ENV = "FLUX_REMOTE_AGENT_HOSTILE_TARGET"

AGENT = r'''
"""The hostile stand-in agent (tests/hostile_agent.py). Standard library only."""
import hashlib
import json
import os
import sys
import time
from pathlib import Path

RUN = Path.cwd()
MODE = os.environ.get("FLUX_REMOTE_AGENT_HOSTILE", "text")
TARGET = os.environ.get("FLUX_REMOTE_AGENT_HOSTILE_TARGET", "/etc/hostname")
PLAN = json.loads((RUN / "plan.json").read_text())
EVIL = "[bold red]PWNED[/] \x1b]52;c;ZXZpbA==\x07\x1b[2J\x1b[H\x07\x9b31m"


def write(path, data):
    """Atomically, as the real agent does (remote.plan.write_json_atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    os.replace(tmp, path)


def status(**fields):
    write(RUN / "status.json", json.dumps({"updated_at": time.time(), **fields}))


def log(text):
    with open(RUN / "agent.log", "ab") as fh:
        fh.write(text if isinstance(text, bytes) else text.encode())


def event(kind, **detail):
    with open(RUN / "events.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": kind, "at": time.time(), **detail}) + "\n")


def sha(data):
    return hashlib.sha256(data).hexdigest()


def bundle(files, *, sums=None):
    """publish/ with ``files`` (name -> bytes) and a SHA256SUMS of them (or ``sums`` as given)."""
    pub = RUN / "publish"
    for name, data in files.items():
        write(pub / name, data)
    body = "".join(f"{sha(data)}  {name}\n" for name, data in files.items()).encode()
    write(pub / "SHA256SUMS", body if sums is None else sums)


def good_files(**extra):
    name = PLAN["name"] if "name" in PLAN else "lora"
    return {f"{name}.safetensors": b"weights " * 64, "README.md": b"# a card\n",
            "receipt.json": json.dumps({"run_id": PLAN["run_id"]}).encode(),
            "samples/0.png": b"\x89PNG fake", **extra}


def wait_for_stop(seconds):
    end = time.time() + seconds
    while time.time() < end and not (RUN / "STOP").exists():
        time.sleep(0.05)


def main():
    event("stage_start", stage="train")
    if MODE == "links":
        secret = Path(TARGET).read_bytes()
        bundle(good_files())
        pub = RUN / "publish"
        (pub / "README.md").unlink()
        os.symlink(TARGET, pub / "README.md")
        os.symlink("/", pub / "root")
        files = good_files()
        files["README.md"] = secret  # what the link would deliver
        write(pub / "SHA256SUMS", "".join(f"{sha(d)}  {n}\n" for n, d in files.items()))
        status(state="done", stage="publish", step=4, total=4)
    elif MODE == "paths":
        status(state="running", stage="train", step=2, total=4,
               last_checkpoint=f"{RUN}/../../../../{TARGET.lstrip('/')}{EVIL}")
        wait_for_stop(20)
    elif MODE == "text":
        status(state="running", stage=EVIL, step=1, total=4, error=EVIL)
        log(f"step 1 {EVIL}\n\x1b[31mred\x1b[0m [link=file:///etc/passwd]click[/link]\a\n")
        time.sleep(0.5)
        files = good_files(**{"run.yaml": b"publish:\n  hf_repo: mallory/dump\n"
                                          b"  hf_private: false\n"})
        bundle(files)
        status(state="done", stage="publish", step=4, total=4)
    elif MODE == "numbers":
        status(state="running", stage="train", step="lots", total=4, loss="NaN")
        wait_for_stop(20)
    elif MODE == "nonutf8":
        files = good_files()
        sums = "".join(f"{sha(d)}  {n}\n" for n, d in files.items()).encode() + b"\xff\xfe  x\n"
        bundle(files, sums=sums)
        status(state="done", stage="publish", step=4, total=4)
    elif MODE == "huge":
        log(b"x" * (3 << 20))  # a line with no end
        write(RUN / "status.json", b'{"state": "running", "pad": "' + b"y" * (2 << 20) + b'"}')
        wait_for_stop(20)
    elif MODE == "ignore_stop":
        end = time.time() + 60
        step = 0
        while time.time() < end:  # STOP is there: carry on regardless
            step += 1
            status(state="running", stage="train", step=step, total=10 ** 6, loss=0.1)
            log(f"step {step}\n")
            time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def install(folder: Path) -> Path:
    """Write the stand-in package into ``folder/remote`` and return that folder."""
    package = folder / "remote"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""hostile stand-in (tests/hostile_agent.py)"""\n')
    (package / "__main__.py").write_text(AGENT)
    return package
