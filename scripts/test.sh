#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh test) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
exec python -m pytest -n "${LIGHTPIPE_TEST_WORKERS:-2}" "$@"
