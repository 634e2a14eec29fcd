//! Calibration of a trained head for speech it never heard: a temperature, and optionally a
//! bias per class, fitted on out-of-fold probabilities of both held-out speakers (grouped CV)
//! and held-out corpora (leave-one-corpus-out), so that a confidence means the same on new
//! people of known corpora and on unheard languages and rooms.
//!
//! Both forms act on log-probabilities as they would on logits (`softmax(log p / T + b)` equals
//! `softmax(z / T + b)`: the log-sum-exp shift is the same for every class), so a fit on
//! `valence cv --predictions` folds exactly into the head's last layer.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};

use crate::metrics::expected_calibration_error;
use valence_model::LABELS;

/// `softmax(log p / temperature + bias)`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Calibration {
    pub temperature: f64,
    pub bias: [f64; 3],
}

impl Calibration {
    pub const NONE: Self = Self {
        temperature: 1.0,
        bias: [0.0; 3],
    };

    pub fn apply(&self, p: &[f32]) -> Vec<f32> {
        let z: Vec<f64> = p
            .iter()
            .zip(&self.bias)
            .map(|(&v, b)| (v.max(1e-12) as f64).ln() / self.temperature + b)
            .collect();
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| (v / s) as f32).collect()
    }

    /// The temperature (and, with `with_bias`, the class biases, the first held at 0) that
    /// minimise the mean negative log-likelihood: a convex problem in `1 / T` and `b`, solved
    /// by gradient descent.
    pub fn fit(probs: &[Vec<f32>], actual: &[usize], with_bias: bool) -> Self {
        let logs: Vec<[f64; 3]> = probs
            .iter()
            .map(|p| std::array::from_fn(|c| (p[c].max(1e-12) as f64).ln()))
            .collect();
        let n = logs.len().max(1) as f64;
        let (mut s, mut b) = (1.0f64, [0.0f64; 3]);
        for _ in 0..4000 {
            let (mut gs, mut gb) = (0.0, [0.0; 3]);
            for (l, &a) in logs.iter().zip(actual) {
                let z: [f64; 3] = std::array::from_fn(|c| s * l[c] + b[c]);
                let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: [f64; 3] = std::array::from_fn(|c| (z[c] - m).exp());
                let sum: f64 = e.iter().sum();
                for c in 0..3 {
                    let d = e[c] / sum - (c == a) as u8 as f64;
                    gs += d * l[c];
                    gb[c] += d;
                }
            }
            s = (s - 0.05 * gs / n).clamp(0.05, 20.0);
            if with_bias {
                for c in 1..3 {
                    b[c] -= 0.5 * (gb[c] - gb[0]) / n;
                }
            }
        }
        Self {
            temperature: 1.0 / s,
            bias: b,
        }
    }

    /// Folds the calibration into a model directory's MLP head (`head.safetensors`), whose
    /// logits are the raw ones divided by `current_temperature`.
    pub fn fold_into(&self, model_dir: &Path, current_temperature: f64) -> Result<()> {
        let path = model_dir.join("head.safetensors");
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let last = (0..16)
            .rev()
            .find(|i| tensors.contains_key(&format!("classifier.{i}.weight")))
            .context("the head has no classifier layers")?;
        let (wk, bk) = (
            format!("classifier.{last}.weight"),
            format!("classifier.{last}.bias"),
        );
        let scale = current_temperature / self.temperature;
        let w = (tensors.get(&wk).context("no last weight")? * scale)?;
        let b0 = (tensors.get(&bk).context("no last bias")? * scale)?;
        if b0.dims() != [3] {
            bail!("the head's last layer has {:?} outputs, not 3", b0.dims());
        }
        let bias = Tensor::new(&self.bias.map(|v| v as f32), &Device::Cpu)?;
        tensors.insert(wk, w);
        tensors.insert(bk, (b0 + bias)?);
        candle_core::safetensors::save(&tensors, &path)?;
        Ok(())
    }
}

