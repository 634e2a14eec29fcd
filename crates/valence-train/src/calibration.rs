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
use valence_model::classifier::familiarity::FamiliarityTemperature;
use valence_model::manifest::Manifest;

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

/// `softmax(log p / T(d))` with the temperature line of [`FamiliarityTemperature`].
pub fn apply_familiarity(t: &FamiliarityTemperature, p: &[f32], distance: f32) -> Vec<f32> {
    Calibration {
        temperature: t.at(distance) as f64,
        bias: [0.0; 3],
    }
    .apply(p)
}

/// The temperature line `T = exp(intercept + slope * d)` (bounded as the model bounds it)
/// that minimises the mean negative log-likelihood of `probs` at their distances: a grid over
/// intercept in [-2, 2] and slope in [-1, 3], then a grid ten times finer around the best.
pub fn fit_familiarity(
    probs: &[Vec<f32>],
    distances: &[f32],
    actual: &[usize],
) -> FamiliarityTemperature {
    let logs: Vec<[f64; 3]> = probs
        .iter()
        .map(|p| std::array::from_fn(|c| (p[c].max(1e-12) as f64).ln()))
        .collect();
    let nll = |t: &FamiliarityTemperature| -> f64 {
        let mut sum = 0.0;
        for ((l, &d), &a) in logs.iter().zip(distances).zip(actual) {
            let s = 1.0 / t.at(d) as f64;
            let z: [f64; 3] = std::array::from_fn(|c| s * l[c]);
            let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            sum += lse - z[a];
        }
        sum / logs.len().max(1) as f64
    };
    let search = |a0: f64, b0: f64, da: f64, db: f64, n: i32| {
        let mut best = (
            f64::INFINITY,
            FamiliarityTemperature {
                intercept: a0,
                slope: b0,
            },
        );
        for i in -n..=n {
            for j in -n..=n {
                let t = FamiliarityTemperature {
                    intercept: a0 + i as f64 * da,
                    slope: b0 + j as f64 * db,
                };
                let v = nll(&t);
                if v < best.0 {
                    best = (v, t);
                }
            }
        }
        best.1
    };
    let coarse = search(0.0, 1.0, 0.1, 0.05, 20);
    search(coarse.intercept, coarse.slope, 0.01, 0.005, 10)
}

/// Mean ECE over groups (e.g. held-out corpora), and the largest.
pub fn ece_by_group(
    probs: &[Vec<f32>],
    actual: &[usize],
    groups: &[String],
    bins: usize,
) -> Vec<(String, f64)> {
    group_names(groups)
        .into_iter()
        .map(|g| {
            let idx: Vec<usize> = (0..groups.len()).filter(|&i| groups[i] == g).collect();
            let p: Vec<Vec<f32>> = idx.iter().map(|&i| probs[i].clone()).collect();
            let a: Vec<usize> = idx.iter().map(|&i| actual[i]).collect();
            let e = expected_calibration_error(&p, &a, bins);
            (g, e)
        })
        .collect()
}

/// Group names in order, each once.
fn group_names(groups: &[String]) -> Vec<String> {
    let mut names = groups.to_vec();
    names.sort();
    names.dedup();
    names
}

/// Each corpus's ECE on its leave-one-corpus-out predictions as calibrated by a fit made
/// without it: `calibrated(corpus, rows)` fits without `corpus` and returns the calibrated
/// probabilities of `rows` (that corpus's).
fn nested_ece(
    corpora: &[String],
    y: &[usize],
    bins: usize,
    calibrated: impl Fn(&str, &[usize]) -> Vec<Vec<f32>>,
) -> Vec<(String, f64)> {
    group_names(corpora)
        .into_iter()
        .map(|g| {
            let idx: Vec<usize> = (0..corpora.len()).filter(|&i| corpora[i] == g).collect();
            let a: Vec<usize> = idx.iter().map(|&i| y[i]).collect();
            let e = expected_calibration_error(&calibrated(&g, &idx), &a, bins);
            (g, e)
        })
        .collect()
}

/// Mean, largest and `name ece, ...` of per-group ECEs.
fn summary(per: &[(String, f64)]) -> (f64, f64, String) {
    let mean = per.iter().map(|p| p.1).sum::<f64>() / per.len().max(1) as f64;
    let max = per.iter().map(|p| p.1).fold(0.0, f64::max);
    let text = per
        .iter()
        .map(|(g, e)| format!("{g} {e:.3}"))
        .collect::<Vec<_>>()
        .join(", ");
    (mean, max, text)
}

