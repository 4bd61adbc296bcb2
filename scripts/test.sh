#!/usr/bin/env bash
# Install everything (with test extras) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EMBEDKIT_EXTRAS=",test" bash scripts/install.sh
python -m pytest -q "$@"
