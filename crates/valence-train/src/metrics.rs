//! Classification metrics: accuracy, per-class precision/recall/F1, macro and weighted F1,
//! and the confusion matrix (rows = actual, columns = predicted).

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassMetrics {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub weighted_f1: f64,
    pub per_class: Vec<ClassMetrics>,
    pub confusion: Vec<Vec<usize>>,
    pub n: usize,
}

/// `actual` and `predicted` are class indices below `n_classes`.
///
/// ```
/// let r = valence_train::metrics::report(&[0, 1, 2, 2], &[0, 1, 2, 1], 3);
/// assert_eq!(r.confusion[2], vec![0, 1, 1]);
/// assert_eq!(r.accuracy, 0.75);
/// ```
pub fn report(actual: &[usize], predicted: &[usize], n_classes: usize) -> Report {
    let mut confusion = vec![vec![0usize; n_classes]; n_classes];
    for (&a, &p) in actual.iter().zip(predicted) {
        if a < n_classes && p < n_classes {
            confusion[a][p] += 1;
        }
    }
    let n: usize = confusion.iter().flatten().sum();
    let correct: usize = (0..n_classes).map(|i| confusion[i][i]).sum();
    let per_class: Vec<ClassMetrics> = (0..n_classes)
        .map(|c| {
            let tp = confusion[c][c] as f64;
            let support: usize = confusion[c].iter().sum();
            let predicted: usize = (0..n_classes).map(|r| confusion[r][c]).sum();
            let precision = if predicted > 0 {
                tp / predicted as f64
            } else {
                0.0
            };
            let recall = if support > 0 {
                tp / support as f64
            } else {
                0.0
            };
            let f1 = if precision + recall > 0.0 {
                2.0 * precision * recall / (precision + recall)
            } else {
                0.0
            };
            ClassMetrics {
                precision,
                recall,
                f1,
                support,
            }
        })
        .collect();
    let present: Vec<&ClassMetrics> = per_class.iter().filter(|c| c.support > 0).collect();
    let macro_f1 = if present.is_empty() {
        0.0
    } else {
        present.iter().map(|c| c.f1).sum::<f64>() / present.len() as f64
    };
    let weighted_f1 = if n == 0 {
        0.0
    } else {
        per_class
            .iter()
            .map(|c| c.f1 * c.support as f64)
            .sum::<f64>()
            / n as f64
    };
    Report {
        accuracy: if n == 0 {
            0.0
        } else {
            correct as f64 / n as f64
        },
        macro_f1,
        weighted_f1,
        per_class,
        confusion,
        n,
    }
}

/// Expected calibration error with `bins` equal-width confidence bins: the support-weighted
/// mean gap between each bin's accuracy and its mean top-class probability.
pub fn expected_calibration_error(probs: &[Vec<f32>], actual: &[usize], bins: usize) -> f64 {
    let mut conf = vec![0f64; bins];
    let mut correct = vec![0f64; bins];
    let mut count = vec![0usize; bins];
    for (p, &a) in probs.iter().zip(actual) {
        let (best, c) = valence_model::argmax(p);
        let b = ((c as f64 * bins as f64) as usize).min(bins - 1);
        conf[b] += c as f64;
        correct[b] += (best == a) as u8 as f64;
        count[b] += 1;
    }
    let n: usize = count.iter().sum();
    if n == 0 {
        return 0.0;
    }
    (0..bins)
        .filter(|&b| count[b] > 0)
        .map(|b| (correct[b] - conf[b]).abs() / n as f64)
        .sum()
}

/// One confidence bin of a reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ReliabilityBin {
    /// Mean top-class probability of the predictions in the bin.
    pub confidence: f64,
    /// Share of them that were right.
    pub accuracy: f64,
    pub n: usize,
}

/// The non-empty bins of `bins` equal-width confidence bins (what ECE averages over).
pub fn reliability(probs: &[Vec<f32>], actual: &[usize], bins: usize) -> Vec<ReliabilityBin> {
    let mut acc = vec![(0f64, 0f64, 0usize); bins];
    for (p, &a) in probs.iter().zip(actual) {
        let (best, c) = valence_model::argmax(p);
        let b = ((c as f64 * bins as f64) as usize).min(bins - 1);
        acc[b].0 += c as f64;
        acc[b].1 += (best == a) as u8 as f64;
        acc[b].2 += 1;
    }
    acc.into_iter()
        .filter(|b| b.2 > 0)
        .map(|(c, r, n)| ReliabilityBin {
            confidence: c / n as f64,
            accuracy: r / n as f64,
            n,
        })
        .collect()
}

