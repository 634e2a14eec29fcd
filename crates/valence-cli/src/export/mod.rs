//! `valence export triton`: a model directory as one ONNX graph, from 16 kHz mono samples
//! (batch and length dynamic) to the label probabilities, in a Triton model repository.
//!
//! The graph does what [`valence_model::ValenceModel::classify_batch`] does with f32 weights:
//! Whisper's log-mel front end (reflect-padded STFT as a convolution with a windowed DFT basis,
//! Slaney mel filters, log10, the dynamic-range clamp per input), the encoder layers the head
//! reads, the manifest's pooling (voiced-frame weights from the samples' energy), the scaler
//! and the head, then a softmax. An 8-bit manifest exports its f32 weights: the server runs
//! what the CPU runs where it has no 8-bit kernel.

pub mod graph;
#[allow(clippy::all, missing_docs)]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};
use valence_model::EncoderKind;
use valence_model::classifier::head::{Activation, HeadConfig, TransformerHeadConfig};
use valence_model::encoders::whisper::{HOP_LENGTH, N_FFT, SAMPLE_RATE, WhisperEncoderConfig};
use valence_model::manifest::{
    Combine, FeatureSource, Manifest, Pooling, VOICED_FLOOR_DBFS, VOICED_RANGE_DB,
};

use graph::{Attr, Dim, GraphBuilder};

/// The exported graph's input: [batch, samples] f32, 16 kHz mono.
pub const INPUT_NAME: &str = "samples";
/// The exported graph's output: [batch, labels] f32 probabilities.
pub const OUTPUT_NAME: &str = "probabilities";

/// Row-major f32 values of a tensor.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

struct Weights {
    tensors: HashMap<String, Tensor>,
    origin: String,
}

impl Weights {
    fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .with_context(|| format!("{}: no tensor `{name}`", self.origin))
    }

    /// A constant of the tensor `name` as stored.
    fn constant(&self, g: &mut GraphBuilder, name: &str) -> Result<String> {
        let t = self.get(name)?;
        Ok(g.f32s("w", t.dims(), values(t)?))
    }

    /// `x @ weight^T + bias` for a PyTorch-layout `weight` [out, in].
    fn linear(&self, g: &mut GraphBuilder, x: &str, prefix: &str, bias: bool) -> Result<String> {
        let w = self.get(&format!("{prefix}.weight"))?;
        let wt = w.t()?.contiguous()?;
        let wt = g.f32s("w", wt.dims(), values(&wt)?);
        let y = g.op2("MatMul", x, &wt);
        if !bias {
            return Ok(y);
        }
        let b = self.constant(g, &format!("{prefix}.bias"))?;
        Ok(g.op2("Add", &y, &b))
    }

    fn layer_norm(&self, g: &mut GraphBuilder, x: &str, prefix: &str) -> Result<String> {
        let w = self.constant(g, &format!("{prefix}.weight"))?;
        let b = self.constant(g, &format!("{prefix}.bias"))?;
        Ok(g.op(
            "LayerNormalization",
            &[x, &w, &b],
            vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(1e-5))],
        ))
    }
}

/// The erf GELU: x * 0.5 * (1 + erf(x / sqrt 2)).
fn gelu(g: &mut GraphBuilder, x: &str) -> String {
    let r2 = g.scalar(std::f32::consts::SQRT_2);
    let half = g.scalar(0.5);
    let one = g.scalar(1.0);
    let e = g.op2("Div", x, &r2);
    let e = g.op("Erf", &[&e], vec![]);
    let e = g.op2("Add", &e, &one);
    let h = g.op2("Mul", x, &half);
    g.op2("Mul", &h, &e)
}

fn activation(g: &mut GraphBuilder, x: &str, a: Activation) -> String {
    match a {
        Activation::Relu => g.op("Relu", &[x], vec![]),
        Activation::Gelu => gelu(g, x),
    }
}

