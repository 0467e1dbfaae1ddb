"""Sync efficiency (issue 10, item 3): flux-remote's upload against plain ``rsync -a``.

Over one local sshd (started here, like the tests' fixture), on a generated 100 MB dataset:

1. first upload, SshHost.upload vs ``rsync -a -e ssh`` into another folder (median of N runs each,
   interleaved, alternating order; each destination is removed right after its run, so neither
   side pays for the other's page-cache writeback): throughput ratio, target >= 0.9;
2. re-upload with nothing changed: bytes on the wire / dataset size, target < 1 %;
3. an upload cut halfway (the sshd child serving it is killed when half the bytes arrived): what
   the automatic resume sends / dataset size, target < 60 %.

``--ablate`` adds, instead of guessing which of our rsync options costs time, each of them alone
on top of plain ``rsync -a`` (``-s``, ``--partial --partial-dir``, ``--stats``, ``--no-motd``, the
``mkdir -p`` in ``--rsync-path``), all of them, and ``SshHost.upload`` itself: every variant once
per round, rounds in a shuffled order (fixed seed), medians and their ratio to plain.

Run: ``.venv/bin/python bench/bench_sync.py [--mb 100] [--repeats 5] [--ablate]``. Prints a table
and writes ``bench/results/sync.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.hosts.rsync import PARTIAL_DIR  # noqa: E402
from controller.hosts.ssh import SshHost, ssh_argv  # noqa: E402
from tests.fixtures_sshd import SshServer, _keygen  # noqa: E402

FILE_MB = 2.5  # a dataset of camera JPEG-sized files


def make_dataset(root: Path, total_mb: int) -> int:
    """Incompressible files (like JPEGs) summing to ``total_mb``; returns the byte count."""
    root.mkdir(parents=True)
    size = int(FILE_MB * 1024 * 1024)
    count = max(1, int(total_mb / FILE_MB))
    for i in range(count):
        (root / f"img_{i:03d}.jpg").write_bytes(os.urandom(size))
        (root / f"img_{i:03d}.txt").write_text(f"photo of sks person, take {i}\n")
    return sum(p.stat().st_size for p in root.iterdir())


def plain_rsync(src: Path, dest: str, ssh_command: str, extra: Sequence[str] = ()) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["rsync", "-a", *extra, "-e", ssh_command, "--", f"{src}/", dest],
        check=True, capture_output=True,
    )
    return time.perf_counter() - started


def option_variants(dest: str) -> dict[str, list[str]]:
    """Our extra rsync options (``controller.hosts.rsync.rsync_argv`` and ``SshHost.upload``), each
    alone and all together, for the ablation; ``dest`` is the remote destination directory."""
    mkdir = f"--rsync-path=mkdir -p -- {shlex.quote(dest)} && rsync"
    alone = {
        "plain rsync -a": [],
        "-s": ["-s"],
        "--partial-dir": ["--partial", f"--partial-dir={PARTIAL_DIR}"],
        "--stats": ["--stats"],
        "--no-motd": ["--no-motd"],
        "--rsync-path mkdir": [mkdir],
    }
    return {**alone, "all of the above": [a for v in alone.values() for a in v]}


def ablate(host: SshHost, server: SshServer, src: Path, work: Path, repeats: int) -> dict:
    """Each option's cost: every variant once per round, shuffled, medians (see the docstring)."""
    ssh_command = shlex.join(ssh_argv(host.target))
    names = [*option_variants("/x"), "SshHost.upload"]
    runs: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(1234)
    for i in range(repeats):
        for name in order.sample(names, len(names)):
            dest = work / f"ablate-{i}-{names.index(name)}"
            if name == "SshHost.upload":
                t0 = time.perf_counter()
                host.upload(src, str(dest))
                runs[name].append(time.perf_counter() - t0)
            else:
                extra = option_variants(str(dest))[name]
                if not any(a.startswith("--rsync-path") for a in extra):
                    dest.mkdir(parents=True)  # what the mkdir in --rsync-path does otherwise
                runs[name].append(plain_rsync(src, f"{server.host}:{dest}/", ssh_command, extra))
            shutil.rmtree(dest)
    plain = statistics.median(runs["plain rsync -a"])
    return {
        name: {"median_s": round(statistics.median(v), 3),
               "ratio_to_plain": round(plain / statistics.median(v), 3),
               "runs": [round(x, 3) for x in v]}
        for name, v in runs.items()
    }


def first_upload(host: SshHost, server: SshServer, src: Path, work: Path, repeats: int) -> dict:
    ssh_command = shlex.join(ssh_argv(host.target))
    ours: list[float] = []
    plain: list[float] = []

    def run_ours(i: int) -> None:
        t0 = time.perf_counter()
        host.upload(src, str(work / f"ours-{i}"))
        ours.append(time.perf_counter() - t0)
        shutil.rmtree(work / f"ours-{i}")

    def run_plain(i: int) -> None:
        plain.append(plain_rsync(src, f"{server.host}:{work / f'plain-{i}'}/", ssh_command))
        shutil.rmtree(work / f"plain-{i}")

    for i in range(repeats):  # interleaved, alternating who goes first, fresh destinations
        for step in (run_ours, run_plain) if i % 2 == 0 else (run_plain, run_ours):
            step(i)
    ours_s, plain_s = statistics.median(ours), statistics.median(plain)
    return {
        "ours_s": round(ours_s, 3),
        "plain_rsync_s": round(plain_s, 3),
        "throughput_ratio": round(plain_s / ours_s, 3),
        "target": ">= 0.9",
        "runs": {"ours": [round(x, 3) for x in ours], "plain": [round(x, 3) for x in plain]},
    }


