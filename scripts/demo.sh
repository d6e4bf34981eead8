#!/usr/bin/env bash
# Set up .venv (CPU build of torch first), install core and the first-party plugins under
# plugins/ (editable, as test.sh does), and run the demo: compress the embedded tiny Llama with
# RTN W4A16, GPTQ W4A16, W8A8 and SparseGPT 2:4, print sizes, held-out perplexities and times.
# Extra arguments go to `llmc demo` (e.g. --num-calibration-samples 16).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
plugins=()
for dir in plugins/*/; do
  [ -f "$dir/pyproject.toml" ] || continue
  plugins+=(-e "$dir")
done
.venv/bin/python -m pip install -q -e ".[load,report]" "${plugins[@]}"
.venv/bin/llmc demo "$@"
