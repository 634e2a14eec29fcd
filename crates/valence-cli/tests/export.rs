//! `valence export triton`: the exported ONNX graph, run by ONNX Runtime, against the
//! project's own candle model on the same windows (f32 weights on both sides).
//!
//! ONNX Runtime comes from PyPI: `VALENCE_TEST_PYTHON` names a Python that has it (CI sets it to
//! the venv `scripts/triton-venv.sh` makes). Without it these tests skip with a message.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use common::{fixtures, read_wav_i16, shared_data};
use valence_cli::export::{TritonBatching, export_triton, model_to_onnx};
use valence_model::ValenceModel;
use valence_model::classifier::familiarity::{
    Familiarity, FamiliaritySpec, FamiliarityTemperature,
};
use valence_model::classifier::head::{Activation, HeadConfig, MlpHeadConfig};
use valence_model::classifier::scaler::StandardScaler;
use valence_model::manifest::{Combine, FeatureSource, Manifest, Pooling};
use valence_model::rng::SeededNormal;
use valence_model::serving::registry;
use valence_model::synthetic::{random_head_tensors, write_tiny_model};

/// What the difference in any probability may be.
const TOLERANCE: f32 = 1e-3;

fn python() -> Option<String> {
    match std::env::var("VALENCE_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            eprintln!(
                "SKIPPED: VALENCE_TEST_PYTHON is not set to a Python with onnxruntime \
                 (`bash scripts/triton-venv.sh` makes one; CI sets it)"
            );
            None
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("valence-export-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// ONNX Runtime's probabilities for `windows` (all of one length) through `onnx`.
fn run_onnx(python: &str, onnx: &Path, windows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let raw = onnx.with_extension("f32");
    let bytes: Vec<u8> = windows
        .iter()
        .flatten()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(&raw, bytes).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/onnx_run.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(onnx)
        .arg(&raw)
        .arg(windows.len().to_string())
        .output()
        .expect("VALENCE_TEST_PYTHON does not run");
    assert!(
        out.status.success(),
        "onnx_run.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Speech-like test windows: a noisy harmonic tone with a loud and a quiet stretch (so voiced
/// pooling drops frames), silence, and white noise.
fn windows(len: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = SeededNormal::new(seed);
    let tone: Vec<f32> = (0..len)
        .map(|i| {
            let t = i as f32 / 16000.0;
            let env = if (i / 4000) % 3 == 0 { 0.001 } else { 0.3 };
            env * ((2.0 * std::f32::consts::PI * 140.0 * t).sin()
                + 0.5 * (2.0 * std::f32::consts::PI * 280.0 * t).sin())
                + 0.01 * rng.sample()
        })
        .collect();
    let noise: Vec<f32> = (0..len).map(|_| 0.1 * rng.sample()).collect();
    vec![tone, vec![0.0; len], noise]
}

/// The candle model with f32 encoder weights (an 8-bit manifest exports f32 weights).
fn load_f32(dir: &Path) -> ValenceModel {
    let mut m = Manifest::read(dir).unwrap();
    m.encoder.quantize = None;
    m.load(dir, &Device::Cpu).unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// Exports `dir`, runs `windows` through both, and returns the largest difference.
fn compare(python: &str, dir: &Path, windows: &[Vec<f32>]) -> f32 {
    let onnx = dir.join("model.onnx");
    std::fs::write(&onnx, model_to_onnx(dir).unwrap()).unwrap();
    candle_vs_onnx(python, &load_f32(dir), &onnx, windows)
}

/// The largest difference between the candle model's and ONNX Runtime's probabilities for
/// `windows` (all of one length).
fn candle_vs_onnx(python: &str, model: &ValenceModel, onnx: &Path, windows: &[Vec<f32>]) -> f32 {
    let refs: Vec<&[f32]> = windows.iter().map(|w| w.as_slice()).collect();
    let want: Vec<Vec<f32>> = model
        .classify_batch(&refs)
        .into_iter()
        .map(|p| p.unwrap().probabilities)
        .collect();
    max_diff(&want, &run_onnx(python, onnx, windows))
}

/// Rewrites the tiny model's features and gives it an MLP head and scaler of the new width.
fn reshape_tiny_model(dir: &Path, source: FeatureSource, combine: Combine, pooling: Pooling) {
    let mut m = Manifest::read(dir).unwrap();
    m.features.source = source;
    m.features.combine = combine;
    m.features.pooling = pooling;
    if source == FeatureSource::LastHiddenState {
        m.features.layers.clear();
    }
    let width = 64; // the tiny encoder's d_model
    let dim = m.features.dim(width);
    let head = HeadConfig::Mlp(MlpHeadConfig {
        input_dim: dim,
        hidden: vec![24],
        dropout: 0.0,
        head_activation: Activation::Gelu,
        num_classes: 3,
    });
    std::fs::write(
        dir.join("head_config.json"),
        serde_json::to_string(&head).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(
        &random_head_tensors(&head, 77).unwrap(),
        dir.join("head.safetensors"),
    )
    .unwrap();
    let mut rng = SeededNormal::new(78);
    let mean = (0..dim).map(|_| 0.1 * rng.sample()).collect();
    let scale = (0..dim).map(|_| 0.5 + 0.5 * rng.sample().abs()).collect();
    StandardScaler::new(mean, scale)
        .unwrap()
        .save_safetensors(&dir.join("scaler.safetensors"))
        .unwrap();
    m.write(dir).unwrap();
}

/// Every feature layout and both head kinds, on windows of two lengths.
#[test]
fn exported_graph_matches_candle_on_synthetic_models() {
    let Some(python) = python() else { return };
    let layouts = [
        None, // as written: layers 1,2 averaged, mean pooling, Transformer head
        Some((
            FeatureSource::HiddenStates,
            Combine::Concat,
            Pooling::VoicedMean,
        )),
        Some((
            FeatureSource::LastHiddenState,
            Combine::Mean,
            Pooling::MeanStd,
        )),
    ];
    for (i, layout) in layouts.into_iter().enumerate() {
        let dir = scratch(&format!("tiny{i}"));
        write_tiny_model(&dir, 40 + i as u64).unwrap();
        let d = std::fs::read_to_string(dir.join("encoder/config.json")).unwrap();
        assert!(
            d.contains("\"d_model\": 64") || d.contains("\"d_model\":64"),
            "{d}"
        );
        if let Some((s, c, p)) = layout {
            reshape_tiny_model(&dir, s, c, p);
        }
        for len in [48000, 16000 + 37] {
            let diff = compare(&python, &dir, &windows(len, i as u64));
            eprintln!("layout {i}, {len} samples: max |difference| {diff:.2e}");
            assert!(diff <= TOLERANCE, "layout {i}, {len} samples: {diff}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A model whose temperature follows the distance from training-corpus centroids: the graph
/// divides the logits as candle does, and the division changes the probabilities.
#[test]
fn exported_graph_carries_the_familiarity_temperature() {
    let Some(python) = python() else { return };
    let dir = scratch("familiarity");
    write_tiny_model(&dir, 44).unwrap();
    reshape_tiny_model(
        &dir,
        FeatureSource::HiddenStates,
        Combine::Concat,
        Pooling::VoicedMean,
    );
    let plain = load_f32(&dir);
    let ws = windows(48000, 9);
    // Centroids: two of the windows' own scaled features, so distances differ widely.
    let scaled: Vec<Vec<f32>> = ws
        .iter()
        .map(|w| {
            let f = plain.features(w).unwrap();
            let mut r = f.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            plain.scaler.as_ref().unwrap().transform_vec(&mut r);
            r
        })
        .collect();
    let groups = vec!["a".to_string(), "b".to_string()];
    let mut fam = Familiarity::fit(&scaled[..2], &groups).unwrap();
    let d: Vec<f32> = scaled.iter().map(|r| fam.distance(r)).collect();
    let (lo, hi) = (
        d.iter().copied().fold(f32::INFINITY, f32::min),
        d.iter().copied().fold(0.0, f32::max),
    );
    assert!(hi > lo, "{d:?}");
    // T from 0.7 at the nearest window to 3 at the farthest.
    let slope = (3.0f64 / 0.7).ln() / (hi - lo) as f64;
    fam.temperature = Some(FamiliarityTemperature {
        intercept: 0.7f64.ln() - slope * lo as f64,
        slope,
    });
    fam.save(&dir.join("familiarity.safetensors")).unwrap();
    let mut m = Manifest::read(&dir).unwrap();
    m.familiarity = Some(FamiliaritySpec {
        centroids: "familiarity.safetensors".into(),
        temperature: fam.temperature,
    });
    m.write(&dir).unwrap();
    let calibrated = load_f32(&dir);
    let refs: Vec<&[f32]> = ws.iter().map(|w| w.as_slice()).collect();
    let probs = |m: &ValenceModel| -> Vec<Vec<f32>> {
        m.classify_batch(&refs)
            .into_iter()
            .map(|p| p.unwrap().probabilities)
            .collect()
    };
    let moved = max_diff(&probs(&plain), &probs(&calibrated));
    assert!(moved > 1e-2, "the temperature changed nothing: {moved}");
    let diff = compare(&python, &dir, &ws);
    eprintln!("familiarity temperature: max |difference| {diff:.2e} (moved {moved:.3})");
    assert!(diff <= TOLERANCE, "{diff}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The repository layout Triton reads, and refusals of what cannot be exported.
#[test]
fn triton_repository_layout_and_refusals() {
    let dir = scratch("layout");
    write_tiny_model(&dir, 50).unwrap();
    let repo = dir.join("repo");
    let batching = TritonBatching {
        max_batch_size: 32,
        max_queue_delay_us: 1500,
    };
    export_triton(&dir, &repo, "valence-tiny", batching).unwrap();
    let config = std::fs::read_to_string(repo.join("valence-tiny/config.pbtxt")).unwrap();
    for want in [
        "name: \"valence-tiny\"",
        "max_batch_size: 32",
        "max_queue_delay_microseconds: 1500",
        "dims: [ 3 ]",
        "negative,neutral,positive",
    ] {
        assert!(
            config.contains(want),
            "config.pbtxt lacks `{want}`:\n{config}"
        );
    }
    assert!(repo.join("valence-tiny/1/model.onnx").is_file());
    assert!(export_triton(&dir, &repo, "../escape", batching).is_err());

    let mut m = Manifest::read(&dir).unwrap();
    m.features.prosody = true;
    m.write(&dir).unwrap();
    let err = model_to_onnx(&dir).unwrap_err().to_string();
    assert!(err.contains("prosodic"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The installed default model (f32 weights) on the fixture clip and shared clips: what the
/// issue's 1e-3 is about. Needs `valence setup`; shared clips need ../shared.
#[test]
fn exported_default_model_matches_candle_on_real_speech() {
    let Some(python) = python() else { return };
    let Ok(installed) = registry::resolve_model(registry::DEFAULT_MODEL) else {
        eprintln!("SKIPPED: the default model is not installed (run `valence setup`)");
        return;
    };
    let dir = scratch("default");
    let onnx = dir.join("model.onnx");
    std::fs::write(&onnx, model_to_onnx(&installed).unwrap()).unwrap();
    let model = load_f32(&installed);
    let mut clips = vec![read_wav_i16(&fixtures().join("speechlike.wav"))];
    if let Some(data) = shared_data() {
        let manifest = valence_train::dataset::read_manifest(&data.join("manifest.csv")).unwrap();
        for clip in manifest.iter().step_by(manifest.len() / 6).take(6) {
            clips.push(valence_train::decode::decode_to_16k_mono(&data.join(&clip.path)).unwrap());
        }
    }
    let mut worst = 0f32;
    for samples in &clips {
        // The element's windows: 3 s (or the whole clip when shorter), 1 s hop.
        let len = samples.len().min(48000);
        let ws: Vec<Vec<f32>> = (0..=(samples.len() - len) / 16000)
            .map(|i| samples[i * 16000..i * 16000 + len].to_vec())
            .take(4)
            .collect();
        worst = worst.max(candle_vs_onnx(&python, &model, &onnx, &ws));
    }
    eprintln!(
        "default model, {} clips: max |difference| {worst:.2e}",
        clips.len()
    );
    assert!(worst <= TOLERANCE, "{worst}");
    std::fs::remove_dir_all(&dir).unwrap();
}
