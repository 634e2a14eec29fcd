//! Small random-weight models in the real on-disk formats, made with the project's own code.
//! Tests, examples and benchmarks use them where no trained model is at hand; the numbers they
//! give mean nothing, but every loading and inference path is the real one.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::classifier::head::{Activation, HeadConfig, TransformerHeadConfig};
use crate::classifier::scaler::StandardScaler;
use crate::encoders::whisper::WhisperEncoderConfig;
use crate::manifest::{
    Combine, EncoderKind, EncoderSpec, FeatureSource, FeatureSpec, HeadSpec, Manifest, Pooling,
};
use crate::rng::SeededNormal;

fn ones(shape: usize) -> Result<Tensor> {
    Ok(Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu)?)
}

/// Writes a tiny Whisper encoder (HF names, safetensors) into `dir`.
pub fn write_tiny_whisper_encoder(dir: &Path, seed: u64) -> Result<WhisperEncoderConfig> {
    let cfg = WhisperEncoderConfig {
        num_mel_bins: 80,
        d_model: 64,
        encoder_layers: 2,
        encoder_attention_heads: 4,
        encoder_ffn_dim: 128,
        max_source_positions: 1500,
        activation_function: "gelu".into(),
    };
    let mut rng = SeededNormal::new(seed);
    let d = cfg.d_model;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let p = "model.encoder";
    t.insert(format!("{p}.conv1.weight"), rng.tensor(&[d, 80, 3], 0.1)?);
    t.insert(format!("{p}.conv1.bias"), rng.tensor(&[d], 0.02)?);
    t.insert(format!("{p}.conv2.weight"), rng.tensor(&[d, d, 3], 0.08)?);
    t.insert(format!("{p}.conv2.bias"), rng.tensor(&[d], 0.02)?);
    // Whisper's positions are sinusoids.
    let pos: Vec<f32> = (0..cfg.max_source_positions)
        .flat_map(|i| {
            let half = d / 2;
            let inc = (10000f32).ln() / (half - 1) as f32;
            let s: Vec<f32> = (0..half)
                .map(|j| (i as f32 * (-inc * j as f32).exp()).sin())
                .collect();
            let c: Vec<f32> = (0..half)
                .map(|j| (i as f32 * (-inc * j as f32).exp()).cos())
                .collect();
            s.into_iter().chain(c)
        })
        .collect();
    t.insert(
        format!("{p}.embed_positions.weight"),
        Tensor::from_vec(pos, (cfg.max_source_positions, d), &Device::Cpu)?,
    );
    for i in 0..cfg.encoder_layers {
        let l = format!("{p}.layers.{i}");
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            t.insert(
                format!("{l}.self_attn.{n}.weight"),
                rng.tensor(&[d, d], 0.12)?,
            );
            if n != "k_proj" {
                t.insert(format!("{l}.self_attn.{n}.bias"), rng.tensor(&[d], 0.02)?);
            }
        }
        t.insert(
            format!("{l}.fc1.weight"),
            rng.tensor(&[cfg.encoder_ffn_dim, d], 0.12)?,
        );
        t.insert(
            format!("{l}.fc1.bias"),
            rng.tensor(&[cfg.encoder_ffn_dim], 0.02)?,
        );
        t.insert(
            format!("{l}.fc2.weight"),
            rng.tensor(&[d, cfg.encoder_ffn_dim], 0.08)?,
        );
        t.insert(format!("{l}.fc2.bias"), rng.tensor(&[d], 0.02)?);
        for n in ["self_attn_layer_norm", "final_layer_norm"] {
            t.insert(format!("{l}.{n}.weight"), ones(d)?);
            t.insert(format!("{l}.{n}.bias"), rng.tensor(&[d], 0.02)?);
        }
    }
    t.insert(format!("{p}.layer_norm.weight"), ones(d)?);
    t.insert(format!("{p}.layer_norm.bias"), rng.tensor(&[d], 0.02)?);
    crate::encoders::ct2::write_whisper_encoder_dir(dir, &cfg, &t)?;
    Ok(cfg)
}

/// Random weights for a head config, with PyTorch names.
pub fn random_head_tensors(cfg: &HeadConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = SeededNormal::new(seed);
    let mut t = HashMap::new();
    let mlp =
        |t: &mut HashMap<String, Tensor>, rng: &mut SeededNormal, dims: &[usize]| -> Result<()> {
            for (j, w) in dims.windows(2).enumerate() {
                let std = (1.0 / w[0] as f32).sqrt();
                t.insert(
                    format!("classifier.{j}.weight"),
                    rng.tensor(&[w[1], w[0]], std)?,
                );
                t.insert(format!("classifier.{j}.bias"), rng.tensor(&[w[1]], 0.05)?);
            }
            Ok(())
        };
    match cfg {
        HeadConfig::Mlp(_) => mlp(&mut t, &mut rng, &cfg.classifier_dims())?,
        HeadConfig::Transformer(c) => {
            let d = c.d_model;
            let n = c.input_dim.div_ceil(c.patch_size);
            t.insert(
                "patch_embed.weight".into(),
                rng.tensor(&[d, c.patch_size], 0.15)?,
            );
            t.insert("patch_embed.bias".into(), rng.tensor(&[d], 0.02)?);
            t.insert("cls_token".into(), rng.tensor(&[1, 1, d], 0.5)?);
            t.insert("pos_embed".into(), rng.tensor(&[1, n + 1, d], 0.5)?);
            for i in 0..c.num_layers {
                let l = format!("encoder.layers.{i}");
                t.insert(
                    format!("{l}.self_attn.in_proj_weight"),
                    rng.tensor(&[3 * d, d], 0.15)?,
                );
                t.insert(
                    format!("{l}.self_attn.in_proj_bias"),
                    rng.tensor(&[3 * d], 0.02)?,
                );
                t.insert(
                    format!("{l}.self_attn.out_proj.weight"),
                    rng.tensor(&[d, d], 0.15)?,
                );
                t.insert(
                    format!("{l}.self_attn.out_proj.bias"),
                    rng.tensor(&[d], 0.02)?,
                );
                t.insert(
                    format!("{l}.linear1.weight"),
                    rng.tensor(&[c.dim_feedforward, d], 0.15)?,
                );
                t.insert(
                    format!("{l}.linear1.bias"),
                    rng.tensor(&[c.dim_feedforward], 0.02)?,
                );
                t.insert(
                    format!("{l}.linear2.weight"),
                    rng.tensor(&[d, c.dim_feedforward], 0.1)?,
                );
                t.insert(format!("{l}.linear2.bias"), rng.tensor(&[d], 0.02)?);
                for nm in ["norm1", "norm2"] {
                    t.insert(format!("{l}.{nm}.weight"), ones(d)?);
                    t.insert(format!("{l}.{nm}.bias"), rng.tensor(&[d], 0.02)?);
                }
            }
            if c.final_norm {
                t.insert("encoder.norm.weight".into(), ones(d)?);
                t.insert("encoder.norm.bias".into(), rng.tensor(&[d], 0.02)?);
            }
            mlp(&mut t, &mut rng, &cfg.classifier_dims())?;
        }
    }
    Ok(t)
}

