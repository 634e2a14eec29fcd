#!/usr/bin/env bash
# System packages for building, testing and running gst-plugin-valence on Debian 12.
set -euo pipefail
pkgs=(libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-plugins-base
      gstreamer1.0-plugins-good gstreamer1.0-tools pkg-config meson ninja-build
      fonts-dejavu-core python3-gst-1.0 gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0
      python3-pip python3-venv ca-certificates espeak-ng ffmpeg gstreamer1.0-plugins-bad
      prometheus chromium chromium-driver)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "Installing: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install Rust 1.92+ (https://rustup.rs) and run this again" >&2
  exit 1
fi
