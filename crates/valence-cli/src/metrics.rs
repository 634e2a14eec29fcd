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
/// let r = valence_cli::metrics::report(&[0, 1, 2, 2], &[0, 1, 2, 1], 3);
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
