"""Bringing a run's results home and proving they arrived whole.

``fetch_bundle`` downloads ``publish/`` with rsync (resumable) and then checks every line of its
``SHA256SUMS`` against the local files; only a bundle that passes may let the instance be destroyed.
``fetch_extras`` brings the agent's logs and status (and the newest checkpoint when there is no
bundle) on a best-effort basis: they help explain a failure but never gate anything.

The controller's own receipt (the measured idle billing between the last training step and the
destroy, and the metered total) is written beside the bundle as ``controller_receipt.json``; the
agent's ``receipt.json`` and ``SHA256SUMS`` are left exactly as the agent signed them.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.errors import RunError, TransportError
from controller.run.follow import RunPaths
from controller.untrusted import (UntrustedInput, bundle_name, clean_text, decode, inside_run_dir,
                                  number, text_field)
from remote.publish.bundle import sha256_file

if TYPE_CHECKING:
    from controller.hosts.base import Host

SUMS_NAME = "SHA256SUMS"
CONTROLLER_RECEIPT = "controller_receipt.json"
STAGING = ".incoming"  # inside the out dir (same file system: verified files move by rename)
# Names in the out dir that are the controller's own: a bundle may not list them.
RESERVED = frozenset({"logs", "checkpoints", STAGING, CONTROLLER_RECEIPT})
SUMS_MAX_BYTES = 1 << 20  # a SHA256SUMS of a real bundle is a few kB
LOG_MAX_BYTES = 64 << 20  # each of agent.log, status.json, events.jsonl, agent.out
DEFAULT_BUNDLE_MB = 4096  # spec publish.max_bundle_mb: a Flux LoRA bundle is tens of MB
DEFAULT_CHECKPOINT_MB = 4096  # spec publish.max_checkpoint_mb


@dataclass
class FetchResult:
    path: Path
    files_verified: int
    stats: Any  # controller.hosts.rsync.TransferStats of the download


def parse_sums(text: str) -> list[tuple[str, str]]:
    """``(hex digest, relative path)`` for each line of a sha256sum file (text or ``*`` binary)."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name
        if not sep or len(digest) != 64 or not name \
                or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise UntrustedInput(f"{SUMS_NAME} line {number} is not '<sha256>  <path>': "
                                 f"{line[:200]!r}")
        entries.append((digest.lower(), name))
    return entries


def is_inside(name: str) -> bool:
    """Whether a SHA256SUMS entry is a relative path that stays in its bundle (as written)."""
    try:
        bundle_name(name, where=SUMS_NAME)
    except UntrustedInput:
        return False
    return True


def read_sums_file(bundle: Path) -> list[tuple[str, str]]:
    """The entries of ``bundle/SHA256SUMS``: a regular file (not a link), at most
    ``SUMS_MAX_BYTES``, UTF-8; else RunError. Names are checked by the caller (``is_inside``)."""
    sums = bundle / SUMS_NAME
    try:
        info = sums.lstat()
    except FileNotFoundError:
        raise RunError(f"{bundle} has no {SUMS_NAME}: the bundle cannot be verified") from None
    if not stat.S_ISREG(info.st_mode):
        raise UntrustedInput(f"{sums} is not a regular file")
    if info.st_size > SUMS_MAX_BYTES:
        raise UntrustedInput(f"{sums} is {info.st_size} bytes, more than a bundle's list can be "
                             f"({SUMS_MAX_BYTES})")
    return parse_sums(decode(sums.read_bytes(), where=str(sums)))


def regular_file_inside(root: Path, name: str) -> bool:
    """Whether ``root/name`` is a regular file reached through no symbolic link (each part is
    looked at with ``lstat``): a link in a bundle could point at any file of this machine."""
    current = root
    parts = name.split("/")
    for index, part in enumerate(parts):
        current = current / part
        try:
            mode = current.lstat().st_mode
        except OSError:
            return False
        last = index == len(parts) - 1
        if stat.S_ISLNK(mode) or (last and not stat.S_ISREG(mode)) \
                or (not last and not stat.S_ISDIR(mode)):
            return False
    return True


