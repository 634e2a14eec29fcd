//! The shipped default model (Whisper base + our head) on real speech from ../shared/data.
//! These need `valence setup` (the imported encoder) and the shared data; without either they
//! skip with a message. CI runs the setup first, so there they always run.
//!
//! Re-record the expectations after retraining the head, or after changing the rounding of an
//! f32 step the 8-bit encoder feeds on (its 7-bit activations then round differently: the packed
//! conv1 and pooled layer-norm kernels moved these clips' probabilities by up to 0.015, no label):
//! `VALENCE_RECORD_EXPECTATIONS=1 cargo test --release --test default_model`

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{expectations_file, fixtures, max_abs_diff, read_wav_i16, rms, shared_data};
use valence_model::classifier::head::{HeadConfig, MlpHeadConfig, head_from_tensors};
use valence_model::manifest::{Combine, FeatureSource, FeatureSpec, Pooling};
use valence_model::serving::registry;
use valence_train::dataset::{self, Clip};
use valence_train::training::{SideLabels, TrainConfig, train};

fn encoder_dir() -> Option<PathBuf> {
    let d = registry::cache_dir().join("encoders/whisper-base");
    if d.join("model.safetensors").is_file() {
        Some(d)
    } else {
        eprintln!("SKIPPED: the Whisper base encoder is not imported (run `valence setup`)");
        None
    }
}

fn init() {
    gst::init().unwrap();
}

#[test]
fn whisper_base_import_matches_ctranslate2() {
    let Some(dir) = encoder_dir() else { return };
    let enc =
        valence_model::encoders::whisper::WhisperEncoder::load_dir(&dir, DType::F32, &Device::Cpu)
            .unwrap();
    let audio = read_wav_i16(&fixtures().join("speechlike.wav"));
    let out = enc.encode(&audio).unwrap();
    let r = candle_core::safetensors::load(
        fixtures().join("whisper_base_ct2_reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let reference = &r["last_hidden_state"];
    let scale = reference
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = max_abs_diff(&out.last_hidden_state.squeeze(0).unwrap(), reference);
    // CTranslate2 and candle sum in different orders over fp16-derived weights.
    assert!(
        d < 1e-4 * scale.max(1.0) * 10.0,
        "differs by {d} (scale {scale})"
    );
}

/// The 8-bit encoder the default model runs on the CPU stays close to the f32 one, layer by
/// layer, and gives nearly the same pooled features (measured: 0.4-7.6 % RMS over layers 0-4,
/// pooled cosine >= 0.9996; a broken quantized path would drift far more than rounding does).
#[test]
fn int8_whisper_base_stays_close_to_f32() {
    let Some(dir) = encoder_dir() else { return };
    let dense =
        valence_model::encoders::whisper::WhisperEncoder::load_dir(&dir, DType::F32, &Device::Cpu)
            .unwrap();
    let mut quantized =
        valence_model::encoders::whisper::WhisperEncoder::load_dir(&dir, DType::F32, &Device::Cpu)
            .unwrap();
    quantized
        .quantize(valence_model::serving::runtime::int8_kernel())
        .unwrap();
    let audio = read_wav_i16(&fixtures().join("speechlike.wav"));
    let (a, b) = (
        dense.encode_upto(&audio, Some(4)).unwrap(),
        quantized.encode_upto(&audio, Some(4)).unwrap(),
    );
    for (layer, (x, y)) in a.hidden_states.iter().zip(&b.hidden_states).enumerate() {
        let rel = rms(&(x - y).unwrap()) / rms(x);
        assert!(rel < 0.1, "layer {layer}: relative RMS error {rel}");
        let (px, py) = (x.mean(1).unwrap(), y.mean(1).unwrap());
        let dot = (&px * &py)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let cos = dot / (rms(&px) * rms(&py) * px.elem_count() as f32);
        eprintln!("layer {layer}: relative RMS error {rel:.4}, pooled cosine {cos:.6}");
        assert!(cos > 0.999, "layer {layer}: pooled cosine {cos}");
    }
}

/// A few clips per class from different speakers and corpora.
fn some_clips(data: &std::path::Path, per_class: usize) -> Vec<Clip> {
    let clips = dataset::read_manifest(&data.join("manifest.csv")).unwrap();
    let mut out: Vec<Clip> = Vec::new();
    for label in valence_model::LABELS {
        let mut speakers = std::collections::BTreeSet::new();
        for c in clips.iter().filter(|c| c.valence == label) {
            if speakers.insert(c.speaker.clone()) {
                out.push(c.clone());
            }
            if speakers.len() == per_class {
                break;
            }
        }
    }
    out
}

#[test]
fn shipped_model_predictions_match_recorded_expectations() {
    let (Some(_), Some(data)) = (encoder_dir(), shared_data()) else {
        return;
    };
    init();
    let dir =
        registry::resolve_model("default").expect("`valence setup` installs the default model");
    let model = registry::shared_model(&dir, &Device::Cpu).unwrap();
    let clips = some_clips(&data, 3);
    let mut got = Vec::new();
    for c in &clips {
        let samples = valence_train::decode::decode_to_16k_mono(&data.join(&c.path)).unwrap();
        let p = model.classify(&samples).unwrap();
        got.push(serde_json::json!({
            "path": c.path, "valence": c.valence,
            "predicted": model.labels[p.best().0], "probabilities": p.probabilities,
        }));
    }
    let path = expectations_file();
    if std::env::var_os("VALENCE_RECORD_EXPECTATIONS").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(&got).unwrap()).unwrap();
        return;
    }
    let expected: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g["path"], e["path"]);
        assert_eq!(g["predicted"], e["predicted"], "{}", g["path"]);
        for (a, b) in g["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .zip(e["probabilities"].as_array().unwrap())
        {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            // Every 8-bit kernel gives the same features (kernels::int8) and the f32 kernels
            // around them add in a fixed order; what is left is float summation order in f32
            // parts that may split work differently by thread count, far below this.
            assert!((a - b).abs() < 1e-3, "{}: {a} vs {b}", g["path"]);
        }
    }
    // The shipped model gets most of these (training) clips right; a broken pipeline would not.
    let right = got
        .iter()
        .filter(|g| g["predicted"] == g["valence"])
        .count();
    assert!(
        right * 3 >= got.len() * 2,
        "only {right} of {} right",
        got.len()
    );
}

