#!/usr/bin/env bash
# The test command: system packages, formatting, lints, then every test (release profile, so
# candle runs at full speed and the build is shared with the CLI and the plugin).
# Tests that need ../shared/data skip with a message where it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gst-plugin-valence/target}"
cargo fmt --check
cargo clippy --release --all-targets --locked -- -D warnings
# The default model's tests need the imported encoder: fetch it (once; cached) first.
cargo build --release --locked
"$CARGO_TARGET_DIR/release/valence" setup
# ONNX Runtime and a real Triton server (PyTriton) for the export and Triton client tests.
VALENCE_TEST_PYTHON="$(bash scripts/triton-venv.sh | tail -1)"
export VALENCE_TEST_PYTHON
cargo test --release --locked