def verify_sums(bundle: Path) -> int:
    """Check every file listed in ``bundle/SHA256SUMS``; returns how many. Raises ``RunError``
    naming each missing or different file, a link, or a path that points outside the bundle."""
    entries = read_sums_file(bundle)
    if not entries:
        raise RunError(f"{bundle / SUMS_NAME} lists no files")
    problems = []
    for digest, raw in entries:
        name = clean_text(raw, limit=200, keep_newlines=False)  # shown to the user: data
        if not is_inside(raw):
            problems.append(f"{name}: outside the bundle")
        elif not regular_file_inside(bundle, raw):
            problems.append(f"{name}: missing, or not a regular file")
        elif sha256_file(bundle / raw) != digest:
            problems.append(f"{name}: checksum differs")
    if problems:
        raise RunError(f"the bundle in {bundle} failed verification:\n  " + "\n  ".join(problems))
    return len(entries)


def bundle_of_run(out_dir: Path, run_id: str) -> int:
    """Verify the bundle in ``out_dir`` and that it is this run's (an out dir is reused by the
    next run of the same name); returns the number of files verified, else raises RunError."""
    count = verify_sums(out_dir)
    try:
        owner = json.loads((out_dir / "receipt.json").read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError) as exc:
        raise RunError(f"{out_dir} has no readable receipt.json") from exc
    if owner != run_id:
        raise RunError(f"the bundle in {out_dir} belongs to run {owner!r}, not {run_id}")
    return count