/// One clip of `valence cv --predictions`: its corpus, label and both schemes' probabilities.
struct OutOfFold {
    corpus: String,
    label: usize,
    grouped: Vec<f32>,
    loco: Vec<f32>,
    /// Distance from the training corpora of the fold that held the clip out (grouped, LOCO),
    /// when the CSV carries them.
    distance: Option<[f32; 2]>,
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
    let distance_cols = match (col("grouped_distance"), col("loco_distance")) {
        (Ok(g), Ok(l)) => Some([g, l]),
        _ => None,
    };
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
        let distance = match distance_cols {
            Some([g, l]) => {
                let d = |c: usize| -> Result<f32> {
                    row.get(c)
                        .and_then(|v| v.parse::<f32>().ok())
                        .filter(|v| v.is_finite() && *v >= 0.0)
                        .with_context(|| {
                            format!("{} line {}: not a distance", path.display(), i + 2)
                        })
                };
                Some([d(g)?, d(l)?])
            }
            None => None,
        };
        out.push(OutOfFold {
            corpus: row.get(corpus).unwrap_or_default().to_string(),
            label,
            grouped: grouped.iter().map(|&c| num(c)).collect::<Result<_>>()?,
            loco: loco.iter().map(|&c| num(c)).collect::<Result<_>>()?,
            distance,
        });
    }
    if out.is_empty() {
        bail!("{} holds no predictions", path.display());
    }
    Ok(out)
}

/// What `valence calibrate` writes into a model directory, if anything.
#[derive(Debug, Clone, Copy, Default)]
pub struct CalibrateOptions<'a> {
    /// The model directory to calibrate.
    pub apply: Option<&'a Path>,
    /// Fold class biases with the temperature (fixed temperature only).
    pub class_bias: bool,
    /// Apply the temperature that follows the distance from the training corpora
    /// (`valence.json`'s `familiarity`) instead of a fixed one.
    pub familiarity: bool,
    /// The temperature the model's head already divides its raw logits by.
    pub current_temperature: f64,
}

/// `valence calibrate`: fits calibrations on `valence cv --predictions` (held-out speakers and
/// held-out corpora together), prints ECE before and after per scheme and per held-out corpus,
/// in-sample and with each corpus left out of the fit that scores it, and with `apply` writes
/// the chosen one into a model directory: a fixed temperature (and class biases) folded into
/// the head, or the familiarity temperature line into `valence.json`.
pub fn calibrate(predictions: &Path, opts: CalibrateOptions) -> Result<()> {
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
        let (mean, max, text) = summary(&ece_by_group(&on(c, &loco), &y, &corpora, BINS));
        println!(
            "{name:<32} {:>6.3} {:>22} {:>8.3} {mean:>8.3} {max:>8.3}  {text}",
            c.temperature,
            format!("{:.2} {:.2} {:.2}", c.bias[0], c.bias[1], c.bias[2]),
            ece(&on(c, &grouped), &y),
        );
    }
    // Honest LOCO: each corpus scored by a calibration fitted without it (its held-out
    // speakers and its LOCO predictions both left out).
    for with_bias in [false, true] {
        let per = nested_ece(&corpora, &y, BINS, |g, idx| {
            let (mut p, mut a) = (Vec::new(), Vec::new());
            for (i, r) in rows.iter().enumerate().filter(|(_, r)| r.corpus != g) {
                p.extend([r.grouped.clone(), r.loco.clone()]);
                a.extend([y[i], y[i]]);
            }
            let c = Calibration::fit(&p, &a, with_bias);
            idx.iter().map(|&i| c.apply(&loco[i])).collect()
        });
        let (mean, max, text) = summary(&per);
        println!(
            "nested (fitted without the corpus it scores), {}: LOCO mean {mean:.3}, max {max:.3}: {text}",
            if with_bias {
                "temperature + class bias"
            } else {
                "temperature"
            },
        );
    }
    let distances: Option<Vec<[f32; 2]>> = rows.iter().map(|r| r.distance).collect();
    let familiarity = match &distances {
        Some(d) => Some(report_familiarity(&rows, d, BINS)),
        None if opts.familiarity => bail!(
            "{} has no distance columns (grouped_distance, loco_distance): write it with \
             `valence cv --predictions` of this version, without --speaker-norm/--corpus-norm",
            predictions.display()
        ),
        None => None,
    };
    let Some(dir) = opts.apply else {
        return Ok(());
    };
    if opts.current_temperature <= 0.0 || !opts.current_temperature.is_finite() {
        bail!("--current-temperature must be positive");
    }
    match familiarity.filter(|_| opts.familiarity) {
        Some(line) => {
            let mut manifest = Manifest::read(dir)?;
            let spec = manifest.familiarity.as_mut().with_context(|| {
                format!(
                    "{} carries no training-corpus centroids (`familiarity`): train it with \
                     `valence train` of this version",
                    dir.display()
                )
            })?;
            // The line was fitted on raw probabilities; the head already divides by the
            // current temperature.
            let t = FamiliarityTemperature {
                intercept: line.intercept - opts.current_temperature.ln(),
                slope: line.slope,
            };
            spec.temperature = Some(t);
            manifest.write(dir)?;
            eprintln!(
                "familiarity temperature exp({:.3} + {:.3} d) written to {}",
                t.intercept,
                t.slope,
                dir.join(valence_model::manifest::MANIFEST_FILE).display()
            );
        }
        None => {
            let chosen = methods[if opts.class_bias { 4 } else { 3 }].1;
            chosen.fold_into(dir, opts.current_temperature)?;
            eprintln!(
                "calibration T {:.3}, bias {:?} folded into {}",
                chosen.temperature,
                chosen.bias,
                dir.join("head.safetensors").display()
            );
        }
    }
    Ok(())
}

