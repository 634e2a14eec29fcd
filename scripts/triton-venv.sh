#!/usr/bin/env bash
# A Python environment for the Triton tests and benchmarks: PyPI's nvidia-pytriton (which ships
# the real `tritonserver` binary and runs on CPU-only machines) and ONNX Runtime (which runs the
# exported model inside it, and checks `valence export` against candle).
#
# It must be made by Debian's /usr/bin/python3 (package python3-venv): under other CPython
# builds (pyenv's) the Triton Python backend's stub fails to start a model.
# Prints the environment's python on its last line. VALENCE_TRITON_VENV overrides where it lives.
set -euo pipefail
VENV="${VALENCE_TRITON_VENV:-$HOME/.cache/gst-plugin-valence/triton-venv}"
PINS=(nvidia-pytriton==0.7.0 onnxruntime==1.32.0 numpy==1.26.4)
if ! "$VENV/bin/python" -c "import pytriton, onnxruntime" >/dev/null 2>&1; then
  echo "Creating $VENV (nvidia-pytriton, onnxruntime)" >&2
  rm -rf "$VENV"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PINS[@]}" >&2
fi
echo "$VENV/bin/python"