/// Mean ECE over groups (e.g. held-out corpora), and the largest.
pub fn ece_by_group(
    probs: &[Vec<f32>],
    actual: &[usize],
    groups: &[String],
    bins: usize,
) -> Vec<(String, f64)> {
    let mut names: Vec<&String> = groups.iter().collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|g| {
            let idx: Vec<usize> = (0..groups.len()).filter(|&i| &groups[i] == g).collect();
            let p: Vec<Vec<f32>> = idx.iter().map(|&i| probs[i].clone()).collect();
            let a: Vec<usize> = idx.iter().map(|&i| actual[i]).collect();
            (g.clone(), expected_calibration_error(&p, &a, bins))
        })
        .collect()
}

/// One clip of `valence cv --predictions`: its corpus, label and both schemes' probabilities.
struct OutOfFold {
    corpus: String,
    label: usize,
    grouped: Vec<f32>,
    loco: Vec<f32>,
}

fn read_out_of_fold(path: &Path) -> Result<Vec<OutOfFold>> {
    let mut r = csv::Reader::from_path(path)
        .with_context(|| format!("cannot read predictions {}", path.display()))?;
    let headers = r.headers()?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("{} has no column `{name}`", path.display()))
    };
    let corpus = col("corpus")?;
    let valence = col("valence")?;
    let grouped: Vec<usize> = LABELS
        .iter()
        .map(|l| col(&format!("grouped_{l}")))
        .collect::<Result<_>>()?;
    let loco: Vec<usize> = LABELS
        .iter()
        .map(|l| col(&format!("loco_{l}")))
        .collect::<Result<_>>()?;
    let mut out = Vec::new();
    for (i, row) in r.records().enumerate() {
        let row = row?;
        let num = |c: usize| -> Result<f32> {
            row.get(c)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{} line {}: not a probability", path.display(), i + 2))
        };
        let label = LABELS
            .iter()
            .position(|l| Some(*l) == row.get(valence))
            .with_context(|| format!("{} line {}: unknown valence", path.display(), i + 2))?;
        out.push(OutOfFold {
            corpus: row.get(corpus).unwrap_or_default().to_string(),
            label,
            grouped: grouped.iter().map(|&c| num(c)).collect::<Result<_>>()?,
            loco: loco.iter().map(|&c| num(c)).collect::<Result<_>>()?,
        });
    }
    if out.is_empty() {
        bail!("{} holds no predictions", path.display());
    }
    Ok(out)
}

