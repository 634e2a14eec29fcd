#!/usr/bin/env bash
# The pinned PyTorch stack of finetune_encoder.py (training only; never the runtime). Prints the
# venv's python.
set -euo pipefail
VENV="${VALENCE_FINETUNE_VENV:-$HOME/.cache/gst-plugin-valence/torch-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv "$VENV" >&2
fi
"$VENV/bin/pip" install -q torch==2.15.0 numpy safetensors soundfile >&2
echo "$VENV/bin/python"