def unchanged(host: SshHost, src: Path, work: Path, total: int) -> dict:
    host.upload(src, str(work / "again"))
    stats = host.upload(src, str(work / "again"))
    return {
        "bytes_sent": stats.bytes_sent,
        "files_sent": stats.files_sent,
        "fraction": round(stats.bytes_sent / total, 5),
        "seconds": round(stats.seconds, 3),
        "target": "< 0.01",
    }


def interrupted(server: SshServer, known_hosts: Path, src: Path, work: Path, total: int) -> dict:
    """Cut the upload when half the bytes are on the other side; the upload retries by itself."""
    dest = work / "cut"
    # a bandwidth cap only so the cut lands near 50 % on a fast loopback; it changes no byte counts
    host = SshHost(server.target(known_hosts), rsync_args=["--bwlimit=50000"], sleep=lambda s: None)
    cut_at: list[int] = []

    def arrived() -> int:
        return sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) if dest.exists() else 0

    def cut() -> None:
        while arrived() < total / 2:
            time.sleep(0.005)
        cut_at.append(arrived())
        server.kill_connections()

    killer = threading.Thread(target=cut, daemon=True)
    killer.start()
    stats = host.upload(src, str(dest))
    killer.join(timeout=5)
    host.close()
    return {
        "cut_at_fraction": round(cut_at[0] / total, 3) if cut_at else None,
        "attempts": stats.attempts,
        "resumed_bytes_sent": stats.bytes_sent,
        "fraction": round(stats.bytes_sent / total, 3),
        "target": "< 0.6",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ablate", action="store_true",
                        help="also time each of our rsync options alone (--repeats rounds)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sync.json")
    args = parser.parse_args()
    if not os.path.exists("/usr/sbin/sshd") or shutil.which("rsync") is None:
        print("needs /usr/sbin/sshd and rsync", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        base = Path(tmp)
        client_key = base / "client_key"
        _keygen(client_key)
        (base / "sshd").mkdir()
        server = SshServer(base / "sshd", client_key)
        server.start()
        try:
            src, work = base / "dataset", base / "remote"
            total = make_dataset(src, args.mb)
            known_hosts = base / "known_hosts"
            with SshHost(server.target(known_hosts)) as host:
                first = first_upload(host, server, src, work, args.repeats)
                again = unchanged(host, src, work, total)
                options = ablate(host, server, src, work, args.repeats) if args.ablate else None
            cut = interrupted(server, known_hosts, src, work, total)
        finally:
            server.stop()

    result = {
        "benchmark": "sync",
        "dataset_bytes": total,
        "files": int(args.mb / FILE_MB) * 2,
        "first_upload": first,
        "unchanged_reupload": again,
        "interrupted_resume": cut,
        "options": options,
        "passed": {
            "first_upload": first["throughput_ratio"] >= 0.9,
            "unchanged_reupload": again["fraction"] < 0.01,
            "interrupted_resume": cut["fraction"] < 0.6,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "rsync": subprocess.run(
                ["rsync", "--version"], capture_output=True, text=True
            ).stdout.splitlines()[0],
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    rows = [
        ("first upload (ours / plain rsync -a)",
         f"{first['ours_s']:.2f} s / {first['plain_rsync_s']:.2f} s",
         f"{first['throughput_ratio']:.2f}x", ">= 0.9x", result["passed"]["first_upload"]),
        ("re-upload, nothing changed", f"{again['bytes_sent']:,} B sent",
         f"{again['fraction'] * 100:.3f} %", "< 1 %", result["passed"]["unchanged_reupload"]),
        (f"resume after a cut at {(cut['cut_at_fraction'] or 0) * 100:.0f} %",
         f"{cut['resumed_bytes_sent']:,} B sent", f"{cut['fraction'] * 100:.1f} %", "< 60 %",
         result["passed"]["interrupted_resume"]),
    ]  # fmt: skip
    print(
        f"sync benchmark: {total / 1e6:.0f} MB dataset over a local sshd "
        f"({result['machine']['rsync']})"
    )
    print(f"{'case':42} {'measured':26} {'value':>10} {'target':>8}  ok")
    for case, measured, value, target, ok in rows:
        print(f"{case:42} {measured:26} {value:>10} {target:>8}  {'yes' if ok else 'NO'}")
    if options:
        print(f"\neach option alone on plain rsync -a (median of {args.repeats}, shuffled rounds)")
        for name, row in options.items():
            spread = f"{min(row['runs']):.2f}-{max(row['runs']):.2f} s"
            print(f"  {name:24} {row['median_s']:6.2f} s {row['ratio_to_plain']:6.2f}x  ({spread})")
    print(f"results: {args.out}")
    return 0 if all(result["passed"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
