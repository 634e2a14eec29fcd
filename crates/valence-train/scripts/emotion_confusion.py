#!/usr/bin/env python3
"""Where each source emotion goes: for out-of-fold predictions (`valence cv --predictions CSV`,
grouped by speaker and leave-one-corpus-out), the share of clips of every acted emotion called
negative, neutral and positive, and the recall of its valence class.

    python3 emotion_confusion.py --predictions cv.csv --manifest ../shared/data/manifest.csv

Emotion names are unified across corpora (anger/angry, happiness/happy/joy, sadness/sad, ...).
Only the standard library is used.
"""
import argparse
import csv
from collections import defaultdict

LABELS = ["negative", "neutral", "positive"]
UNIFY = {"angry": "anger", "anger": "anger", "fear": "fear", "fearful": "fear", "sad": "sadness",
         "sadness": "sadness", "disgust": "disgust", "happy": "happiness", "happiness": "happiness",
         "joy": "happiness", "surprise": "surprise", "surprised": "surprise", "calm": "calm",
         "neutral": "neutral", "boredom": "boredom"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True)
    p.add_argument("--manifest", required=True)
    args = p.parse_args()
    emotion = {r["path"]: r["emotion"] for r in csv.DictReader(open(args.manifest))}
    rows = list(csv.DictReader(open(args.predictions)))
    schemes = [s for s in ("grouped", "loco") if f"{s}_negative" in rows[0]]
    for scheme in schemes:
        table = defaultdict(lambda: [0, 0, 0])
        truth = {}
        for r in rows:
            e = UNIFY.get(emotion.get(r["path"], "").lower(), emotion.get(r["path"], "?"))
            probs = [float(r[f"{scheme}_{l}"]) for l in LABELS]
            table[e][probs.index(max(probs))] += 1
            truth[e] = r["valence"]
        print(f"\n{scheme}: where each source emotion goes (share of its clips)")
        print(f"| emotion | valence | clips | called negative | neutral | positive | recall |")
        print("|---|---|---|---|---|---|---|")
        for e in sorted(table, key=lambda e: (LABELS.index(truth[e]), e)):
            c = table[e]
            n = sum(c)
            rec = c[LABELS.index(truth[e])] / n
            print(f"| {e} | {truth[e]} | {n} | {c[0] / n:.2f} | {c[1] / n:.2f} | {c[2] / n:.2f} | {rec:.2f} |")


if __name__ == "__main__":
    main()
