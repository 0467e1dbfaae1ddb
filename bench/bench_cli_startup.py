"""CLI start-up: `flux-remote --help` and `flux-remote ls` against `vastai --help` (and `sky --help`).

The baseline is measured in the same run: the vastai CLI is installed into a throwaway venv
(`--baseline-venv DIR` reuses one). Each command runs `--repeat` times after one warm-up, the
commands interleaved round by round (other processes' load then skews no ratio); the
table shows the median wall time, the ratio to `vastai --help` (target < 0.5) and the max RSS.

    python bench/bench_cli_startup.py [--repeat 10] [--baseline-venv /tmp/vastai-venv]

Results go to bench/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _time_once(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and max RSS (KiB) of one run of argv."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) not in (0, 1, 2):
        raise RuntimeError(f"{argv} exited with {os.waitstatus_to_exitcode(status)}")
    return elapsed, usage.ru_maxrss


def measure_all(commands: dict[str, list[str]], repeat: int,
                env: dict[str, str]) -> dict[str, dict[str, float]]:
    """Each command once to warm the page cache and .pyc files, then ``repeat`` rounds that run
    every command once each (interleaved, so a load spike from other processes hits all of them
    alike instead of skewing the ratio)."""
    for argv in commands.values():
        _time_once(argv, env)
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for _ in range(repeat):
        for name, argv in commands.items():
            samples[name].append(_time_once(argv, env))
    return {name: {"median_s": statistics.median(s for s, _ in got),
                   "min_s": min(s for s, _ in got),
                   "max_rss_mib": max(r for _, r in got) / 1024}
            for name, got in samples.items()}


def ensure_venv(path: Path, package: str, binary: str) -> Path | None:
    exe = path / "bin" / binary
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = subprocess.run([str(path / "bin" / "pip"), "install", "-q", package],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        print(f"could not install {package}: {pip.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return exe if exe.exists() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--baseline-venv", type=Path, default=None)
    parser.add_argument("--with-sky", action="store_true", help="also try `sky --help` (big install)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fr-bench-cli-"))
    env = dict(os.environ, FLUX_REMOTE_HOME=str(tmp / "home"))
    flux = shutil.which("flux-remote", path=str(Path(sys.executable).parent)) or "flux-remote"
    commands: dict[str, list[str]] = {
        "flux-remote --help": [flux, "--help"],
        "flux-remote ls": [flux, "ls"],
    }
    vastai = ensure_venv(args.baseline_venv or tmp / "vastai-venv", "vastai", "vastai")
    if vastai:
        commands["vastai --help"] = [str(vastai), "--help"]
    if args.with_sky:
        sky = ensure_venv(tmp / "sky-venv", "skypilot", "sky")
        if sky:
            commands["sky --help"] = [str(sky), "--help"]

    results = measure_all(commands, args.repeat, env)
    base = results.get("vastai --help", {}).get("median_s")
    print(f"{'command':<22} {'median s':>9} {'ratio':>7} {'max RSS MiB':>12}")
    for name, res in results.items():
        res["ratio_to_vastai_help"] = res["median_s"] / base if base else None
        ratio = f"{res['ratio_to_vastai_help']:.2f}x" if base else "n/a"
        print(f"{name:<22} {res['median_s']:>9.3f} {ratio:>7} {res['max_rss_mib']:>12.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
           "repeat": args.repeat, "results": results, "target": "flux-remote --help < 0.5x vastai --help"}
    (RESULTS / "cli_startup.json").write_text(json.dumps(out, indent=2) + "\n")
    shutil.rmtree(tmp / "home", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