/// Scaled dot-product attention of projected `q`, `k`, `v` [batch, time, width] over `heads`
/// heads: [batch, time, width].
fn attention(
    g: &mut GraphBuilder,
    q: &str,
    k: &str,
    v: &str,
    width: usize,
    heads: usize,
) -> String {
    let hd = (width / heads) as i64;
    let split = g.i64s(&[0, 0, heads as i64, hd]);
    let q = g.op2("Reshape", q, &split);
    let k = g.op2("Reshape", k, &split);
    let v = g.op2("Reshape", v, &split);
    let q = g.op(
        "Transpose",
        &[&q],
        vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
    );
    let k = g.op(
        "Transpose",
        &[&k],
        vec![("perm", Attr::Ints(vec![0, 2, 3, 1]))],
    );
    let v = g.op(
        "Transpose",
        &[&v],
        vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
    );
    let scale = g.scalar((hd as f32).powf(-0.5));
    let q = g.op2("Mul", &q, &scale);
    let scores = g.op2("MatMul", &q, &k);
    let p = g.op("Softmax", &[&scores], vec![("axis", Attr::Int(-1))]);
    let ctx = g.op2("MatMul", &p, &v);
    let ctx = g.op(
        "Transpose",
        &[&ctx],
        vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
    );
    let merge = g.i64s(&[0, 0, width as i64]);
    g.op2("Reshape", &ctx, &merge)
}

/// Whisper's log-mel spectrogram of `samples` [batch, n]: [batch, n_mels, n / 160], as
/// [`valence_model::encoders::whisper::LogMel`] computes it.
fn log_mel(g: &mut GraphBuilder, samples: &str, n_mels: usize) -> String {
    let n_bins = N_FFT / 2 + 1;
    // Reflect padding by N_FFT / 2 on both sides (the centred STFT).
    let ax1 = g.i64s(&[1]);
    let x = g.op2("Unsqueeze", samples, &ax1);
    let pads = g.i64s(&[0, 0, (N_FFT / 2) as i64, 0, 0, (N_FFT / 2) as i64]);
    let x = g.op("Pad", &[&x, &pads], vec![("mode", Attr::Str("reflect"))]);
    // The periodic Hann window times the DFT basis: cos rows, then -sin rows.
    let basis = g.f32s(
        "dft",
        &[2 * n_bins, 1, N_FFT],
        valence_model::encoders::whisper::windowed_dft_basis(),
    );
    let spec = g.op(
        "Conv",
        &[&x, &basis],
        vec![("strides", Attr::Ints(vec![HOP_LENGTH as i64]))],
    );
    // Drop the last frame (as Whisper does), split real and imaginary parts.
    let (s0, s_end, s_mid) = (g.i64s(&[0]), g.i64s(&[-1]), g.i64s(&[n_bins as i64]));
    let (s_all, ax1, ax2) = (g.i64s(&[2 * n_bins as i64]), g.i64s(&[1]), g.i64s(&[2]));
    let spec = g.op("Slice", &[&spec, &s0, &s_end, &ax2], vec![]);
    let re = g.op("Slice", &[&spec, &s0, &s_mid, &ax1], vec![]);
    let im = g.op("Slice", &[&spec, &s_mid, &s_all, &ax1], vec![]);
    let re2 = g.op2("Mul", &re, &re);
    let im2 = g.op2("Mul", &im, &im);
    let power = g.op2("Add", &re2, &im2);
    let filters = valence_model::encoders::whisper::slaney_mel_filters(n_mels, N_FFT, SAMPLE_RATE);
    let filters = g.f32s(
        "mel",
        &[n_mels, n_bins],
        filters.iter().map(|&v| v as f32).collect(),
    );
    let mel = g.op2("MatMul", &filters, &power);
    let floor = g.scalar(1e-10);
    let mel = g.op2("Max", &mel, &floor);
    let mel = g.op("Log", &[&mel], vec![]);
    let ln10 = g.scalar(std::f32::consts::LN_10);
    let mel = g.op2("Div", &mel, &ln10);
    // Clamp to (the input's loudest value - 8), then (x + 4) / 4.
    let max = g.op(
        "ReduceMax",
        &[&mel],
        vec![("axes", Attr::Ints(vec![1, 2])), ("keepdims", Attr::Int(1))],
    );
    let eight = g.scalar(8.0);
    let lowest = g.op2("Sub", &max, &eight);
    let mel = g.op2("Max", &mel, &lowest);
    let four = g.scalar(4.0);
    let mel = g.op2("Add", &mel, &four);
    g.op2("Div", &mel, &four)
}

