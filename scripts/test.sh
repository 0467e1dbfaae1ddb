#!/usr/bin/env bash
# The test command: sets up ./.venv (see setup.sh) and runs the whole suite.
# --durations=15 prints the slowest tests at the end, so growth of the suite's time is visible.
# pytest's exit code 5 ("no tests collected") is a failure here, not a success.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest -q --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
