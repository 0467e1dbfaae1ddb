#!/usr/bin/env bash
# The test command: sets up ./.venv (see setup.sh) and runs the whole suite.
# --durations=15 prints the slowest tests at the end, so growth of the suite's time is visible.
# pytest's exit code 5 ("no tests collected") is a failure here, not a success.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh || exit 1
# The browser test (tests/test_report_browser.py) needs Chromium. Only the tests need it, so it is
# installed here and never by the demo's setup.sh: from the distribution's packages, as root, when
# missing. Without root it cannot be installed and that test is skipped.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test.sh: installing chromium for the browser test" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >&2 \
    || echo "test.sh: chromium could not be installed; the browser test will fail" >&2
fi
.venv/bin/python -m pytest -q --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
