#!/usr/bin/env bash
# Install embedkit with every optional part into the current Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip"
$PIP install -q torch==2.13.0                  # the CPU wheel; a looser spec may pull a CUDA build
$PIP install -q --no-deps musicnn==0.1.0      # only its checkpoints (metadata pins numpy<1.17 + TF)
$PIP install -q -e ".[all${EMBEDKIT_EXTRAS:-}]"
