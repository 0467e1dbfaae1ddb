"""Run the fault tests and count what they report: faults injected, orphans, artifacts lost,
budget overruns. Writes the numbers between the markers in docs/reliability.md.

    python bench/fault_tally.py            # run, print, update the doc
    python bench/fault_tally.py --no-write # run and print only

Each fault test calls ``tests.faults.record``; with ``FLUX_REMOTE_FAULT_TALLY`` set, those calls
append JSON lines to that file, which this script sums. A failing test fails the tally.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
FAULT_TESTS = ["tests/test_faults_controller.py", "tests/test_faults_ssh.py",
               "tests/test_faults_vast.py", "tests/test_faults_agent.py",
               "tests/test_faults_disk.py",
               "tests/test_security.py"]
BEGIN, END = "<!-- tally:begin -->", "<!-- tally:end -->"


def tally(lines: list[dict[str, int]]) -> dict[str, int]:
    total = {"tests": len(lines), "faults": 0, "orphans": 0, "lost": 0, "overruns": 0}
    for line in lines:
        for key in ("faults", "orphans", "lost", "overruns"):
            total[key] += int(line.get(key, 0))
    return total


def render(total: dict[str, int], passed: bool) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        BEGIN,
        f"Last run: {when}, `python bench/fault_tally.py` "
        f"({'all fault tests passed' if passed else 'SOME FAULT TESTS FAILED'}).",
        "",
        "| tests reporting | faults injected | orphans left | artifacts lost | budget overruns |",
        "|---|---|---|---|---|",
        f"| {total['tests']} | {total['faults']} | {total['orphans']} | {total['lost']} | "
        f"{total['overruns']} |",
        END,
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="do not update the doc")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sink = Path(tmp) / "tally.jsonl"
        env = {**os.environ, "FLUX_REMOTE_FAULT_TALLY": str(sink)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", *FAULT_TESTS], cwd=ROOT,
                              env=env, check=False)
        lines = [json.loads(x) for x in sink.read_text().splitlines()] if sink.exists() else []
    total = tally(lines)
    passed = proc.returncode == 0
    block = render(total, passed)
    print(block)
    if not args.no_write and DOC.exists():
        text = DOC.read_text(encoding="utf-8")
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            DOC.write_text(head + block + rest.split(END, 1)[1], encoding="utf-8")
    return 0 if passed and not (total["orphans"] or total["lost"] or total["overruns"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
