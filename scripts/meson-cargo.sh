#!/usr/bin/env bash
# Called by meson.build: cargo build of the plugin, copied to meson's output path.
# Args: SOURCE_ROOT BUILD_ROOT OUTPUT [cuda]
set -euo pipefail
src=$1; build=$2; out=$3; features=()
[ "${4:-}" = "cuda" ] && features=(--features cuda)
cargo build --release -p gst-plugin-valence --lib --locked --manifest-path "$src/Cargo.toml" \
  --target-dir "${CARGO_TARGET_DIR:-$build/cargo-target}" "${features[@]}"
cp "${CARGO_TARGET_DIR:-$build/cargo-target}/release/libgstvalence.so" "$out"