/// `voiced_mean`'s weights [batch, frames, 1] for `samples` [batch, n] and encoder states
/// `states` [batch, frames, width] (see [`valence_model::manifest::voiced_frame_mask`]): frame
/// f covers samples f*n/frames .. max((f+1)*n/frames, a+1); its level is the RMS in dBFS
/// (from a running sum of squares in f64); frames within 30 dB of the loudest and above
/// -55 dBFS count, all of them when none does.
fn voiced_weights(g: &mut GraphBuilder, samples: &str, states: &str) -> String {
    let second = g.i64s(&[1]);
    let shape_x = g.op("Shape", &[samples], vec![]);
    let n = g.op("Gather", &[&shape_x, &second], vec![("axis", Attr::Int(0))]);
    let shape_h = g.op("Shape", &[states], vec![]);
    let frames = g.op("Gather", &[&shape_h, &second], vec![("axis", Attr::Int(0))]);
    let (zero, one) = (g.i64_scalar(0), g.i64_scalar(1));
    let frames0 = g.op("Squeeze", &[&frames], vec![]);
    let frames_plus = g.op2("Add", &frames0, &one);
    let idx = g.op("Range", &[&zero, &frames_plus, &one], vec![]);
    // bounds[f] = f * n / frames (integer division, as in Rust).
    let scaled = g.op2("Mul", &idx, &n);
    let bounds = g.op2("Div", &scaled, &frames);
    let (s0, s1, big, ax0) = (
        g.i64s(&[0]),
        g.i64s(&[1]),
        g.i64s(&[i64::MAX]),
        g.i64s(&[0]),
    );
    let last = g.i64s(&[-1]);
    let a = g.op("Slice", &[&bounds, &s0, &last, &ax0], vec![]);
    let b = g.op("Slice", &[&bounds, &s1, &big, &ax0], vec![]);
    let a1 = g.op2("Add", &a, &one);
    let b = g.op2("Max", &b, &a1);
    let b = g.op2("Min", &b, &n);
    // Running sums of squares with a leading zero: sum over a..b = cs[b] - cs[a].
    let x = g.op("Cast", &[samples], vec![("to", Attr::Int(11))]);
    let sq = g.op2("Mul", &x, &x);
    let axis1 = g.i64_scalar(1);
    let cs = g.op2("CumSum", &sq, &axis1);
    let pad = g.i64s(&[0, 1, 0, 0]);
    let cs = g.op("Pad", &[&cs, &pad], vec![]);
    let hi = g.op("Gather", &[&cs, &b], vec![("axis", Attr::Int(1))]);
    let lo = g.op("Gather", &[&cs, &a], vec![("axis", Attr::Int(1))]);
    let energy = g.op2("Sub", &hi, &lo);
    let count = g.op2("Sub", &b, &a);
    let count = g.op("Cast", &[&count], vec![("to", Attr::Int(11))]);
    let ms = g.op2("Div", &energy, &count);
    let ln = g.op("Log", &[&ms], vec![]);
    let k = g.f64_scalar(10.0 / std::f64::consts::LN_10);
    let db = g.op2("Mul", &ln, &k);
    let loudest = g.op(
        "ReduceMax",
        &[&db],
        vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(1))],
    );
    let range = g.f64_scalar(VOICED_RANGE_DB);
    let floor = g.f64_scalar(VOICED_FLOOR_DBFS);
    let thr = g.op2("Sub", &loudest, &range);
    let thr = g.op2("Max", &thr, &floor);
    let voiced = g.op2("GreaterOrEqual", &db, &thr);
    let mask = g.op("Cast", &[&voiced], vec![("to", Attr::Int(1))]);
    let ax1 = g.i64s(&[1]);
    let count = g.op(
        "ReduceSum",
        &[&mask, &ax1],
        vec![("keepdims", Attr::Int(1))],
    );
    let zero_f = g.scalar(0.0);
    let any = g.op2("Greater", &count, &zero_f);
    let one_f = g.scalar(1.0);
    let mask = g.op("Where", &[&any, &mask, &one_f], vec![]);
    let count = g.op(
        "ReduceSum",
        &[&mask, &ax1],
        vec![("keepdims", Attr::Int(1))],
    );
    let w = g.op2("Div", &mask, &count);
    let ax2 = g.i64s(&[2]);
    g.op2("Unsqueeze", &w, &ax2)
}

