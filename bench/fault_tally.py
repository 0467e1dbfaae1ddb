"""Run the fault tests and count what was observed after each fault: faults injected, orphans,
artifacts lost, budget overruns, and each test's outcome. Writes the tables between the markers in
docs/reliability.md.

    python bench/fault_tally.py            # run, print, update the doc
    python bench/fault_tally.py --no-write # run and print only

With ``FLUX_REMOTE_FAULT_TALLY`` set, ``tests/faults.py`` writes one JSON line per test (its
outcome, and the counts read off the fake's instances, the bundles on disk and the receipt; see
that module). Lines of category "hostile" get their own table ("hostile instance"). The header
says "all fault tests ran and passed" only when every test ran and passed and pytest exited 0;
any failed, skipped or errored test, and any non-zero orphan, loss or overrun, is listed by name
and makes the exit code 1.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
EXTRA_TESTS = ["tests/test_security.py"]
BEGIN, END = "<!-- tally:begin -->", "<!-- tally:end -->"
COUNTS = ("faults", "orphans", "lost", "overruns")
TABLES = {"fault": "faults", "hostile": "hostile instance"}
# What a hostile-instance test measures beyond the three counts; any non-zero is a finding.
MEASURED_BAD = ("leaks", "tracebacks", "escapes_shown", "uploaded_foreign")
RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


def fault_tests(root: Path = ROOT) -> list[str]:
    """Every ``tests/test_faults_*.py`` (new ones join by their name) plus the security tests."""
    found = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_faults_*.py"))
    return found + [t for t in EXTRA_TESTS if (root / t).exists()]


def merge(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per test: a teardown error after a passing body makes the test an error."""
    by_id: dict[str, dict[str, Any]] = {}
    for line in lines:
        key = line.get("nodeid") or line["test"]
        if key not in by_id:
            by_id[key] = dict(line)
            continue
        kept = by_id[key]
        if RANK.get(line.get("outcome", "passed"), 3) > RANK.get(kept.get("outcome", "passed"), 3):
            kept["outcome"] = line["outcome"]
    return list(by_id.values())


def tally(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per category: tests, outcomes, summed counts, and the names behind anything non-zero."""
    out: dict[str, dict[str, Any]] = {}
    for line in merge(lines):
        if line.get("recorded") is False and line.get("outcome") == "passed":
            continue  # a passing test that injects no fault (e.g. a pure security check)
        cat = out.setdefault(line.get("category", "fault"), {
            "tests": 0, **{k: 0 for k in COUNTS}, "kept": 0,
            "outcomes": {k: 0 for k in RANK}, "bad": [], "declared": 0, "measured": {}})
        cat["tests"] += 1
        outcome = line.get("outcome", "passed")
        cat["outcomes"][outcome] = cat["outcomes"].get(outcome, 0) + 1
        for key in COUNTS:
            cat[key] += int(line.get(key, 0))
        cat["kept"] += int(line.get("kept", 0))
        cat["declared"] += bool(line.get("declared"))
        problems = [f"{k} {line[k]}" for k in ("orphans", "lost", "overruns") if line.get(k)]
        for key, value in (line.get("measured") or {}).items():
            if key in MEASURED_BAD and isinstance(value, (int, float)):
                cat["measured"][key] = cat["measured"].get(key, 0) + value
                if value:
                    problems.append(f"{key.replace('_', ' ')} {value}")
        if outcome != "passed":
            problems.insert(0, outcome)
        if problems:
            cat["bad"].append(f"{line['test']}: {', '.join(problems)}")
    return out


def all_passed(totals: dict[str, dict[str, Any]], returncode: int) -> bool:
    return returncode == 0 and bool(totals) and all(
        c["outcomes"]["passed"] == c["tests"] for c in totals.values())


def render(totals: dict[str, dict[str, Any]], returncode: int) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if all_passed(totals, returncode):
        verdict = "all fault tests ran and passed"
    else:
        counts = {k: sum(c["outcomes"].get(k, 0) for c in totals.values()) for k in RANK}
        verdict = (f"NOT ALL PASSED: {counts['failed']} failed, {counts['error']} errors, "
                   f"{counts['skipped']} skipped, pytest exit code {returncode}")
    rows = [BEGIN, f"Last run: {when}, `python bench/fault_tally.py` ({verdict}).", ""]
    for category, title in [*TABLES.items(),
                            *[(c, c) for c in sorted(totals) if c not in TABLES]]:
        c = totals.get(category)
        if c is None:
            rows += [f"**{title}**: no test reported.", ""]
            continue
        o = c["outcomes"]
        rows += [
            f"**{title}**",
            "",
            "| tests | passed | failed | skipped | faults injected | orphans left | "
            "artifacts lost | budget overruns | kept stopped (data kept) |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {c['tests']} | {o['passed']} | {o['failed'] + o['error']} | {o['skipped']} | "
            f"{c['faults']} | {c['orphans']} | {c['lost']} | {c['overruns']} | {c['kept']} |",
            "",
        ]
        if c["measured"]:
            rows += ["Also measured after each test: " + ", ".join(
                f"{k.replace('_', ' ')} {v:g}" for k, v in sorted(c["measured"].items())) + ".", ""]
        if c["declared"]:
            rows += [f"{c['declared']} test(s) still typed a count instead of observing it.", ""]
        if c["bad"]:
            rows += ["Not clean:", ""] + [f"* {b}" for b in c["bad"]] + [""]
    rows.append(END)
    return "\n".join(rows)


def run_tests(tests: list[str]) -> tuple[list[dict[str, Any]], int]:
    with tempfile.TemporaryDirectory() as tmp:
        sink = Path(tmp) / "tally.jsonl"
        env = {**os.environ, "FLUX_REMOTE_FAULT_TALLY": str(sink)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *tests], cwd=ROOT, env=env, check=False)
        lines = [json.loads(x) for x in sink.read_text().splitlines()] if sink.exists() else []
    return lines, proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="do not update the doc")
    parser.add_argument("tests", nargs="*", help="test files (default: every fault test)")
    args = parser.parse_args(argv)
    lines, returncode = run_tests(args.tests or fault_tests())
    totals = tally(lines)
    block = render(totals, returncode)
    print(block)
    if not args.no_write and not args.tests and DOC.exists():
        text = DOC.read_text(encoding="utf-8")
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            DOC.write_text(head + block + rest.split(END, 1)[1], encoding="utf-8")
    clean = not any(c["orphans"] or c["lost"] or c["overruns"] for c in totals.values())
    return 0 if all_passed(totals, returncode) and clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
