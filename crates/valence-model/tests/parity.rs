//! Numerical parity with PyTorch / transformers. References come from
//! `tests/fixtures/make_fixtures.py` (versions in `tests/fixtures/VERSIONS.txt`).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, max_abs_diff, read_wav_i16, rms};
use valence_model::classifier::head::{HeadConfig, head_from_tensors};
use valence_model::encoders::ct2;
use valence_model::encoders::wav2vec2::Wav2Vec2Model;
use valence_model::encoders::whisper::{LogMel, WhisperEncoder};
use valence_model::manifest::load_card_head;
use valence_model::{EncoderOutput, softmax};

const TOL: f32 = 1e-4;

fn reference(dir: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(dir).join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn compare_states(name: &str, out: &EncoderOutput, r: &std::collections::HashMap<String, Tensor>) {
    let n_ref = r.keys().filter(|k| k.starts_with("hidden_states.")).count();
    assert_eq!(
        out.hidden_states.len(),
        n_ref,
        "{name}: number of hidden states"
    );
    for (i, h) in out.hidden_states.iter().enumerate() {
        let d = max_abs_diff(&h.squeeze(0).unwrap(), &r[&format!("hidden_states.{i}")]);
        assert!(d < TOL, "{name}: hidden_states[{i}] differs by {d}");
    }
    let d = max_abs_diff(
        &out.last_hidden_state.squeeze(0).unwrap(),
        &r["last_hidden_state"],
    );
    assert!(d < TOL, "{name}: last_hidden_state differs by {d}");
}

#[test]
fn wav2vec2_group_norm_safetensors_matches_transformers() {
    let audio = read_wav_i16(&fixtures().join("speechlike.wav"));
    let m =
        Wav2Vec2Model::load_dir(&fixtures().join("w2v2_group"), DType::F32, &Device::Cpu).unwrap();
    assert!(!m.config.do_stable_layer_norm);
    compare_states(
        "w2v2_group",
        &m.encode(&audio).unwrap(),
        &reference("w2v2_group"),
    );
}

#[test]
fn wav2vec2_stable_layer_norm_pytorch_bin_matches_transformers() {
    let audio = read_wav_i16(&fixtures().join("speechlike.wav"));
    let m =
        Wav2Vec2Model::load_dir(&fixtures().join("w2v2_stable"), DType::F32, &Device::Cpu).unwrap();
    assert!(m.config.do_stable_layer_norm);
    compare_states(
        "w2v2_stable",
        &m.encode(&audio).unwrap(),
        &reference("w2v2_stable"),
    );
}

/// The 8-bit encoders stay close to transformers' f32 states: every hidden state within 10 %
/// relative RMS (the quantization error, not a broken product, which would be of order 1).
#[test]
fn int8_wav2vec2_stays_close_to_transformers() {
    let audio = read_wav_i16(&fixtures().join("speechlike.wav"));
    let kernel = valence_model::serving::runtime::int8_kernel();
    for dir in ["w2v2_group", "w2v2_stable"] {
        let mut m =
            Wav2Vec2Model::load_dir(&fixtures().join(dir), DType::F32, &Device::Cpu).unwrap();
        m.quantize(kernel).unwrap();
        let out = m.encode(&audio).unwrap();
        let r = reference(dir);
        for (i, h) in out.hidden_states.iter().enumerate() {
            let want = &r[&format!("hidden_states.{i}")];
            let diff = (h.squeeze(0).unwrap() - want).unwrap();
            let rel = rms(&diff) / rms(want);
            assert!(
                rel < 0.1,
                "{dir}: hidden_states[{i}] relative RMS error {rel}"
            );
        }
    }
}

#[test]
fn whisper_log_mel_matches_feature_extractor() {
    let audio = read_wav_i16(&fixtures().join("speechlike.wav"));
    let mel = LogMel::new(80).compute(&audio);
    let frames = mel.len() / 80;
    let ours = Tensor::from_vec(mel, (80, frames), &Device::Cpu).unwrap();
    let d = max_abs_diff(&ours, &reference("whisper_tiny")["mel"]);
    assert!(d < TOL, "log-mel differs by {d}");
}

#[test]
fn whisper_encoder_matches_transformers_on_real_length() {
    let audio = read_wav_i16(&fixtures().join("speechlike.wav"));
    let enc = WhisperEncoder::load_dir(&fixtures().join("whisper_tiny"), DType::F32, &Device::Cpu)
        .unwrap();
    compare_states(
        "whisper",
        &enc.encode(&audio).unwrap(),
        &reference("whisper_tiny"),
    );
}

#[test]
fn ctranslate2_import_gives_the_same_encoder() {
    let d = fixtures().join("whisper_tiny_ct2");
    let (p1, p2) = (d.join("model.bin.part1"), d.join("model.bin.part2"));
    let model = ct2::Ct2Model::read(&[&p1, &p2]).unwrap();
    let (cfg, tensors) = model.whisper_encoder().unwrap();
    assert_eq!(
        (cfg.d_model, cfg.encoder_layers, cfg.encoder_attention_heads),
        (64, 2, 4)
    );
    let out = tempfile_dir("ct2");
    ct2::write_whisper_encoder_dir(&out, &cfg, &tensors).unwrap();
    let audio = read_wav_i16(&fixtures().join("speechlike.wav"));
    let enc = WhisperEncoder::load_dir(&out, DType::F32, &Device::Cpu).unwrap();
    compare_states(
        "whisper from ct2",
        &enc.encode(&audio).unwrap(),
        &reference("whisper_tiny"),
    );
    // A truncated package (one part only) is refused with a clear error.
    let err = ct2::Ct2Model::read(&[&p1])
        .err()
        .expect("truncated must fail")
        .to_string();
    assert!(
        err.contains("truncated") || err.contains("ends early"),
        "{err}"
    );
}

fn tempfile_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("valence-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn transformer_heads_match_pytorch() {
    for name in ["head_ours", "head_ours_prenorm"] {
        let dir = fixtures().join(name);
        let cfg: HeadConfig =
            serde_json::from_str(&std::fs::read_to_string(dir.join("head_config.json")).unwrap())
                .unwrap();
        let w = dir.join("head.safetensors");
        let tensors = candle_core::safetensors::load(&w, &Device::Cpu).unwrap();
        let head = head_from_tensors(&cfg, tensors, &w, DType::F32, &Device::Cpu).unwrap();
        let r = reference(name);
        let logits = head.forward(&r["input"], false).unwrap();
        let d = max_abs_diff(&logits, &r["logits"]);
        assert!(d < TOL, "{name}: logits differ by {d}");
    }
}

#[test]
fn card_layout_head_and_pickled_scaler_match_pytorch() {
    let (cfg, tensors, origin, scaler) = load_card_head(&fixtures().join("head_card")).unwrap();
    assert_eq!(
        (cfg.input_dim, cfg.patch_size, cfg.d_model, cfg.num_layers),
        (96, 16, 32, 2)
    );
    assert_eq!(cfg.hidden, vec![16]);
    let head = head_from_tensors(
        &HeadConfig::Transformer(cfg),
        tensors,
        &origin,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let r = reference("head_card");
    let x = scaler.expect("card scaler").transform(&r["input"]).unwrap();
    let logits = head.forward(&x, false).unwrap().to_vec2::<f32>().unwrap();
    let probs: Vec<f32> = logits.iter().flat_map(|row| softmax(row)).collect();
    let probs = Tensor::from_vec(probs, r["probabilities"].dims(), &Device::Cpu).unwrap();
    let d = max_abs_diff(&probs, &r["probabilities"]);
    assert!(d < TOL, "card head probabilities differ by {d}");
}

#[test]
fn loaders_report_missing_and_mismatched_weights() {
    let dir = tempfile_dir("broken");
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(fixtures().join("w2v2_group").join(f), dir.join(f)).unwrap();
    }
    let err = Wav2Vec2Model::load_dir(&dir, DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("no model.safetensors or pytorch_model.bin"),
        "{err:#}"
    );
    // Wrong shapes: the group checkpoint under the stable config.
    std::fs::copy(
        fixtures().join("w2v2_group/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("w2v2_stable/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let err = format!(
        "{:#}",
        Wav2Vec2Model::load_dir(&dir, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(
        err.contains("model.safetensors") && (err.contains("shape") || err.contains("missing")),
        "{err}"
    );
    // Garbage bytes.
    std::fs::write(dir.join("model.safetensors"), b"not a checkpoint").unwrap();
    let err = format!(
        "{:#}",
        Wav2Vec2Model::load_dir(&dir, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(err.contains("not a readable safetensors"), "{err}");
}

/// The half-precision paths (what a GPU runs; on the CPU only the f32 path has fused kernels)
/// against the same f32 references, with tolerances for 11-bit (f16) and 8-bit (bf16)
/// mantissas: relative RMS error of every hidden state.
#[test]
fn half_precision_encoders_follow_transformers() {
    let audio = read_wav_i16(&fixtures().join("speechlike.wav"));
    for (dtype, tol) in [(DType::F16, 5e-3), (DType::BF16, 3e-2)] {
        for name in ["w2v2_group", "w2v2_stable", "whisper_tiny"] {
            let dir = fixtures().join(name);
            let out = if name.starts_with("whisper") {
                WhisperEncoder::load_dir(&dir, dtype, &Device::Cpu)
                    .unwrap()
                    .encode(&audio)
                    .unwrap()
            } else {
                Wav2Vec2Model::load_dir(&dir, dtype, &Device::Cpu)
                    .unwrap()
                    .encode(&audio)
                    .unwrap()
            };
            let r = reference(name);
            for (i, h) in out.hidden_states.iter().enumerate() {
                assert_eq!(h.dtype(), dtype);
                let ours = h.squeeze(0).unwrap().to_dtype(DType::F32).unwrap();
                let want = &r[&format!("hidden_states.{i}")];
                let rms = |t: &Tensor| t.sqr().unwrap().mean_all().unwrap().sqrt().unwrap();
                let rel = (rms(&(&ours - want).unwrap()) / rms(want))
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                eprintln!("{name} {dtype:?} hidden_states[{i}]: relative RMS error {rel:.2e}");
                assert!(
                    rel < tol,
                    "{name} {dtype:?} hidden_states[{i}]: relative RMS error {rel}"
                );
            }
        }
    }
}