/// The Whisper encoder from log-mels to the hidden states 0..=upto (index 0: the input to the
/// first layer), and the output after the final norm when every layer runs.
fn whisper_states(
    g: &mut GraphBuilder,
    w: &Weights,
    cfg: &WhisperEncoderConfig,
    mel: &str,
    upto: usize,
) -> Result<(Vec<String>, Option<String>)> {
    let conv = |g: &mut GraphBuilder, x: &str, name: &str, stride: i64| -> Result<String> {
        let k = w.constant(g, &format!("encoder.{name}.weight"))?;
        let b = w.constant(g, &format!("encoder.{name}.bias"))?;
        Ok(g.op(
            "Conv",
            &[x, &k, &b],
            vec![
                ("pads", Attr::Ints(vec![1, 1])),
                ("strides", Attr::Ints(vec![stride])),
            ],
        ))
    };
    let x = conv(g, mel, "conv1", 1)?;
    let x = gelu(g, &x);
    let x = conv(g, &x, "conv2", 2)?;
    let x = gelu(g, &x);
    let x = g.op(
        "Transpose",
        &[&x],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );
    // Positions 0..frames.
    let pos = w.constant(g, "encoder.embed_positions.weight")?;
    let shape = g.op("Shape", &[&x], vec![]);
    let (s1, s2, ax0) = (g.i64s(&[1]), g.i64s(&[2]), g.i64s(&[0]));
    let frames = g.op("Slice", &[&shape, &s1, &s2], vec![]);
    let start = g.i64s(&[0]);
    let pos = g.op("Slice", &[&pos, &start, &frames, &ax0], vec![]);
    let mut h = g.op2("Add", &x, &pos);
    let d = cfg.d_model;
    let mut states = vec![h.clone()];
    for i in 0..upto {
        let p = format!("encoder.layers.{i}");
        let n = w.layer_norm(g, &h, &format!("{p}.self_attn_layer_norm"))?;
        let q = w.linear(g, &n, &format!("{p}.self_attn.q_proj"), true)?;
        let k = w.linear(g, &n, &format!("{p}.self_attn.k_proj"), false)?;
        let v = w.linear(g, &n, &format!("{p}.self_attn.v_proj"), true)?;
        let ctx = attention(g, &q, &k, &v, d, cfg.encoder_attention_heads);
        let a = w.linear(g, &ctx, &format!("{p}.self_attn.out_proj"), true)?;
        h = g.op2("Add", &h, &a);
        let n = w.layer_norm(g, &h, &format!("{p}.final_layer_norm"))?;
        let f = w.linear(g, &n, &format!("{p}.fc1"), true)?;
        let f = gelu(g, &f);
        let f = w.linear(g, &f, &format!("{p}.fc2"), true)?;
        h = g.op2("Add", &h, &f);
        states.push(h.clone());
    }
    let last = if upto == cfg.encoder_layers {
        Some(w.layer_norm(g, &h, "encoder.layer_norm")?)
    } else {
        None
    };
    Ok((states, last))
}

/// Pools states [batch, frames, width] as the manifest says: [batch, width] (or 2 x width).
fn pool(g: &mut GraphBuilder, h: &str, pooling: Pooling, voiced: Option<&str>) -> Result<String> {
    Ok(match pooling {
        Pooling::Mean => g.op(
            "ReduceMean",
            &[h],
            vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(0))],
        ),
        Pooling::MeanStd => {
            let mean = g.op(
                "ReduceMean",
                &[h],
                vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(1))],
            );
            let dev = g.op2("Sub", h, &mean);
            let sq = g.op2("Mul", &dev, &dev);
            let var = g.op(
                "ReduceMean",
                &[&sq],
                vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(0))],
            );
            let std = g.op("Sqrt", &[&var], vec![]);
            let ax1 = g.i64s(&[1]);
            let mean = g.op2("Squeeze", &mean, &ax1);
            g.op("Concat", &[&mean, &std], vec![("axis", Attr::Int(1))])
        }
        Pooling::VoicedMean => {
            let w = voiced.context("voiced weights")?;
            let prod = g.op2("Mul", h, w);
            let ax1 = g.i64s(&[1]);
            g.op(
                "ReduceSum",
                &[&prod, &ax1],
                vec![("keepdims", Attr::Int(0))],
            )
        }
    })
}

