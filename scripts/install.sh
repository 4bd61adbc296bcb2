#!/usr/bin/env bash
# Install embedkit with every optional part into the current Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip"
$PIP install -q torch==2.13.0                  # the CPU wheel; a looser spec may pull a CUDA build
$PIP install -q -e ".[all${EMBEDKIT_EXTRAS:-}]"
# The musicnn checkpoints: the musicnn 0.1.0 wheel is downloaded, not installed (its metadata pins
# numpy<1.17 and TensorFlow, which would make every later pip run report a conflict); only its
# checkpoint folders are unpacked, SHA-256-checked, into the first writable folder of embedkit's
# lookup order ($EMBEDKIT_MUSICNN_DIR, else <sys.prefix>/share/embedkit/musicnn, else
# ~/.cache/embedkit/musicnn; see embedkit/backbones/musicnn.py). Skipped when verified
# checkpoints are already found (an older install's musicnn package counts).
if found=$(python -m embedkit.weights check-musicnn 2>/dev/null); then
  echo "musicnn checkpoints already present (${found//$'\n'/, })"
else
  wheel_dir=$(mktemp -d)
  trap 'rm -rf "$wheel_dir"' EXIT
  $PIP download -q --no-deps musicnn==0.1.0 -d "$wheel_dir"
  python -m embedkit.weights install-musicnn "$wheel_dir"
fi
