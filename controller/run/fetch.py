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

import glob
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from controller.errors import RunError, TransportError
from controller.run.follow import RunPaths
from remote.publish.bundle import sha256_file

if TYPE_CHECKING:
    from controller.hosts.base import Host

SUMS_NAME = "SHA256SUMS"
CONTROLLER_RECEIPT = "controller_receipt.json"


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
        if not sep or len(digest) != 64 or not name:
            raise RunError(f"{SUMS_NAME} line {number} is not '<sha256>  <path>': {line!r}")
        entries.append((digest.lower(), name))
    return entries


def is_inside(name: str) -> bool:
    """Whether a SHA256SUMS entry is a relative path that stays in its bundle (as written)."""
    rel = PurePosixPath(name)
    return not rel.is_absolute() and ".." not in rel.parts and "\\" not in name


def verify_sums(bundle: Path) -> int:
    """Check every file listed in ``bundle/SHA256SUMS``; returns how many. Raises ``RunError``
    naming each missing or different file, or a path that points outside the bundle."""
    sums = bundle / SUMS_NAME
    if not sums.is_file():
        raise RunError(f"{bundle} has no {SUMS_NAME}: the bundle cannot be verified")
    entries = parse_sums(sums.read_text(encoding="utf-8"))
    if not entries:
        raise RunError(f"{sums} lists no files")
    problems = []
    root = bundle.resolve()
    for digest, name in entries:
        target = (bundle / name).resolve()
        if not is_inside(name) or root not in (target, *target.parents):
            problems.append(f"{name}: outside the bundle")
        elif not target.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(target) != digest:
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
    except (OSError, ValueError) as exc:
        raise RunError(f"{out_dir} has no readable receipt.json") from exc
    if owner != run_id:
        raise RunError(f"the bundle in {out_dir} belongs to run {owner}, not {run_id}")
    return count


def has_bundle(host: "Host", paths: RunPaths) -> bool:
    return host.read_bytes(posixpath.join(paths.publish, SUMS_NAME), 0, 1) is not None


def fetch_bundle(host: "Host", paths: RunPaths, out_dir: Path) -> FetchResult:
    """Download ``publish/`` into ``out_dir`` and verify it (raises RunError / TransportError)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = host.download(paths.publish, out_dir)
    count = verify_sums(out_dir)
    remove_transfer_leftovers(out_dir)
    return FetchResult(path=out_dir, files_verified=count, stats=stats)


def remove_transfer_leftovers(bundle: Path) -> list[Path]:
    """Delete the temp files a killed rsync left beside a verified bundle's files.

    rsync writes ``dir/.<name>.XXXXXX`` and renames it into place; a SIGKILL (the controller's
    whole process group killed) leaves it behind, and the next fetch sends ``<name>`` anew. Once
    ``<name>`` itself has verified, the leftover is a partial copy of a whole file that would only
    fill the user's disk. Only names of that shape beside a listed file are touched."""
    removed = []
    for _, name in parse_sums((bundle / SUMS_NAME).read_text(encoding="utf-8")):
        target = bundle / name
        for leftover in target.parent.glob(f".{glob.escape(target.name)}.??????"):
            if leftover.is_file() and not leftover.is_symlink():
                leftover.unlink()
                removed.append(leftover)
    return removed


def fetch_extras(host: "Host", paths: RunPaths, out_dir: Path, *,
                 checkpoint: str | None = None) -> list[str]:
    """Best effort: logs and status into ``out_dir/logs/``, a checkpoint into
    ``out_dir/checkpoints/``. Returns what arrived; transfer errors are swallowed on purpose
    (these files explain a failure, they are not the product).

    The four small files come in one rsync (one SSH connection), missing ones skipped: this runs
    between the agent's end and the destroy, so every round trip here is billed idle time.
    """
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    names = [posixpath.basename(path) for path in
             (paths.log, paths.status, paths.file("events.jsonl"), paths.out)]
    got = []
    try:
        host.download(paths.run_dir, logs, includes=names)
    except TransportError:
        pass
    else:
        got = [str(logs / name) for name in names if (logs / name).is_file()]
    if checkpoint:
        target = out_dir / "checkpoints" / posixpath.basename(checkpoint.rstrip("/"))
        try:
            host.download(checkpoint, target)  # a file or a directory; raises when missing
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
    train = (status.get("stages") or {}).get("train") or {}
    last_step_at = train.get("ended_at") or status.get("updated_at")
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