/// Fits the familiarity temperature line on both schemes and prints its ECE like the fixed
/// calibrations', in-sample and nested; returns the line fitted on everything.
fn report_familiarity(rows: &[OutOfFold], d: &[[f32; 2]], bins: usize) -> FamiliarityTemperature {
    let y: Vec<usize> = rows.iter().map(|r| r.label).collect();
    let corpora: Vec<String> = rows.iter().map(|r| r.corpus.clone()).collect();
    let ece = |p: &[Vec<f32>], a: &[usize]| expected_calibration_error(p, a, bins);
    let fit_without = |skip: Option<&str>| {
        let (mut p, mut dist, mut a) = (Vec::new(), Vec::new(), Vec::new());
        for (i, r) in rows.iter().enumerate() {
            if Some(r.corpus.as_str()) != skip {
                p.extend([r.grouped.clone(), r.loco.clone()]);
                dist.extend(d[i]);
                a.extend([y[i], y[i]]);
            }
        }
        fit_familiarity(&p, &dist, &a)
    };
    let line = fit_without(None);
    let grouped: Vec<Vec<f32>> = rows
        .iter()
        .zip(d)
        .map(|(r, d)| apply_familiarity(&line, &r.grouped, d[0]))
        .collect();
    let loco: Vec<Vec<f32>> = rows
        .iter()
        .zip(d)
        .map(|(r, d)| apply_familiarity(&line, &r.loco, d[1]))
        .collect();
    let median = |v: &mut Vec<f32>| {
        v.sort_by(f32::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    println!(
        "temperature by familiarity, both: T = exp({:.3} + {:.3} d), median d {:.3} held-out \
         speakers, {:.3} held-out corpora",
        line.intercept,
        line.slope,
        median(&mut d.iter().map(|d| d[0]).collect()),
        median(&mut d.iter().map(|d| d[1]).collect()),
    );
    let (mean, max, text) = summary(&ece_by_group(&loco, &y, &corpora, bins));
    println!(
        "  grouped {:.3}, LOCO mean {mean:.3}, max {max:.3}: {text}",
        ece(&grouped, &y)
    );
    let nested = nested_ece(&corpora, &y, bins, |g, idx| {
        let l = fit_without(Some(g));
        idx.iter()
            .map(|&i| apply_familiarity(&l, &rows[i].loco, d[i][1]))
            .collect()
    });
    let (mean, max, text) = summary(&nested);
    println!(
        "  nested (fitted without the corpus it scores): LOCO mean {mean:.3}, max {max:.3}: {text}"
    );
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The class a uniform draw `u` picks from the probabilities `truth`.
    fn draw(truth: &[f32], u: f32) -> usize {
        if u < truth[0] {
            0
        } else if u < truth[0] + truth[1] {
            1
        } else {
            2
        }
    }

    #[test]
    fn fitting_recovers_a_known_temperature_and_bias() {
        // Labels drawn from softmax(z) with known logits; the model reports softmax(2 z - b).
        let mut rng = valence_model::rng::SeededNormal::new(1);
        let (mut probs, mut actual) = (Vec::new(), Vec::new());
        for _ in 0..3000 {
            let z: Vec<f32> = (0..3).map(|_| rng.sample()).collect();
            let truth = valence_model::softmax(&z);
            let u = rng.uniform() as f32;
            let a = draw(&truth, u);
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

    /// Clips whose reported probabilities are too sharp by a factor that grows with their
    /// distance: softmax(z / T(d)) with T(d) = exp(-0.3 + 0.8 d) is what the labels follow.
    fn distance_dependent(n: usize) -> (Vec<Vec<f32>>, Vec<f32>, Vec<usize>) {
        let mut rng = valence_model::rng::SeededNormal::new(7);
        let (mut probs, mut dist, mut actual) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let d = 2.0 * rng.uniform() as f32;
            let z: Vec<f32> = (0..3).map(|_| 2.0 * rng.sample()).collect();
            let t = (-0.3 + 0.8 * d as f64).exp() as f32;
            let truth = valence_model::softmax(&z.iter().map(|v| v / t).collect::<Vec<_>>());
            let u = rng.uniform() as f32;
            actual.push(draw(&truth, u));
            probs.push(valence_model::softmax(&z));
            dist.push(d);
        }
        (probs, dist, actual)
    }

    #[test]
    fn the_familiarity_line_is_recovered() {
        let (probs, dist, actual) = distance_dependent(6000);
        let line = fit_familiarity(&probs, &dist, &actual);
        assert!((line.intercept + 0.3).abs() < 0.15, "{line:?}");
        assert!((line.slope - 0.8).abs() < 0.15, "{line:?}");
        let after: Vec<Vec<f32>> = probs
            .iter()
            .zip(&dist)
            .map(|(p, &d)| apply_familiarity(&line, p, d))
            .collect();
        let fixed = Calibration::fit(&probs, &actual, false);
        let fixed_p: Vec<Vec<f32>> = probs.iter().map(|p| fixed.apply(p)).collect();
        // Far clips alone: one temperature for all cannot serve them, the line does.
        let far: Vec<usize> = (0..probs.len()).filter(|&i| dist[i] > 1.5).collect();
        let pick = |p: &[Vec<f32>]| far.iter().map(|&i| p[i].clone()).collect::<Vec<_>>();
        let a: Vec<usize> = far.iter().map(|&i| actual[i]).collect();
        let (e_line, e_fixed) = (
            expected_calibration_error(&pick(&after), &a, 15),
            expected_calibration_error(&pick(&fixed_p), &a, 15),
        );
        assert!(e_line < 0.6 * e_fixed, "{e_line} vs {e_fixed}");
    }

    #[test]
    fn calibrate_writes_the_line_into_a_model_with_centroids_only() {
        let dir = std::env::temp_dir().join(format!("valence-calibrate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        valence_model::synthetic::write_tiny_model(&dir, 5).unwrap();
        let (probs, dist, actual) = distance_dependent(600);
        let csv_path = dir.join("preds.csv");
        let write = |with_distance: bool| {
            let mut w = csv::Writer::from_path(&csv_path).unwrap();
            let mut h = vec![
                "path",
                "corpus",
                "valence",
                "grouped_negative",
                "grouped_neutral",
            ];
            h.extend([
                "grouped_positive",
                "loco_negative",
                "loco_neutral",
                "loco_positive",
            ]);
            if with_distance {
                h.extend(["grouped_distance", "loco_distance"]);
            }
            w.write_record(&h).unwrap();
            for i in 0..probs.len() {
                let mut r = vec![format!("c{i}.flac"), format!("corpus{}", i % 3)];
                r.push(LABELS[actual[i]].to_string());
                r.extend(probs[i].iter().chain(&probs[i]).map(|p| p.to_string()));
                if with_distance {
                    r.extend([(0.5 * dist[i]).to_string(), dist[i].to_string()]);
                }
                w.write_record(&r).unwrap();
            }
            w.flush().unwrap();
        };
        let opts = CalibrateOptions {
            apply: Some(&dir),
            familiarity: true,
            current_temperature: 1.0,
            ..Default::default()
        };
        write(false);
        let e = calibrate(&csv_path, opts).unwrap_err().to_string();
        assert!(e.contains("no distance columns"), "{e}");
        write(true);
        let e = format!("{:#}", calibrate(&csv_path, opts).unwrap_err());
        assert!(e.contains("no training-corpus centroids"), "{e}");

        let mut m = Manifest::read(&dir).unwrap();
        m.familiarity = Some(valence_model::classifier::familiarity::FamiliaritySpec {
            centroids: "familiarity.safetensors".into(),
            temperature: None,
        });
        m.write(&dir).unwrap();
        let head_before = std::fs::read(dir.join("head.safetensors")).unwrap();
        calibrate(
            &csv_path,
            CalibrateOptions {
                current_temperature: 2.0,
                ..opts
            },
        )
        .unwrap();
        let t = Manifest::read(&dir)
            .unwrap()
            .familiarity
            .unwrap()
            .temperature;
        let t = t.expect("a temperature line written");
        // Fitted on raw probabilities; the head already divides by 2.
        let raw = fit_familiarity(
            &probs
                .iter()
                .flat_map(|p| [p.clone(), p.clone()])
                .collect::<Vec<_>>(),
            &dist.iter().flat_map(|&d| [0.5 * d, d]).collect::<Vec<_>>(),
            &actual.iter().flat_map(|&a| [a, a]).collect::<Vec<_>>(),
        );
        assert!(
            (t.intercept - (raw.intercept - 2f64.ln())).abs() < 1e-9,
            "{t:?} {raw:?}"
        );
        assert_eq!(t.slope, raw.slope);
        assert_eq!(
            std::fs::read(dir.join("head.safetensors")).unwrap(),
            head_before
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