/// The classifier MLP `classifier.{i}` of `dims`: activation between layers, none after the last.
fn mlp(
    g: &mut GraphBuilder,
    w: &Weights,
    x: &str,
    prefix: &str,
    layers: usize,
    act: Activation,
) -> Result<String> {
    let mut x = x.to_string();
    for i in 0..layers {
        x = w.linear(g, &x, &format!("{prefix}.{i}"), true)?;
        if i + 1 < layers {
            x = activation(g, &x, act);
        }
    }
    Ok(x)
}

/// The Transformer head (patch embedding, CLS token, PyTorch encoder layers, MLP on the CLS
/// output) of [`valence_model::classifier::head`].
fn transformer_head(
    g: &mut GraphBuilder,
    w: &Weights,
    x: &str,
    c: &TransformerHeadConfig,
) -> Result<String> {
    let n_patches = c.input_dim.div_ceil(c.patch_size);
    let padded = n_patches * c.patch_size;
    let mut x = x.to_string();
    if padded > c.input_dim {
        let pads = g.i64s(&[0, 0, 0, (padded - c.input_dim) as i64]);
        x = g.op("Pad", &[&x, &pads], vec![]);
    }
    let shape = g.i64s(&[-1, n_patches as i64, c.patch_size as i64]);
    let patches = g.op2("Reshape", &x, &shape);
    let tokens = w.linear(g, &patches, "patch_embed", true)?;
    // The CLS token repeated over the batch: tokens[:, :1] * 0 + cls keeps the graph
    // free of batch-size arithmetic.
    let cls = w.constant(g, "cls_token")?;
    let (s0, s1, ax1) = (g.i64s(&[0]), g.i64s(&[1]), g.i64s(&[1]));
    let first = g.op("Slice", &[&tokens, &s0, &s1, &ax1], vec![]);
    let zero = g.scalar(0.0);
    let first = g.op2("Mul", &first, &zero);
    let cls = g.op2("Add", &first, &cls);
    let h = g.op("Concat", &[&cls, &tokens], vec![("axis", Attr::Int(1))]);
    let pos = w.constant(g, "pos_embed")?;
    let mut h = g.op2("Add", &h, &pos);
    let d = c.d_model;
    for i in 0..c.num_layers {
        let p = format!("encoder.layers.{i}");
        let in_w = w.get(&format!("{p}.self_attn.in_proj_weight"))?;
        let in_b = w.get(&format!("{p}.self_attn.in_proj_bias"))?;
        let attn = |g: &mut GraphBuilder, x: &str| -> Result<String> {
            let mut qkv = Vec::new();
            for j in 0..3 {
                let wj = in_w.narrow(0, j * d, d)?.t()?.contiguous()?;
                let wj = g.f32s("w", wj.dims(), values(&wj)?);
                let bj = g.f32s("b", &[d], values(&in_b.narrow(0, j * d, d)?)?);
                let y = g.op2("MatMul", x, &wj);
                qkv.push(g.op2("Add", &y, &bj));
            }
            let ctx = attention(g, &qkv[0], &qkv[1], &qkv[2], d, c.nhead);
            w.linear(g, &ctx, &format!("{p}.self_attn.out_proj"), true)
        };
        let ff = |g: &mut GraphBuilder, x: &str| -> Result<String> {
            let y = w.linear(g, x, &format!("{p}.linear1"), true)?;
            let y = activation(g, &y, c.activation);
            w.linear(g, &y, &format!("{p}.linear2"), true)
        };
        if c.norm_first {
            let n = w.layer_norm(g, &h, &format!("{p}.norm1"))?;
            let a = attn(g, &n)?;
            h = g.op2("Add", &h, &a);
            let n = w.layer_norm(g, &h, &format!("{p}.norm2"))?;
            let f = ff(g, &n)?;
            h = g.op2("Add", &h, &f);
        } else {
            let a = attn(g, &h)?;
            let s = g.op2("Add", &h, &a);
            h = w.layer_norm(g, &s, &format!("{p}.norm1"))?;
            let f = ff(g, &h)?;
            let s = g.op2("Add", &h, &f);
            h = w.layer_norm(g, &s, &format!("{p}.norm2"))?;
        }
    }
    if c.final_norm {
        h = w.layer_norm(g, &h, "encoder.norm")?;
    }
    let cls_out = g.op("Gather", &[&h, &s0], vec![("axis", Attr::Int(1))]);
    let cls_out = g.op2("Squeeze", &cls_out, &ax1);
    mlp(
        g,
        w,
        &cls_out,
        "classifier",
        c.hidden.len() + 1,
        c.head_activation,
    )
}

