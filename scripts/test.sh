#!/usr/bin/env bash
# Install everything (with test extras and the browser for the report test) and run the whole
# test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # Headless Chromium renders the HTML report in tests/test_report_browser.py.
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || { echo "warning: could not install chromium; the browser test will be skipped" >&2; [ "${CI:-}" != true ] || exit 1; }
fi
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # A throwaway PostgreSQL cluster (started by tests/test_tag.py) checks `embedkit tag --db postgresql://...`.
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
    || { echo "warning: could not install postgresql; the PostgreSQL test will be skipped" >&2; [ "${CI:-}" != true ] || exit 1; }
fi
EMBEDKIT_EXTRAS=",test" bash scripts/install.sh
python -m pytest -q "$@"
