#!/usr/bin/env bash
# Set up .venv (CPU build of torch first, so no multi-GB CUDA download) and run every test:
# core's tests/ and each plugin's plugins/<name>/tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
plugins=()
test_paths=(tests)
for dir in plugins/*/; do
  [ -f "$dir/pyproject.toml" ] || continue
  plugins+=(-e "$dir")
  [ -d "$dir/tests" ] && test_paths+=("$dir/tests")
done
.venv/bin/python -m pip install -q -e ".[test]" "${plugins[@]}"
.venv/bin/python -m pytest -q -p no:cacheprovider "${test_paths[@]}" "$@"
