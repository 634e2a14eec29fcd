//! `valence eval`: a model on labelled clips, each clip as one utterance (and, with
//! `--per-window`, as the element hears it), with per-language and per-corpus figures.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::Device;

use valence_model::LABELS;
use valence_train::commands::print_eval;
use valence_train::dataset;
use valence_train::metrics::{self, Coverage};
use valence_train::training as train;

/// Confidence bins of the calibration figures (ECE and the reliability diagram).
const BINS: usize = 15;
/// The shares of most confident clips the coverage table reports.
const SHARES: [f64; 3] = [1.0, 0.8, 0.5];

/// Prints ECE and the coverage table of one set of predictions.
fn print_calibration(title: &str, probs: &[Vec<f32>], y: &[usize]) -> (f64, Vec<Coverage>) {
    let ece = metrics::expected_calibration_error(probs, y, BINS);
    let cov = metrics::coverage(probs, y, 3, &SHARES);
    println!("{title}: ECE ({BINS} bins) {ece:.3}");
    println!(
        "  {:<22} {:>6} {:>15} {:>9} {:>9}",
        "most confident", "clips", "confidence >=", "accuracy", "macro-F1"
    );
    for c in &cov {
        println!(
            "  {:<22} {:>6} {:>15.3} {:>9.3} {:>9.3}",
            format!("{:.0} %", c.share * 100.0),
            c.n,
            c.min_confidence,
            c.accuracy,
            c.macro_f1
        );
    }
    (ece, cov)
}

/// `--per-window`: each clip also scored as the element hears it.
pub struct PerWindow {
    /// Leave out the windows the model's speech detector finds no speech in.
    pub speech_gate: bool,
}

