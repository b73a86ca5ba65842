#!/usr/bin/env bash
# Full schema fuzz (>= 1,000 cases, seeded): schemathesis in-process against the real app (see tests/test_ops_fuzz.py).
# Usage: bench/fuzz_full.sh [cases-per-operation, default 600]
set -euo pipefail
cd "$(dirname "$0")/.."
CERTSERVE_FUZZ_FULL_CASES="${1:-600}" exec .venv/bin/python -m pytest -q -p no:cacheprovider -m slow \
  --hypothesis-show-statistics tests/test_ops_fuzz.py