/// How the most confident predictions fare: the top `share` of them by top-class probability.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Coverage {
    pub share: f64,
    pub n: usize,
    /// The lowest confidence kept: a `min-confidence` at this value keeps this share.
    pub min_confidence: f64,
    pub accuracy: f64,
    pub macro_f1: f64,
}

/// Accuracy and macro-F1 of the most confident `shares` of the predictions (e.g. 1.0, 0.8, 0.5).
pub fn coverage(
    probs: &[Vec<f32>],
    actual: &[usize],
    classes: usize,
    shares: &[f64],
) -> Vec<Coverage> {
    let mut order: Vec<(f32, usize, usize)> = probs
        .iter()
        .zip(actual)
        .map(|(p, &a)| {
            let (best, c) = valence_model::argmax(p);
            (c, best, a)
        })
        .collect();
    order.sort_by(|x, y| y.0.total_cmp(&x.0));
    shares
        .iter()
        .map(|&share| {
            let n = ((order.len() as f64 * share).round() as usize)
                .clamp(1.min(order.len()), order.len());
            let kept = &order[..n];
            let pred: Vec<usize> = kept.iter().map(|k| k.1).collect();
            let act: Vec<usize> = kept.iter().map(|k| k.2).collect();
            let r = report(&act, &pred, classes);
            Coverage {
                share,
                n,
                min_confidence: kept.last().map(|k| k.0 as f64).unwrap_or(0.0),
                accuracy: r.accuracy,
                macro_f1: r.macro_f1,
            }
        })
        .collect()
}

/// `softmax(log p / t)`: temperature scaling applied to probabilities (the same as dividing the
/// logits by `t`).
pub fn with_temperature(p: &[f32], t: f64) -> Vec<f32> {
    let logits: Vec<f32> = p
        .iter()
        .map(|&v| ((v.max(1e-12) as f64).ln() / t) as f32)
        .collect();
    valence_model::softmax(&logits)
}

/// The temperature in [0.25, 4] that minimises the mean negative log-likelihood of `actual`
/// (grid search on a log scale, fine enough for a one-parameter fit).
pub fn fit_temperature(probs: &[Vec<f32>], actual: &[usize]) -> f64 {
    let nll = |t: f64| -> f64 {
        probs
            .iter()
            .zip(actual)
            .map(|(p, &a)| -((with_temperature(p, t)[a].max(1e-12)) as f64).ln())
            .sum::<f64>()
    };
    (0..=400)
        .map(|i| 0.25 * 16f64.powf(i as f64 / 400.0))
        .min_by(|a, b| nll(*a).total_cmp(&nll(*b)))
        .unwrap_or(1.0)
}

