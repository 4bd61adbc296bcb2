#!/usr/bin/env bash
# Install everything (with test extras and the browser for the report test), lint, and run the
# whole test suite. Extra arguments go to pytest (e.g. -m "not slow" for the fast tier).
set -euo pipefail
cd "$(dirname "$0")/.."
# System programs some tests need, installed when missing (root + apt-get): headless Chromium
# renders the report and the service page; a throwaway PostgreSQL cluster checks
# `embedkit tag --db postgresql://...`; ffmpeg writes the M4A / Opus fixtures of the tag writer.
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v ffmpeg >/dev/null 2>&1 || need+=(ffmpeg)
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null) \
    || { echo "warning: could not install ${need[*]}; the tests that need them will be skipped" >&2; [ "${CI:-}" != true ] || exit 1; }
fi
EMBEDKIT_EXTRAS=",test" bash scripts/install.sh
ruff check .
ruff format --check .
# Two workers (pytest-xdist), one test file each at a time: module fixtures are built once per
# file, and the suite takes about half the wall time on the 2-core machines it is planned for.
# pytest keeps its assertion-rewritten test modules in __pycache__ only when bytecode may be
# written: with PYTHONDONTWRITEBYTECODE set every worker rewrites ~185 modules again (~8 s each).
unset PYTHONDONTWRITEBYTECODE
python -m pytest -q -n "${EMBEDKIT_TEST_WORKERS:-2}" --dist loadfile "$@"