/// With prosodic statistics appended, a corpus adversary (gradient reversal) and an auxiliary
/// emotion classifier on.
#[test]
fn training_a_head_on_a_few_shared_clips_lowers_the_loss_and_round_trips() {
    let (Some(enc), Some(data)) = (encoder_dir(), shared_data()) else {
        return;
    };
    init();
    let clips = some_clips(&data, 6);
    let cache = std::env::temp_dir().join(format!("valence-train-test-{}", std::process::id()));
    let table = dataset::features(&clips, &data, &enc, None, &cache, &Device::Cpu).unwrap();
    let spec = FeatureSpec {
        source: FeatureSource::HiddenStates,
        layers: vec![2, 3, 4],
        combine: Combine::Concat,
        pooling: Pooling::Mean,
        prosody: true,
    };
    // The encoder states, then the prosodic statistics (as `valence train --prosody` builds rows).
    let mut x = table.select(&spec).unwrap();
    let prosody = dataset::prosody_features(&clips, &data, &cache).unwrap();
    for (row, p) in x.iter_mut().zip(prosody) {
        row.extend(p);
    }
    assert_eq!(x[0].len(), spec.dim(512));
    let y: Vec<usize> = clips.iter().map(|c| c.label().unwrap()).collect();
    let speakers: Vec<String> = clips.iter().map(|c| c.speaker.clone()).collect();
    // A corpus adversary behind gradient reversal (the clips come from several corpora).
    let corpora: Vec<&str> = clips.iter().map(|c| c.corpus.as_str()).collect();
    let domains: Vec<usize> = corpora
        .iter()
        .map(|c| corpora.iter().position(|o| o == c).unwrap())
        .collect();
    assert!(domains.iter().any(|&d| d != domains[0]), "one corpus only");
    // And an auxiliary classifier of the clips' emotion categories.
    let emotions = dataset::emotion_labels(&clips);
    let mut cfg = quick_recipe(x[0].len());
    cfg.adversary = 0.3;
    cfg.aux_emotion = 0.5;
    let side = SideLabels {
        domains: &domains,
        emotions: &emotions,
    };
    let t = train(&x, &y, &speakers, side, &cfg, |_, _, _| {}).unwrap();
    assert!(
        t.train_loss.last().unwrap() < &t.train_loss[0],
        "loss {:?}",
        t.train_loss
    );
    // Weights round-trip through safetensors and give the same predictions.
    let file = cache.join("head.safetensors");
    candle_core::safetensors::save(&t.tensors, &file).unwrap();
    let loaded = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let head = head_from_tensors(&cfg.head, loaded, &file, DType::F32, &Device::Cpu).unwrap();
    let idx: Vec<usize> = (0..x.len()).collect();
    let before = t.predict(&x, &idx).unwrap();
    let rows: Vec<f32> = x
        .iter()
        .flat_map(|r| {
            let mut r = r.clone();
            t.scaler.transform_vec(&mut r);
            r
        })
        .collect();
    let logits = head
        .forward(
            &Tensor::from_vec(rows, (x.len(), x[0].len()), &Device::Cpu).unwrap(),
            false,
        )
        .unwrap();
    let after: Vec<f32> = logits
        .to_vec2::<f32>()
        .unwrap()
        .iter()
        .flat_map(|r| valence_model::softmax(r))
        .collect();
    let before: Vec<f32> = before.into_iter().flatten().collect();
    for (a, b) in before.iter().zip(&after) {
        assert!((a - b).abs() < 1e-6);
    }
}

