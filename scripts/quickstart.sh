#!/usr/bin/env bash
# Installs lightpipe with everything it uses into ./.venv, then runs the offline demo on the bundled sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all
. .venv/bin/activate
HF_HUB_OFFLINE=1 lightpipe demo
