#!/usr/bin/env bash
# Set up .venv (CPU build of torch first) and run the demo: compress the embedded tiny Llama
# with W4A16 and W8A8, print sizes, held-out perplexities and times.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
.venv/bin/python -m pip install -q -e ".[load,report]"
.venv/bin/llmc demo "$@"