/// One augmentation pass and one head training on its views, on a handful of shared clips:
/// the views are window-sized and differ from the clean clips' features, training on them
/// lowers the loss, and folding a temperature into the head divides its logits exactly.
#[test]
fn augmented_views_of_shared_clips_train_a_head() {
    let (Some(enc), Some(data)) = (encoder_dir(), shared_data()) else {
        return;
    };
    init();
    let clips = some_clips(&data, 4);
    let cache = std::env::temp_dir().join(format!("valence-views-test-{}", std::process::id()));
    let spec = FeatureSpec {
        source: FeatureSource::HiddenStates,
        layers: vec![2, 3],
        combine: Combine::Concat,
        pooling: Pooling::Mean,
        prosody: false,
    };
    let views = dataset::view_features(
        &clips,
        &data,
        &enc,
        None,
        dataset::ViewSpec {
            per_clip: 2,
            window_s: 3.0,
            upto: 3,
            seed: 5,
            opus: 0.5,
        },
        &cache,
        &Device::Cpu,
    )
    .unwrap();
    let clean = dataset::features(&clips, &data, &enc, None, &cache, &Device::Cpu).unwrap();
    let xv = views.select(&spec).unwrap();
    let xc = clean.select(&spec).unwrap();
    assert_eq!(xv.len(), clips.len() * 2);
    let moved = (0..clips.len())
        .filter(|&c| max_row_diff(&xv[2 * c], &xc[c]) > 1e-3)
        .count();
    assert!(
        moved * 2 >= clips.len(),
        "views barely differ from the clean clips"
    );

    let y: Vec<usize> = (0..xv.len())
        .map(|r| clips[r / 2].label().unwrap())
        .collect();
    let speakers: Vec<String> = (0..xv.len())
        .map(|r| clips[r / 2].speaker.clone())
        .collect();
    let cfg = quick_recipe(xv[0].len());
    let mut t = train(
        &xv,
        &y,
        &speakers,
        SideLabels::default(),
        &cfg,
        |_, _, _| {},
    )
    .unwrap();
    assert!(
        t.train_loss.last().unwrap() < &t.train_loss[0],
        "loss {:?}",
        t.train_loss
    );
    let idx: Vec<usize> = (0..xc.len()).collect();
    let before = t.predict(&xc, &idx).unwrap();
    valence_train::training::apply_temperature(&mut t, 2.0).unwrap();
    let after = t.predict(&xc, &idx).unwrap();
    for (b, a) in before.iter().zip(&after) {
        let want = valence_train::metrics::with_temperature(b, 2.0);
        assert!(max_row_diff(&want, a) < 1e-5, "{want:?} vs {a:?}");
    }
    let _ = std::fs::remove_dir_all(&cache);
}