def has_bundle(host: "Host", paths: RunPaths) -> bool:
    return host.read_bytes(posixpath.join(paths.publish, SUMS_NAME), 0, 1) is not None


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (links are not followed)."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            info = os.lstat(os.path.join(folder, name))
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def fetch_bundle(host: "Host", paths: RunPaths, out_dir: Path, *,
                 max_bytes: int = DEFAULT_BUNDLE_MB << 20) -> FetchResult:
    """Download ``publish/`` into a staging folder, verify it, and move only the files its
    ``SHA256SUMS`` lists (and the list) into ``out_dir``. Raises RunError / TransportError.

    The staging folder (``out_dir/.incoming``) keeps a partial download for the next try; a bundle
    over ``max_bytes`` is deleted there. Nothing from the instance reaches ``out_dir`` unverified:
    rsync creates no links, modes or owners from it (``Host.download``), names are checked, and a
    name the controller uses itself (``logs/``, ``checkpoints/``, its receipt) is refused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / STAGING
    stats = host.download(paths.publish, staging, max_bytes=max_bytes)
    size = tree_bytes(staging)
    if size > max_bytes:
        shutil.rmtree(staging, ignore_errors=True)
        raise UntrustedInput(f"the bundle is {size} bytes, more than the cap of {max_bytes} "
                             "(publish.max_bundle_mb)")
    count = verify_sums(staging)
    entries = read_sums_file(staging)
    reserved = sorted({name for _, name in entries if name.split("/")[0] in RESERVED})
    if reserved:
        raise UntrustedInput(f"the bundle lists names the controller keeps for itself: "
                             f"{', '.join(clean_text(n, limit=200) for n in reserved)}")
    for name in [*dict.fromkeys(name for _, name in entries if name != SUMS_NAME), SUMS_NAME]:
        target = out_dir / name
        for parent in reversed(target.relative_to(out_dir).parents[:-1]):
            folder = out_dir / parent
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise RunError(f"{folder} is in the way of the bundle's {name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.is_dir():
            raise RunError(f"{target} is in the way of the bundle's {name}")
        os.replace(staging / name, target)
    shutil.rmtree(staging, ignore_errors=True)  # what the list did not name, rsync temp files
    return FetchResult(path=out_dir, files_verified=count, stats=stats)


def fetch_extras(host: "Host", paths: RunPaths, out_dir: Path, *,
                 checkpoint: str | None = None,
                 checkpoint_max_bytes: int = DEFAULT_CHECKPOINT_MB << 20) -> list[str]:
    """Best effort: logs and status into ``out_dir/logs/``, a checkpoint into
    ``out_dir/checkpoints/``. Returns what arrived; transfer errors are swallowed on purpose
    (these files explain a failure, they are not the product).

    The four small files come in one rsync (one SSH connection), missing ones skipped: this runs
    between the agent's end and the destroy, so every round trip here is billed idle time.
    Each is capped at ``LOG_MAX_BYTES``; the checkpoint (a path the agent reported) is used only
    when it lies inside the run dir, and files in it over ``checkpoint_max_bytes`` are skipped.
    """
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    names = [posixpath.basename(path) for path in
             (paths.log, paths.status, paths.file("events.jsonl"), paths.out)]
    got = []
    try:
        host.download(paths.run_dir, logs, includes=names, max_bytes=LOG_MAX_BYTES)
    except TransportError:
        pass
    else:
        got = [str(logs / name) for name in names if (logs / name).is_file()]
    if checkpoint:
        try:
            remote = inside_run_dir(checkpoint, paths.run_dir, field="last_checkpoint",
                                    where="status.json")
        except UntrustedInput:
            return got
        target = out_dir / "checkpoints" / posixpath.basename(remote)
        try:
            host.download(remote, target, max_bytes=checkpoint_max_bytes)  # file or directory
        except TransportError:
            return got
        got.append(str(target))
    return got


def controller_receipt(*, run: dict[str, Any], instance: dict[str, Any] | None,
                       status: dict[str, Any], destroyed_at: float, spend_usd: float,
                       bandwidth_usd: float, files_verified: int) -> dict[str, Any]:
    """What the controller measured, beside the agent's receipt: total metered spend and the idle
    billing between the agent's last training step and the confirmed destroy."""
    price = float((instance or {}).get("dph_total") or 0.0)
    started = (instance or {}).get("billing_started_at")
    last_step_at = last_step_time(status)
    idle_s = max(0.0, destroyed_at - float(last_step_at)) if last_step_at else None
    return {
        "run_id": run["run_id"],
        "provider": run["provider"],
        "instance_id": (instance or {}).get("instance_id"),
        "gpu_name": (instance or {}).get("gpu_name"),
        "price_per_hour": price,
        "billing_started_at": started,
        "last_step_at": last_step_at,
        "destroyed_at": destroyed_at,
        "billed_hours": (destroyed_at - float(started)) / 3600 if started else None,
        "idle_after_training_s": idle_s,
        "idle_after_training_usd": idle_s / 3600 * price if idle_s is not None else None,
        "bandwidth_usd": bandwidth_usd,
        "metered_usd": spend_usd,
        "estimated_usd": run.get("est_usd"),
        "budget_usd": run.get("budget_usd"),
        "files_verified": files_verified,
    }


def last_step_time(status: dict[str, Any]) -> float | None:
    """When training ended (the agent's ``stages.train.ended_at``, else ``updated_at``), or None
    when the agent wrote no usable number (it is only a receipt figure, never an error)."""
    stages = status.get("stages")
    train = stages.get("train") if isinstance(stages, dict) else None
    for value in ((train or {}).get("ended_at") if isinstance(train, dict) else None,
                  status.get("updated_at")):
        try:
            found = number(value, field="ended_at", where="status.json")
        except UntrustedInput:
            found = None
        if found:
            return found
    return None


def train_stop_reason(status: dict[str, Any]) -> str | None:
    """Why the agent's training stopped (``stages.train.detail.stop_reason``, written by
    remote/stages/training.py ``train``), as plain text; None when status.json does not say.
    Only a run's label depends on it (``controller.run.states.stopped_state``)."""
    stages = status.get("stages")
    train = stages.get("train") if isinstance(stages, dict) else None
    detail = train.get("detail") if isinstance(train, dict) else None
    return text_field(detail.get("stop_reason"), limit=80) if isinstance(detail, dict) else None
