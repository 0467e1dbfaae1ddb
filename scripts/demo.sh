#!/usr/bin/env bash
# The demo: sets up ./.venv, then trains a tiny LoRA locally on the bundled demo dataset
# (configs/demo-local.yaml: provider local, trainer tiny, no cloud account) and fetches the bundle
# into ./runs/demo-local/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/flux-remote launch configs/demo-local.yaml --yes "$@"
