#!/usr/bin/env bash
# Proves the `cuda` feature builds on a machine without a GPU or system CUDA, using the CUDA 13
# wheels from PyPI (../shared/tools/cuda-build-from-pypi.sh), then checks that the binary starts
# and that device=auto falls back to the CPU when no driver answers (a stub libcuda).
# A cold run takes about 18 minutes on 2 cores and 1.2 GB for the toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."
tool=../shared/tools/cuda-build-from-pypi.sh
[ -f "$tool" ] || { echo "SKIPPED: $tool is not beside the checkout"; exit 0; }
export ROOT="${VALENCE_CUDA_ROOT:-$HOME/.cache/gst-plugin-valence/cuda}"
export CARGO_TARGET_DIR="${VALENCE_CUDA_TARGET_DIR:-$HOME/.cache/gst-plugin-valence/cuda-target}"
mkdir -p "$ROOT"
CRATE="$PWD" bash "$tool" --features cuda --locked
# The binary links libcuda; without a driver the toolkit's stub stands in for it.
export LD_LIBRARY_PATH="$ROOT/cuda/lib64/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$CARGO_TARGET_DIR/release/valence" make-test-model "$ROOT/tiny"
"$CARGO_TARGET_DIR/release/valence" classify --model "$ROOT/tiny" --device auto \
  crates/valence-model/tests/fixtures/speechlike.wav
echo "cuda feature: built, starts, falls back to the CPU without a GPU"