/// The model in `dir` as an ONNX graph (serialized `ModelProto`).
pub fn model_to_onnx(dir: &Path) -> Result<Vec<u8>> {
    let manifest = Manifest::read(dir)?;
    if manifest.encoder.kind != EncoderKind::Whisper {
        bail!(
            "{}: only models with a Whisper encoder can be exported so far (this one has {:?})",
            dir.display(),
            manifest.encoder.kind
        );
    }
    let spec = &manifest.features;
    if spec.prosody {
        bail!(
            "{}: the model appends prosodic features, which the exporter cannot express in ONNX",
            dir.display()
        );
    }
    // The base checkpoint with the model's adapted layers in place, as the element runs it.
    let (cfg, tensors, weights_path) = manifest.whisper_tensors(dir).with_context(|| {
        format!(
            "cannot read the encoder of {} (run `valence setup`?)",
            dir.display()
        )
    })?;
    cfg.validate()?;
    spec.validate(cfg.encoder_layers)?;
    let enc = Weights {
        tensors,
        origin: weights_path.display().to_string(),
    };
    let head = manifest.head_parts(dir)?;
    let feature_dim = spec.dim(cfg.d_model);
    if head.config.input_dim() != feature_dim {
        bail!(
            "{}: head expects {} features, the encoder and feature spec give {feature_dim}",
            head.origin.display(),
            head.config.input_dim()
        );
    }

    let mut g = GraphBuilder::default();
    let samples = g.input(INPUT_NAME, &[Dim::Named("batch"), Dim::Named("samples")]);
    let mel = log_mel(&mut g, &samples, cfg.num_mel_bins);
    let (upto, reads_last) = match spec.source {
        FeatureSource::HiddenStates => (spec.layers.iter().copied().max().unwrap_or(0), false),
        FeatureSource::LastHiddenState => (cfg.encoder_layers, true),
    };
    let (states, last) = whisper_states(&mut g, &enc, &cfg, &mel, upto)?;
    let voiced = match spec.pooling {
        Pooling::VoicedMean => Some(voiced_weights(&mut g, &samples, &states[0])),
        _ => None,
    };
    let features = if reads_last {
        let last = last.context("the final state")?;
        pool(&mut g, &last, spec.pooling, voiced.as_deref())?
    } else {
        let pooled = spec
            .layers
            .iter()
            .map(|&l| pool(&mut g, &states[l], spec.pooling, voiced.as_deref()))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&str> = pooled.iter().map(|s| s.as_str()).collect();
        match spec.combine {
            Combine::Concat => g.op("Concat", &refs, vec![("axis", Attr::Int(1))]),
            Combine::Mean => {
                let stacked: Vec<String> = refs
                    .iter()
                    .map(|p| {
                        let ax0 = g.i64s(&[0]);
                        g.op2("Unsqueeze", p, &ax0)
                    })
                    .collect();
                let srefs: Vec<&str> = stacked.iter().map(|s| s.as_str()).collect();
                let all = g.op("Concat", &srefs, vec![("axis", Attr::Int(0))]);
                g.op(
                    "ReduceMean",
                    &[&all],
                    vec![("axes", Attr::Ints(vec![0])), ("keepdims", Attr::Int(0))],
                )
            }
        }
    };
    let mut x = features;
    if let Some(s) = &head.scaler {
        let mean = g.f32s("scaler_mean", &[s.mean.len()], s.mean.clone());
        let scale = g.f32s("scaler_scale", &[s.scale.len()], s.scale.clone());
        x = g.op2("Sub", &x, &mean);
        x = g.op2("Div", &x, &scale);
    }
    let hw = Weights {
        tensors: head.tensors,
        origin: head.origin.display().to_string(),
    };
    let logits = match &head.config {
        HeadConfig::Mlp(c) => mlp(
            &mut g,
            &hw,
            &x,
            "classifier",
            c.hidden.len() + 1,
            c.head_activation,
        )?,
        HeadConfig::Transformer(c) => transformer_head(&mut g, &hw, &x, c)?,
    };
    let logits = match manifest
        .familiarity
        .as_ref()
        .filter(|f| f.temperature.is_some())
    {
        Some(spec) => {
            let fam =
                valence_model::classifier::familiarity::Familiarity::load(dir, spec, feature_dim)?;
            familiarity_temperature(&mut g, &x, &logits, &fam)
        }
        None => logits,
    };
    let probs = g.op("Softmax", &[&logits], vec![("axis", Attr::Int(-1))]);
    let labels = manifest.labels.len();
    g.output(
        &probs,
        OUTPUT_NAME,
        &[Dim::Named("batch"), Dim::Fixed(labels as i64)],
    );
    Ok(g.finish(
        &manifest.name,
        &[
            ("labels", manifest.labels.join(",")),
            ("valence.model", manifest.name.clone()),
            ("sample_rate", SAMPLE_RATE.to_string()),
        ],
    ))
}