/// `valence eval`: each clip as one utterance through the model.
pub fn eval(
    manifest: &Path,
    root: Option<&Path>,
    model: &str,
    device: &Device,
    json: Option<&Path>,
    plot: Option<&Path>,
    per_window: Option<PerWindow>,
) -> Result<()> {
    let (per_window, vad) = match per_window {
        Some(PerWindow { speech_gate }) => (true, speech_gate),
        None => (false, false),
    };
    let dir = valence_model::serving::registry::resolve_model(model)?;
    let m = valence_model::serving::registry::shared_model(&dir, device)?;
    if m.labels.iter().map(String::as_str).collect::<Vec<_>>() != LABELS {
        bail!("eval needs a negative/neutral/positive model");
    }
    let clips = dataset::read_manifest(manifest)?;
    let root = dataset::clip_root(manifest, root);
    let bar = indicatif::ProgressBar::new(clips.len() as u64);
    let mut pred = Vec::with_capacity(clips.len());
    let mut probs = Vec::with_capacity(clips.len());
    // Per window: each clip's window probabilities, and their mean.
    let (mut window_probs, mut mean_probs) = (Vec::new(), Vec::new());
    // Per window: the mean of the probabilities of the clip's element windows (the clip's own
    // when it has none).
    let (mut pred_windows, mut no_window) = (Vec::new(), 0usize);
    for c in &clips {
        let samples = valence_train::decode::decode_to_16k_mono(&root.join(&c.path))?;
        let p = m.classify(&samples).with_context(|| c.path.clone())?;
        pred.push(p.best().0);
        probs.push(p.probabilities.clone());
        if per_window {
            // The element's windows, silent ones and (with its detector) speechless ones out.
            let detector = m.speech_detector.as_ref().filter(|_| vad);
            let windows: Vec<Vec<f32>> = dataset::element_windows_with_speech(
                &samples,
                dataset::WINDOW_SILENCE_DBFS,
                detector,
                valence_model::speech::DEFAULT_THRESHOLD,
            )
            .into_iter()
            .filter(|(_, share)| {
                share.is_none_or(|s| s >= valence_model::speech::DEFAULT_MIN_SPEECH)
            })
            .map(|(w, _)| w)
            .collect();
            if windows.is_empty() {
                no_window += 1;
                pred_windows.push(p.best().0);
                mean_probs.push(p.probabilities.clone());
                window_probs.push(Vec::new());
            } else {
                let refs: Vec<&[f32]> = windows.iter().map(|w| w.as_slice()).collect();
                let mut mean = vec![0f32; 3];
                let mut each = Vec::with_capacity(refs.len());
                for r in m.classify_batch(&refs) {
                    let r = r.with_context(|| c.path.clone())?;
                    for (a, b) in mean.iter_mut().zip(&r.probabilities) {
                        *a += b / refs.len() as f32;
                    }
                    each.push(r.probabilities);
                }
                pred_windows.push(valence_model::argmax(&mean).0);
                mean_probs.push(mean);
                window_probs.push(each);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let y: Vec<usize> = clips.iter().map(|c| c.label().unwrap_or(0)).collect();
    let langs: Vec<String> = clips.iter().map(|c| c.language.clone()).collect();
    let corpora: Vec<String> = clips.iter().map(|c| c.corpus.clone()).collect();
    let e = train::evaluate(&y, &pred, &langs, &corpora, 3);
    print_eval(
        &format!("{} on {}, each clip whole", m.name, manifest.display()),
        &e,
    );
    let windowed = per_window.then(|| train::evaluate(&y, &pred_windows, &langs, &corpora, 3));
    if let Some(w) = &windowed {
        print_eval(
            &format!(
                "per window (the element's 3 s windows at a 1 s hop, silence left out, \
                 probabilities averaged per clip; {no_window} clips under 1 s or without a \
                 speech window taken whole)"
            ),
            w,
        );
    }
    let (ece, cov) = print_calibration("calibration, each clip whole", &probs, &y);
    let windowed_calibration = per_window
        .then(|| print_calibration("calibration per window (clip means)", &mean_probs, &y));
    println!("encoder weights: {}", m.encoder_weights);
    println!(
        "{:<10} {:>9} {:>9} {:>6}",
        "language", "accuracy", "macro-F1", "n"
    );
    for (g, f) in &e.per_language {
        println!("{g:<10} {:>9.3} {:>9.3} {:>6}", f.accuracy, f.macro_f1, f.n);
    }
    println!(
        "{:<10} {:>9.3} {:>9.3} {:>6}",
        "all", e.report.accuracy, e.report.macro_f1, e.report.n
    );
    if let Some(p) = json {
        let per_class: BTreeMap<&str, &valence_train::metrics::ClassMetrics> = LABELS
            .iter()
            .copied()
            .zip(e.report.per_class.iter())
            .collect();
        let v = serde_json::json!({
            "model": m.name,
            "accuracy": e.report.accuracy,
            "macro_f1": e.report.macro_f1,
            "weighted_f1": e.report.weighted_f1,
            "per_class": per_class,
            "confusion": e.report.confusion,
            "per_language": e.per_language,
            "per_corpus": e.per_corpus,
            "encoder_weights": m.encoder_weights,
            "clips": clips.iter().map(|c| &c.path).collect::<Vec<_>>(),
            "predictions": e.predictions,
            "probabilities": probs,
            "ece": ece,
            "coverage": cov,
            "reliability": metrics::reliability(&probs, &y, BINS),
            "per_window": windowed.as_ref().map(|w| serde_json::json!({
                "accuracy": w.report.accuracy,
                "macro_f1": w.report.macro_f1,
                "confusion": w.report.confusion,
                "per_corpus": w.per_corpus,
                "per_language": w.per_language,
                "clips_taken_whole": no_window,
                "predictions": w.predictions,
                "probabilities": mean_probs,
                "window_probabilities": window_probs,
                "ece": windowed_calibration.as_ref().map(|c| c.0),
                "coverage": windowed_calibration.as_ref().map(|c| &c.1),
            })),
        });
        std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
    }
    if let Some(p) = plot {
        let bars: Vec<(String, f64)> = e
            .per_language
            .iter()
            .map(|(l, f)| (l.clone(), f.macro_f1))
            .collect();
        let bins = metrics::reliability(&probs, &y, BINS);
        crate::plot::evaluation(&e.report.confusion, &LABELS, &bars, &bins, &m.name, p)?;
        eprintln!("plot written to {}", p.display());
    }
    Ok(())
}