/// A 95 % bootstrap interval (2.5th and 97.5th percentiles over `rounds` resamples of the
/// rows, seeded) of the macro-F1.
pub fn bootstrap_macro_f1(
    actual: &[usize],
    predicted: &[usize],
    n_classes: usize,
    rounds: usize,
    seed: u64,
) -> (f64, f64) {
    let n = actual.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mut rng = valence_model::rng::SeededNormal::new(seed);
    let mut f1s: Vec<f64> = (0..rounds)
        .map(|_| {
            let (mut a, mut p) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for _ in 0..n {
                let i = ((rng.uniform() * n as f64) as usize).min(n - 1);
                a.push(actual[i]);
                p.push(predicted[i]);
            }
            report(&a, &p, n_classes).macro_f1
        })
        .collect();
    f1s.sort_by(f64::total_cmp);
    let at = |q: f64| f1s[((q * (rounds - 1) as f64).round() as usize).min(rounds - 1)];
    (at(0.025), at(0.975))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_keeps_the_most_confident_and_reliability_bins_them() {
        // Confidences 0.95 (right), 0.8 (right), 0.6 (wrong), 0.4 (wrong).
        let probs = vec![
            vec![0.95, 0.03, 0.02],
            vec![0.1, 0.8, 0.1],
            vec![0.6, 0.3, 0.1],
            vec![0.3, 0.3, 0.4],
        ];
        let actual = [0, 1, 1, 0];
        let c = coverage(&probs, &actual, 3, &[1.0, 0.5]);
        assert_eq!((c[0].n, c[0].accuracy), (4, 0.5));
        assert_eq!((c[1].n, c[1].accuracy), (2, 1.0));
        assert!((c[1].min_confidence - 0.8).abs() < 1e-6);
        let bins = reliability(&probs, &actual, 10);
        assert_eq!(bins.len(), 4);
        assert_eq!(bins.iter().map(|b| b.n).sum::<usize>(), 4);
        // ECE is the support-weighted gap of those bins.
        let ece: f64 = bins
            .iter()
            .map(|b| (b.accuracy - b.confidence).abs() * b.n as f64 / 4.0)
            .sum();
        assert!((ece - expected_calibration_error(&probs, &actual, 10)).abs() < 1e-9);
    }

    #[test]
    fn matches_hand_computed_figures() {
        // actual:    0 0 1 1 2 2
        // predicted: 0 1 1 1 2 0
        let r = report(&[0, 0, 1, 1, 2, 2], &[0, 1, 1, 1, 2, 0], 3);
        assert_eq!(
            r.confusion,
            vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 1]]
        );
        assert!((r.accuracy - 4.0 / 6.0).abs() < 1e-12);
        // class 0: p=1/2 r=1/2 f=.5; class 1: p=2/3 r=1 f=.8; class 2: p=1 r=1/2 f=2/3
        assert!((r.per_class[1].f1 - 0.8).abs() < 1e-12);
        assert!((r.macro_f1 - (0.5 + 0.8 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert!((r.weighted_f1 - r.macro_f1).abs() < 1e-12, "equal supports");
    }

    #[test]
    fn perfect_and_empty() {
        let r = report(&[0, 1, 2], &[0, 1, 2], 3);
        assert_eq!((r.accuracy, r.macro_f1), (1.0, 1.0));
        let e = report(&[], &[], 3);
        assert_eq!(e.n, 0);
        assert_eq!(e.accuracy, 0.0);
    }

    #[test]
    fn calibration_error_and_temperature() {
        // Always 90 % sure and right 90 % of the time: calibrated.
        let probs: Vec<Vec<f32>> = (0..100).map(|_| vec![0.9, 0.05, 0.05]).collect();
        let actual: Vec<usize> = (0..100).map(|i| if i < 90 { 0 } else { 1 }).collect();
        assert!(expected_calibration_error(&probs, &actual, 15) < 1e-6);
        // Right only 60 % of the time: ECE 0.3, and a temperature above 1 softens it.
        let actual: Vec<usize> = (0..100).map(|i| if i < 60 { 0 } else { 1 }).collect();
        assert!((expected_calibration_error(&probs, &actual, 15) - 0.3).abs() < 1e-6);
        let t = fit_temperature(&probs, &actual);
        assert!(t > 1.5, "{t}");
        let scaled: Vec<Vec<f32>> = probs.iter().map(|p| with_temperature(p, t)).collect();
        assert!(expected_calibration_error(&scaled, &actual, 15) < 0.05);
        let p = with_temperature(&[0.7, 0.2, 0.1], 1.0);
        assert!((p[0] - 0.7).abs() < 1e-6);
    }

    #[test]
    fn bootstrap_interval_brackets_the_estimate() {
        let actual: Vec<usize> = (0..300).map(|i| i % 3).collect();
        let predicted: Vec<usize> = (0..300)
            .map(|i| if i % 5 == 0 { (i + 1) % 3 } else { i % 3 })
            .collect();
        let f1 = report(&actual, &predicted, 3).macro_f1;
        let (lo, hi) = bootstrap_macro_f1(&actual, &predicted, 3, 500, 1);
        assert!(lo < f1 && f1 < hi && hi - lo < 0.2, "{lo} {f1} {hi}");
        assert_eq!(bootstrap_macro_f1(&actual, &predicted, 3, 500, 1), (lo, hi));
    }
}
