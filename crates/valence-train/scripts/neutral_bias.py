#!/usr/bin/env python3
"""Does a fixed bias against "neutral" help speech from unheard corpora? (docs/experiments.md, 2026-11)

Reads the per-clip out-of-fold probabilities that `valence cv --predictions OUT.csv` writes and
adds a bias to the log-probabilities before the argmax. Reports the leave-one-corpus-out mean
macro-F1 over the corpora that have all three classes (a) with fixed neutral biases, (b) nested:
the bias for each held-out corpus fitted on the other corpora's LOCO predictions only, the honest
figure, and (c) what the bias fitted on all LOCO predictions costs on held-out speakers.

Usage: python3 crates/valence-train/scripts/neutral_bias.py PREDICTIONS.csv   (needs numpy)
"""
import csv
import sys

import numpy as np

LABELS = ["negative", "neutral", "positive"]


def macro_f1(y, p):
    f = []
    for k in range(3):
        tp = ((y == k) & (p == k)).sum()
        fp = ((y != k) & (p == k)).sum()
        fn = ((y == k) & (p != k)).sum()
        f.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f))


def main(path):
    rows = list(csv.DictReader(open(path)))
    y = np.array([LABELS.index(r["valence"]) for r in rows])
    corpus = np.array([r["corpus"] for r in rows])
    logp = {
        scheme: np.log(np.array([[float(r[f"{scheme}_{l}"]) for l in LABELS] for r in rows]) + 1e-9)
        for scheme in ("grouped", "loco")
    }
    three = [c for c in sorted(set(corpus)) if len(set(y[corpus == c])) == 3]

    def per_corpus(scheme, bias, corpora):
        p = (logp[scheme] + bias).argmax(1)
        return {c: macro_f1(y[corpus == c], p[corpus == c]) for c in corpora}

    def mean(d):
        return float(np.mean(list(d.values())))

    def fmt(d):
        return " ".join(f"{c} {v:.3f}" for c, v in d.items())

    for n in [0.0, 0.3, 0.5, 0.7, 1.0]:
        b = np.array([0.0, -n, 0.0])
        loco = per_corpus("loco", b, three)
        grouped = macro_f1(y, (logp["grouped"] + b).argmax(1))
        print(f"neutral -{n:.1f}: LOCO mean {mean(loco):.3f} ({fmt(loco)}); grouped pooled {grouped:.3f}")
    grids = {
        "neutral bias": [np.array([0.0, -n, 0.0]) for n in np.arange(0, 2.01, 0.1)],
        "three class biases": [
            np.array([a, -n, c])
            for n in np.arange(0, 2.01, 0.1)
            for a in np.arange(-0.5, 0.51, 0.25)
            for c in np.arange(-0.5, 0.51, 0.25)
        ],
    }
    for name, grid in grids.items():
        nested = {}
        for c in three:
            others = [o for o in three if o != c]
            best = max(grid, key=lambda b: mean(per_corpus("loco", b, others)))
            nested[c] = per_corpus("loco", best, [c])[c]
            print(f"  {name}: for {c} fitted on {others}: {np.round(best, 2).tolist()}")
        print(f"{name}, nested: LOCO mean {mean(nested):.3f} ({fmt(nested)})")
        best = max(grid, key=lambda b: mean(per_corpus("loco", b, three)))
        grouped = macro_f1(y, (logp["grouped"] + best).argmax(1))
        print(f"{name} fitted on all LOCO predictions: {np.round(best, 2).tolist()}, grouped pooled {grouped:.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
