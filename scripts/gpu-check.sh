#!/usr/bin/env bash
# The CUDA path on a real GPU, in one short run: the default model on the GPU against the CPU's
# answers, its speed per batch size beside PyTorch on the same GPU, an xlsr-53-sized Wav2Vec2,
# and live streams through the element with device=cuda.
#
#   bash scripts/gpu-check.sh pack   # here: bundle a `cuda` build, its libraries, the
#                                    # GStreamer plugins the benches use and the default model
#                                    # into .gpu/ (ignored by git)
#   bash scripts/gpu-check.sh run    # on the GPU machine, from the checkout, with .gpu/ beside
#                                    # it; writes its logs under $OUT (or ./gpu-out)
#
# The GPU machine has a driver, CUDA's libraries (in PyTorch's environment) and PyTorch, but no
# Rust and no GStreamer: the binary is built here (scripts/cuda-check.sh or
# ../shared/tools/cuda-build-from-pypi.sh) and carried with what it links. The bundle must stay
# small (the transfer limit is 64 MiB), so the encoder is cut to the layers the default model
# reads.
set -uo pipefail
cd "$(dirname "$0")/.."
B=.gpu

pack() {
    set -e
    local bin=${VALENCE_CUDA_BIN:-$HOME/.cache/gst-plugin-valence/cuda-target/release/valence}
    [ -x "$bin" ] || { echo "no cuda build at $bin (bash scripts/cuda-check.sh builds one)"; exit 1; }
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    rm -rf "$B" && mkdir -p "$B/stage/lib" "$B/stage/plugins" "$B/stage/cache/models"
    strip -o "$B/stage/valence" "$bin"
    echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' with uncommitted changes')" \
        > "$B/stage/REV"
    local gst=/usr/lib/x86_64-linux-gnu/gstreamer-1.0
    for p in coreelements audiotestsrc audioconvert audioresample playback typefindfunctions wavparse; do
        cp "$gst/libgst$p.so" "$B/stage/plugins/"
    done
    cp /usr/lib/x86_64-linux-gnu/gstreamer1.0/gstreamer-1.0/gst-plugin-scanner "$B/stage/"
    # Every library they link except the C runtime and the driver/CUDA ones (from the GPU machine).
    for f in "$B/stage/valence" "$B/stage/gst-plugin-scanner" "$B"/stage/plugins/*.so; do
        ldd "$f" | awk '/=> \//{print $3}'
    done | sort -u | grep -vE '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*|libgcc_s|libcuda|libcublas[^/]*|libcurand|libnvrtc|libcudart)\.so' \
        | xargs -I{} cp -L {} "$B/stage/lib/"
    # The default model, its encoder cut to the layers it reads (the rest is never run).
    local cache=${VALENCE_CACHE_DIR:-$HOME/.cache/valence}
    cp -r "$cache/models/default" "$B/stage/cache/models/"
    python3 - "$cache/encoders/whisper-base" "$B/stage/cache/encoders/whisper-base" \
        "$B/stage/cache/models/default/valence.json" <<'EOF'
import json, os, re, shutil, struct, sys
src, dst, manifest = sys.argv[1:]
upto = max(json.load(open(manifest))["features"]["layers"])
os.makedirs(dst)
for f in ("preprocessor_config.json",):
    shutil.copy(os.path.join(src, f), dst)
cfg = json.load(open(os.path.join(src, "config.json")))
cfg["encoder_layers"] = upto + 1
json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
raw = open(os.path.join(src, "model.safetensors"), "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
data = raw[8 + n:]
out, parts, off = {}, [], 0
for name, t in header.items():
    if name == "__metadata__":
        out[name] = t
        continue
    m = re.search(r"layers\.(\d+)\.", name)
    if m and int(m.group(1)) > upto:
        continue
    a, b = t["data_offsets"]
    parts.append(data[a:b])
    out[name] = dict(t, data_offsets=[off, off + b - a])
    off += b - a
h = json.dumps(out).encode()
h += b" " * (-len(h) % 8)
with open(os.path.join(dst, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(parts))
EOF
    tar -C "$B/stage" -cJf "$B/bundle.tar.xz" .
    rm -rf "$B/stage"
    du -sh "$B/bundle.tar.xz"
}

run() {
    local out=${OUT:-$PWD/gpu-out} x=/tmp/valence-gpu
    mkdir -p "$out" "$x" && tar -C "$x" -xJf "$B/bundle.tar.xz" || exit 1
    # CUDA's libraries from the machine's PyTorch environment or toolkit.
    # PyTorch runs with the machine's own libraries, not the carried ones.
    printf '#!/bin/sh\nLD_LIBRARY_PATH="%s" exec python3 "$@"\n' "${LD_LIBRARY_PATH:-}" > "$x/python"
    chmod +x "$x/python"
    local cu
    cu=$(find /opt /usr/local -name 'libcublas.so.1[0-9]*' 2>/dev/null | head -1)
    export LD_LIBRARY_PATH="$x/lib:$(dirname "$cu")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    for l in curand nvrtc cudart; do
        d=$(find /opt /usr/local -name "lib$l.so.1[0-9]*" 2>/dev/null | head -1)
        [ -n "$d" ] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$(dirname "$d")"
    done
    export GST_PLUGIN_SYSTEM_PATH_1_0="$x/plugins" GST_PLUGIN_PATH_1_0= \
        GST_PLUGIN_SCANNER_1_0="$x/gst-plugin-scanner" GST_REGISTRY_1_0="$x/registry.bin" \
        VALENCE_CACHE_DIR="$x/cache" PYTHONUNBUFFERED=1 BENCH_THREADS=8
    {
        echo "valence build: $(cat "$x/REV" 2>/dev/null)"
        nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        echo "CPU: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
        echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
        ldd "$x/valence" | grep -E 'not found|cublas|curand|cuda' || true
    } 2>&1 | tee "$out/gpu-env.txt"
    timeout "${GPU_BENCH_S:-300}" "$x/valence" bench --what gpu --device cuda:0 \
        --python "$x/python" --work-dir /tmp/valence-xlsr 2>&1 | tee "$out/gpu-bench.txt"
    [ "${GPU_LIVE:-1}" = 1 ] || return 0
    timeout "${GPU_LIVE_S:-240}" "$x/valence" bench --what live --device cuda:0 \
        --streams "${GPU_STREAMS:-256,768}" --seconds "${GPU_LIVE_SECONDS:-15}" 2>&1 \
        | tee "$out/gpu-live.txt"
}

case "${1:-}" in
    pack) pack ;;
    run) run ;;
    *) echo "usage: $0 pack|run"; exit 2 ;;
esac