/// One fine-tuning run of the encoder on a handful of shared clips and an augmented view of
/// each: low-rank adapters on the last Whisper layer the default head reads, trained with a
/// head, lower the loss, and the adapted layer then gives other features than the imported one.
#[test]
fn adapting_the_encoder_on_shared_clips_lowers_the_loss() {
    use valence_train::adapt::{AdaptConfig, AdaptedLayer, fit, prepare};
    let (Some(enc), Some(data)) = (encoder_dir(), shared_data()) else {
        return;
    };
    let clips = some_clips(&data, 4);
    let encoder = valence_model::Encoder::load_dir(&enc, None, DType::F32, &Device::Cpu).unwrap();
    // Every view through Opus over RTP as well, so CI runs the codec on real clips.
    let aug = valence_train::augment::Augmenter {
        window: 48_000,
        opus: 1.0,
    };
    let mut windows = Vec::new();
    for (i, c) in clips.iter().enumerate() {
        let audio = valence_train::decode::decode_to_16k_mono(&data.join(&c.path)).unwrap();
        let mut rng = valence_model::rng::SeededNormal::new(i as u64);
        let view = aug.view(&audio, &[], &mut rng).unwrap().0;
        for samples in [audio, view] {
            windows.push(prepare(&encoder, &samples, 2, &[2], c.label().unwrap()).unwrap());
        }
    }
    let cfg = AdaptConfig {
        head: quick_recipe(1024).head,
        lr: 1e-3,
        weight_decay: 0.01,
        label_smoothing: 0.1,
        batch_size: 8,
        epochs: 4,
        clip_norm: 1.0,
        seed: 0,
    };
    let idx: Vec<usize> = (0..windows.len()).collect();
    let layer = AdaptedLayer::load(&enc, 2, 8, 16.0, 1).unwrap();
    let before = valence_train::adapt::features(&layer, &windows, &idx).unwrap();
    let fitted = fit(layer, &windows, &idx, &cfg, |_, _| {}).unwrap();
    let loss = &fitted.train_loss;
    assert!(loss.last().unwrap() < &loss[0], "loss {loss:?}");
    let after = valence_train::adapt::features(&fitted.layer, &windows, &idx).unwrap();
    let moved = before
        .iter()
        .zip(&after)
        .map(|(b, a)| max_row_diff(&b[512..], &a[512..]))
        .fold(0.0, f32::max);
    assert!(moved > 1e-4, "the adapted layer's features did not change");
    assert_eq!(max_row_diff(&before[0][..512], &after[0][..512]), 0.0);
}

fn max_row_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A small MLP with the card's recipe, shortened for tests: 15 epochs, no early stop.
fn quick_recipe(input_dim: usize) -> TrainConfig {
    let mut cfg = TrainConfig::card_recipe(HeadConfig::Mlp(MlpHeadConfig {
        input_dim,
        hidden: vec![32],
        dropout: 0.2,
        head_activation: Default::default(),
        num_classes: 3,
    }));
    cfg.max_epochs = 15;
    cfg.patience = 100;
    cfg.lr = 1e-3;
    cfg
}

/// `valence cv --per-window` scores the element's windows of each clip: a clip under 1 s has
/// none, one under 3 s is a single window (the whole clip, so the clip's own features), a
/// longer one has its windows at a 1 s hop; the cache gives back the same rows.
#[test]
fn element_window_features_are_the_clips_windows() {
    let (Some(enc), Some(data)) = (encoder_dir(), shared_data()) else {
        return;
    };
    let all = dataset::read_manifest(&data.join("manifest.csv")).unwrap();
    let pick = |ok: &dyn Fn(f64) -> bool| {
        all.iter()
            .find(|c| c.label().is_some() && ok(c.duration_s))
            .cloned()
            .expect("a clip of that length")
    };
    let clips = vec![
        pick(&|d| d < 0.9),
        pick(&|d| (1.5..2.8).contains(&d)),
        pick(&|d| d > 5.0),
    ];
    let cache = std::env::temp_dir().join(format!("valence-window-test-{}", std::process::id()));
    let whole = dataset::features(&clips, &data, &enc, None, &cache, &Device::Cpu).unwrap();
    let (table, clip) =
        dataset::window_features(&clips, &data, &enc, None, 3, &cache, &Device::Cpu).unwrap();
    let long = valence_train::decode::decode_to_16k_mono(&data.join(&clips[2].path)).unwrap();
    let long_windows = dataset::element_windows(&long, dataset::WINDOW_SILENCE_DBFS).len();
    // (At least windows at 0 and 1 s; a silent one is left out, as the element does.)
    assert!(
        long_windows >= 2,
        "{long_windows} windows in {} s",
        clips[2].duration_s
    );
    let mut want = vec![1];
    want.extend(std::iter::repeat_n(2, long_windows));
    assert_eq!(clip, want);
    let spec = FeatureSpec {
        source: FeatureSource::HiddenStates,
        layers: vec![2, 3],
        combine: Combine::Concat,
        pooling: Pooling::VoicedMean,
        prosody: false,
    };
    let (rows, clip_rows) = (table.select(&spec).unwrap(), whole.select(&spec).unwrap());
    let diff = rows[0]
        .iter()
        .zip(&clip_rows[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff < 1e-5,
        "the short clip's window differs from it by {diff}"
    );
    assert!(
        rows[1..].iter().all(|r| r != &rows[0]),
        "the long clip's windows are other audio"
    );
    let (again, clip_again) =
        dataset::window_features(&clips, &data, &enc, None, 3, &cache, &Device::Cpu).unwrap();
    assert_eq!(clip_again, clip);
    assert_eq!(again.select(&spec).unwrap(), rows);
    std::fs::remove_dir_all(&cache).ok();
}