/// `logits / T(d)` with `d` the scaled features' mean squared distance from the nearest
/// training-corpus centroid ([`valence_model::classifier::familiarity`]).
fn familiarity_temperature(
    g: &mut GraphBuilder,
    x: &str,
    logits: &str,
    fam: &valence_model::classifier::familiarity::Familiarity,
) -> String {
    use valence_model::classifier::familiarity::{MAX_TEMPERATURE, MIN_TEMPERATURE};
    let line = fam.temperature.expect("checked by the caller");
    let centroids = g.f32s(
        "familiarity_centroids",
        &[1, fam.corpora.len(), fam.dim()],
        fam.centroids.clone(),
    );
    let ax1 = g.i64s(&[1]);
    let x3 = g.op2("Unsqueeze", x, &ax1); // [batch, 1, dim]
    let diff = g.op2("Sub", &x3, &centroids); // [batch, corpora, dim]
    let sq = g.op2("Mul", &diff, &diff);
    let mean = g.op(
        "ReduceMean",
        &[&sq],
        vec![("axes", Attr::Ints(vec![2])), ("keepdims", Attr::Int(0))],
    );
    let d = g.op(
        "ReduceMin",
        &[&mean],
        vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(1))],
    ); // [batch, 1]
    let slope = g.scalar(line.slope as f32);
    let intercept = g.scalar(line.intercept as f32);
    let lin = g.op2("Mul", &d, &slope);
    let lin = g.op2("Add", &lin, &intercept);
    let t = g.op("Exp", &[&lin], vec![]);
    let lo = g.scalar(MIN_TEMPERATURE);
    let hi = g.scalar(MAX_TEMPERATURE);
    let t = g.op("Clip", &[&t, &lo, &hi], vec![]);
    g.op2("Div", logits, &t)
}

/// Dynamic batching settings written into `config.pbtxt`.
#[derive(Debug, Clone, Copy)]
pub struct TritonBatching {
    pub max_batch_size: usize,
    pub max_queue_delay_us: u64,
}

/// `config.pbtxt` for the exported graph on Triton's ONNX Runtime backend.
pub fn triton_config(name: &str, labels: &[String], b: TritonBatching) -> String {
    format!(
        r#"# Written by `valence export triton`: 16 kHz mono samples in, label probabilities out.
# Labels, in output order: {labels}
name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ -1 ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {n} ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {delay}
}}
instance_group [
  {{
    count: 1
    kind: KIND_AUTO
  }}
]
parameters {{
  key: "labels"
  value: {{ string_value: "{labels}" }}
}}
"#,
        labels = labels.join(","),
        max_batch = b.max_batch_size,
        n = labels.len(),
        delay = b.max_queue_delay_us,
    )
}

/// Writes `repo/name/config.pbtxt` and `repo/name/1/model.onnx` for the model in `dir`.
pub fn export_triton(dir: &Path, repo: &Path, name: &str, b: TritonBatching) -> Result<()> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        bail!("`{name}` is not a usable Triton model name");
    }
    let manifest = Manifest::read(dir)?;
    let onnx = model_to_onnx(dir)?;
    let model_dir = repo.join(name);
    std::fs::create_dir_all(model_dir.join("1"))
        .with_context(|| format!("cannot create {}", model_dir.display()))?;
    std::fs::write(model_dir.join("1").join("model.onnx"), &onnx)?;
    std::fs::write(
        model_dir.join("config.pbtxt"),
        triton_config(name, &manifest.labels, b),
    )?;
    Ok(())
}
