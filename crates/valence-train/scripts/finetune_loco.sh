#!/usr/bin/env bash
# Leave-one-corpus-out, paired: for each corpus of DATA, the fine-tuned recipe and its frozen
# twin (the same crops, schedule and head, encoder untouched) trained on the other five with
# finetune_encoder.py, then measured on the held-out corpus by `valence eval` (the project's
# loader and kernels). Writes OUT/{finetuned,frozen}-CORPUS/ and prints one table.
#   bash crates/valence-train/scripts/finetune_loco.sh ../shared/data /tmp/ft-loco [EXTRA ARGS...]
# MODES="finetuned" runs one side only; CORPORA="emospeech nemo" a subset.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
DATA="$(cd "${1:?DATA}" && pwd)"; OUT="${2:?OUT}"; shift 2
PY="${PY:-$(bash "$here/finetune-venv.sh")}"
VALENCE="${VALENCE:-${CARGO_TARGET_DIR:-$HOME/.cache/gst-plugin-valence/target}/release/valence}"
BASE="${BASE:-$HOME/.cache/valence/encoders/whisper-base}"
CORPORA="${CORPORA:-$(tail -n +2 "$DATA/manifest.csv" | cut -d, -f2 | sort -u | tr '\n' ' ')}"
MODES="${MODES:-finetuned frozen}"
mkdir -p "$OUT"
for mode in $MODES; do
  for c in $CORPORA; do
    dir="$OUT/$mode-$c"
    if [ ! -f "$dir/eval.json" ]; then
      flag=""; [ "$mode" = frozen ] && flag="--frozen"
      "$PY" "$here/finetune_encoder.py" --data "$DATA" --base "$BASE" --holdout-corpus "$c" \
        --out "$dir" $flag "$@" | tee "$dir.log"
      "$VALENCE" eval --manifest "$dir/holdout.csv" --root "$DATA" --model "$dir" \
        --json "$dir/eval.json" > "$dir/eval.txt"
    fi
    head -1 "$dir/eval.txt"
  done
done
/usr/bin/python3 - "$OUT" $MODES <<'PY'
import json, os, sys
out, modes = sys.argv[1], sys.argv[2:]
runs = {}
for d in sorted(os.listdir(out)):
    p = os.path.join(out, d, "eval.json")
    if os.path.isfile(p):
        mode, corpus = d.split("-", 1)
        runs.setdefault(corpus, {})[mode] = json.load(open(p))
print("| held-out corpus | " + " | ".join(f"{m} macro-F1 | {m} ECE" for m in modes) + " |")
print("|---|" + "---|---|" * len(modes))
means = {m: [] for m in modes}
for corpus, r in sorted(runs.items()):
    cells = []
    for m in modes:
        if m in r:
            means[m].append(r[m]["macro_f1"])
            cells += [f"{r[m]['macro_f1']:.3f}", f"{r[m]['ece']:.3f}"]
        else:
            cells += ["-", "-"]
    print(f"| {corpus} | " + " | ".join(cells) + " |")
print("| mean | " + " | ".join(f"{sum(v) / len(v):.3f} | " if v else "- | " for v in means.values()).rstrip(" |") + " | |")
PY
