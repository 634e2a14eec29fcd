#!/usr/bin/env python3
"""Does re-estimating the class priors of unheard speech help? (docs/experiments.md, 2026-11)

Reads the per-clip out-of-fold probabilities that `valence cv --predictions OUT.csv` writes and,
for every corpus that has all three classes, adapts its leave-one-corpus-out probabilities to
the class priors of the held-out speech by EM (Saerens, Latinne & Decaestecker 2002), without
its labels: once per corpus (the most a stream could ever know) and once per speaker (what one
caller's stream could learn). The head trains with inverse-frequency class weights, so its own
prior is taken as uniform. Prints the LOCO macro-F1 per corpus before and after.

Usage: python3 crates/valence-train/scripts/prior_shift.py PREDICTIONS.csv   (needs numpy)
"""
import csv
import sys

import numpy as np

from neutral_bias import LABELS, macro_f1


def adapt_priors(p, trained_prior, iterations=100):
    """EM on unlabelled probabilities `p` [n, 3]: returns them reweighted to the estimated priors."""
    prior = trained_prior.copy()
    adapted = p
    for _ in range(iterations):
        adapted = p * (prior / trained_prior)
        adapted /= adapted.sum(1, keepdims=True)
        new = adapted.mean(0)
        if np.abs(new - prior).max() < 1e-6:
            break
        prior = new
    return adapted


def main(path):
    rows = list(csv.DictReader(open(path)))
    y = np.array([LABELS.index(r["valence"]) for r in rows])
    corpus = np.array([r["corpus"] for r in rows])
    speaker = np.array([r["speaker"] for r in rows])
    p = np.array([[float(r[f"loco_{l}"]) for l in LABELS] for r in rows])
    three = [c for c in sorted(set(corpus)) if len(set(y[corpus == c])) == 3]
    uniform = np.ones(3) / 3
    for name, groups in (("per corpus", corpus), ("per speaker", speaker)):
        before, after = {}, {}
        for c in three:
            m = corpus == c
            adapted = np.zeros_like(p[m])
            for g in sorted(set(groups[m])):
                mm = groups[m] == g
                adapted[mm] = adapt_priors(p[m][mm], uniform)
            before[c] = macro_f1(y[m], p[m].argmax(1))
            after[c] = macro_f1(y[m], adapted.argmax(1))
        print(
            f"priors re-estimated {name}: LOCO mean {np.mean(list(before.values())):.3f} -> "
            f"{np.mean(list(after.values())):.3f} ("
            + ", ".join(f"{c} {before[c]:.3f} -> {after[c]:.3f}" for c in three)
            + ")"
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