/// Writes a complete tiny model directory: random Whisper encoder, the card's Transformer head
/// shape (scaled down), a scaler and `valence.json`. Loads and runs like any real model.
pub fn write_tiny_model(dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let enc = write_tiny_whisper_encoder(&dir.join("encoder"), seed)?;
    let head = HeadConfig::Transformer(TransformerHeadConfig {
        input_dim: enc.d_model,
        patch_size: 16,
        d_model: 32,
        nhead: 4,
        num_layers: 1,
        dim_feedforward: 64,
        dropout: 0.2,
        norm_first: false,
        activation: Activation::Relu,
        final_norm: false,
        hidden: vec![16],
        head_activation: Activation::Relu,
        num_classes: 3,
    });
    std::fs::write(
        dir.join("head_config.json"),
        serde_json::to_string_pretty(&head)?,
    )?;
    candle_core::safetensors::save(
        &random_head_tensors(&head, seed + 1)?,
        dir.join("head.safetensors"),
    )?;
    let mut rng = SeededNormal::new(seed + 2);
    let mean: Vec<f32> = (0..enc.d_model).map(|_| rng.sample() * 0.1).collect();
    let scale: Vec<f32> = (0..enc.d_model)
        .map(|_| 0.5 + rng.sample().abs() * 0.5)
        .collect();
    StandardScaler::new(mean, scale)?.save_safetensors(&dir.join("scaler.safetensors"))?;
    Manifest {
        format_version: 1,
        name: format!("tiny-random-{seed}"),
        labels: super::LABELS.iter().map(|s| s.to_string()).collect(),
        sample_rate: 16000,
        encoder: EncoderSpec {
            kind: EncoderKind::Whisper,
            path: "encoder".into(),
            quantize: None,
            adapted: None,
        },
        features: FeatureSpec {
            source: FeatureSource::HiddenStates,
            layers: vec![1, 2],
            combine: Combine::Mean,
            pooling: Pooling::Mean,
            prosody: false,
        },
        scaler: Some("scaler.safetensors".into()),
        head: HeadSpec::Files {
            config: "head_config.json".into(),
            weights: "head.safetensors".into(),
        },
        dtype: "f32".into(),
        familiarity: None,
        speech_detector: None,
        notes: Some(serde_json::json!({"warning": "random weights: for tests only"})),
    }
    .write(dir)
}

/// A random-weight speech detector (Silero VAD's names and shapes) as safetensors bytes.
pub fn tiny_detector_bytes(seed: u64) -> Vec<u8> {
    let mut rng = SeededNormal::new(seed);
    let shapes: [(&str, Vec<usize>); 15] = [
        ("stft_conv.weight", vec![258, 1, 256]),
        ("conv1.weight", vec![128, 129, 3]),
        ("conv1.bias", vec![128]),
        ("conv2.weight", vec![64, 128, 3]),
        ("conv2.bias", vec![64]),
        ("conv3.weight", vec![64, 64, 3]),
        ("conv3.bias", vec![64]),
        ("conv4.weight", vec![128, 64, 3]),
        ("conv4.bias", vec![128]),
        ("lstm_cell.weight_ih", vec![512, 128]),
        ("lstm_cell.weight_hh", vec![512, 128]),
        ("lstm_cell.bias_ih", vec![512]),
        ("lstm_cell.bias_hh", vec![512]),
        ("final_conv.weight", vec![1, 128, 1]),
        ("final_conv.bias", vec![1]),
    ];
    let data: HashMap<String, (Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .map(|(n, s)| {
            let len: usize = s.iter().product();
            let bytes = (0..len)
                .flat_map(|_| (rng.sample() * 0.1).to_le_bytes())
                .collect();
            (n.to_string(), (s, bytes))
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, (s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// Writes a tiny model (see [`write_tiny_model`]) that names a random-weight speech detector,
/// written beside it as `detector.safetensors`.
pub fn write_tiny_model_with_detector(dir: &Path, seed: u64) -> Result<()> {
    write_tiny_model(dir, seed)?;
    std::fs::write(dir.join("detector.safetensors"), tiny_detector_bytes(seed))?;
    let mut m = Manifest::read(dir)?;
    m.speech_detector = Some("detector.safetensors".into());
    m.write(dir)
}
