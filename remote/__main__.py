"""``python -m remote COMMAND``: the agent's entry points.

    run PLAN.json                 run or resume the pipeline (exit 0 on success)
    status RUN_DIR [--json]       print status.json
    progress LOGFILE              latest trainer progress from a log, as JSON
    check-dataset DIR [--json]    ingest + template captions + quality gate into a temp dir
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m remote", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p_run = sub.add_parser("run", help="run or resume the pipeline described by plan.json")
    p_run.add_argument("plan")

    p_status = sub.add_parser("status", help="print a run directory's status.json")
    p_status.add_argument("run_dir")
    p_status.add_argument("--json", action="store_true", dest="as_json")

    p_prog = sub.add_parser("progress", help="parse a trainer log; print the latest progress")
    p_prog.add_argument("logfile")

    p_check = sub.add_parser("check-dataset", help="ingest + quality gate a dataset folder")
    p_check.add_argument("directory")
    p_check.add_argument("--json", action="store_true", dest="as_json")
    p_check.add_argument("--trigger", default=None, help="trigger word for template captions")
    p_check.add_argument("--gate", default=None, help="JSON of quality_gate settings")

    args = parser.parse_args(argv)
    if args.command == "run":
        from remote.runner import run_plan

        return run_plan(args.plan)
    if args.command == "status":
        from remote.status import print_status

        return print_status(args.run_dir, as_json=args.as_json)
    if args.command == "progress":
        from remote.progress import progress_main

        return progress_main(args.logfile)
    if args.command == "check-dataset":
        from remote.dataset.check import check_dataset_main

        return check_dataset_main(args.directory, as_json=args.as_json, trigger=args.trigger,
                                  gate_json=args.gate)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
