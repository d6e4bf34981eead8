#!/usr/bin/env bash
# Set up .venv (CPU build of torch first, so no multi-GB CUDA download) and run every test:
# core's tests/ and each plugin's plugins/<name>/tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
plugins=()
test_paths=(tests)
for dir in plugins/*/; do
  [ -f "$dir/pyproject.toml" ] || continue
  plugins+=(-e "$dir")
  [ -d "$dir/tests" ] && test_paths+=("$dir/tests")
done
.venv/bin/python -m pip install -q -e ".[test]" "${plugins[@]}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q -p no:cacheprovider "${test_paths[@]}" "$@"
