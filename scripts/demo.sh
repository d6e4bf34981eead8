#!/usr/bin/env bash
# Set up .venv (CPU build of torch first) and run the demo: compress the embedded tiny Llama
# with W4A16 and W8A8, print sizes, held-out perplexities and times.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[load,report]"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/llmc demo "$@"