/// `valence calibrate`: fits calibrations on `valence cv --predictions` (held-out speakers and
/// held-out corpora together), prints ECE before and after per scheme and per held-out corpus,
/// in-sample and with each corpus left out of the fit that scores it, and with `apply` folds
/// the chosen one into a model directory's head.
pub fn calibrate(predictions: &Path, apply: Option<(&Path, bool, f64)>) -> Result<Calibration> {
    const BINS: usize = 15;
    let rows = read_out_of_fold(predictions)?;
    let y: Vec<usize> = rows.iter().map(|r| r.label).collect();
    let corpora: Vec<String> = rows.iter().map(|r| r.corpus.clone()).collect();
    let grouped: Vec<Vec<f32>> = rows.iter().map(|r| r.grouped.clone()).collect();
    let loco: Vec<Vec<f32>> = rows.iter().map(|r| r.loco.clone()).collect();
    let both: Vec<Vec<f32>> = grouped.iter().chain(&loco).cloned().collect();
    let y2: Vec<usize> = y.iter().chain(&y).copied().collect();
    let ece = |p: &[Vec<f32>], a: &[usize]| expected_calibration_error(p, a, BINS);
    let on = |c: &Calibration, p: &[Vec<f32>]| -> Vec<Vec<f32>> {
        p.iter().map(|v| c.apply(v)).collect()
    };
    let methods: Vec<(&str, Calibration)> = vec![
        ("none", Calibration::NONE),
        (
            "temperature, held-out speakers",
            Calibration::fit(&grouped, &y, false),
        ),
        (
            "temperature, held-out corpora",
            Calibration::fit(&loco, &y, false),
        ),
        ("temperature, both", Calibration::fit(&both, &y2, false)),
        (
            "temperature + class bias, both",
            Calibration::fit(&both, &y2, true),
        ),
    ];
    println!(
        "{} clips; ECE with {BINS} bins; LOCO per corpus is each held-out corpus's own ECE",
        rows.len()
    );
    println!(
        "{:<32} {:>6} {:>22} {:>8} {:>8} {:>8}  per corpus",
        "calibration", "T", "bias (neg, neu, pos)", "grouped", "LOCO", "LOCO max"
    );
    for (name, c) in &methods {
        let per = ece_by_group(&on(c, &loco), &y, &corpora, BINS);
        let mean = per.iter().map(|p| p.1).sum::<f64>() / per.len().max(1) as f64;
        let max = per.iter().map(|p| p.1).fold(0.0, f64::max);
        println!(
            "{name:<32} {:>6.3} {:>22} {:>8.3} {:>8.3} {:>8.3}  {}",
            c.temperature,
            format!("{:.2} {:.2} {:.2}", c.bias[0], c.bias[1], c.bias[2]),
            ece(&on(c, &grouped), &y),
            mean,
            max,
            per.iter()
                .map(|(g, e)| format!("{g} {e:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // Honest LOCO: each corpus scored by a calibration fitted without it (its held-out
    // speakers and its LOCO predictions both left out).
    let mut names: Vec<&String> = corpora.iter().collect();
    names.sort();
    names.dedup();
    for with_bias in [false, true] {
        let mut per = Vec::new();
        for g in &names {
            let (mut p, mut a) = (Vec::new(), Vec::new());
            for (i, r) in rows.iter().enumerate() {
                if &r.corpus != *g {
                    p.push(r.grouped.clone());
                    p.push(r.loco.clone());
                    a.extend([y[i], y[i]]);
                }
            }
            let c = Calibration::fit(&p, &a, with_bias);
            let idx: Vec<usize> = (0..rows.len()).filter(|&i| &corpora[i] == *g).collect();
            let held: Vec<Vec<f32>> = idx.iter().map(|&i| c.apply(&loco[i])).collect();
            let act: Vec<usize> = idx.iter().map(|&i| y[i]).collect();
            per.push(((*g).clone(), ece(&held, &act)));
        }
        let mean = per.iter().map(|p| p.1).sum::<f64>() / per.len() as f64;
        println!(
            "nested (fitted without the corpus it scores), {}: LOCO mean {mean:.3}, max {:.3}: {}",
            if with_bias {
                "temperature + class bias"
            } else {
                "temperature"
            },
            per.iter().map(|p| p.1).fold(0.0, f64::max),
            per.iter()
                .map(|(g, e)| format!("{g} {e:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let chosen = methods[if apply.is_some_and(|a| a.1) { 4 } else { 3 }].1;
    if let Some((dir, _, current)) = apply {
        chosen.fold_into(dir, current)?;
        eprintln!(
            "calibration T {:.3}, bias {:?} folded into {}",
            chosen.temperature,
            chosen.bias,
            dir.join("head.safetensors").display()
        );
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitting_recovers_a_known_temperature_and_bias() {
        // Labels drawn from softmax(z) with known logits; the model reports softmax(2 z - b).
        let mut rng = valence_model::rng::SeededNormal::new(1);
        let (mut probs, mut actual) = (Vec::new(), Vec::new());
        for _ in 0..3000 {
            let z: Vec<f32> = (0..3).map(|_| rng.sample()).collect();
            let truth = valence_model::softmax(&z);
            let u = rng.uniform() as f32;
            let a = if u < truth[0] {
                0
            } else if u < truth[0] + truth[1] {
                1
            } else {
                2
            };
            let reported: Vec<f32> = [2.0 * z[0], 2.0 * z[1] - 0.5, 2.0 * z[2] + 0.3].to_vec();
            probs.push(valence_model::softmax(&reported));
            actual.push(a);
        }
        let c = Calibration::fit(&probs, &actual, true);
        assert!((c.temperature - 2.0).abs() < 0.25, "{c:?}");
        assert!(
            (c.bias[1] - 0.25).abs() < 0.2 && (c.bias[2] + 0.15).abs() < 0.2,
            "{c:?}"
        );
        let before = expected_calibration_error(&probs, &actual, 15);
        let after: Vec<Vec<f32>> = probs.iter().map(|p| c.apply(p)).collect();
        assert!(expected_calibration_error(&after, &actual, 15) < before / 2.0);
        assert_eq!(Calibration::NONE.apply(&[0.2, 0.3, 0.5]).len(), 3);
    }
}
