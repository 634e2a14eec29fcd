//! Valence models, independent of GStreamer: encoders (Wav2Vec2, Whisper), pooling, scaler and
//! classifier head, described by a model directory's `valence.json` manifest; the stream
//! resampler and windower ([`audio`]); a registry that shares loaded models and a batching service per model ([`serving`]).
//!
//! Layers: [`kernels`] holds the low-level CPU kernels (each with a plain twin in its tests),
//! [`nn`] the model blocks that call them, and the encoder, head and scaler modules build models
//! from those blocks.

pub mod audio;
pub mod classifier;
pub mod encoders;
pub mod files;
pub mod kernels;
pub mod manifest;
pub mod nn;
pub mod reference;
pub mod rng;
pub mod serving;
pub mod speech;
pub mod synthetic;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

pub use manifest::{EncoderKind, FeatureSource, Manifest, Pooling};

use classifier::{familiarity, head, scaler};
use encoders::{wav2vec2, whisper};

/// The three valence classes, in the order heads output them.
pub const LABELS: [&str; 3] = ["negative", "neutral", "positive"];

/// Hidden states of an encoder for one input (batch 1).
pub struct EncoderOutput {
    /// Index 0 is the input to the first layer, index i the output of layer i.
    pub hidden_states: Vec<Tensor>,
    /// The model output (after the final layer norm where the architecture has one).
    pub last_hidden_state: Tensor,
}

impl EncoderOutput {
    /// Joins pieces of one long input along time.
    pub fn concat_time(mut pieces: Vec<EncoderOutput>) -> Result<Self> {
        if pieces.len() == 1 {
            return Ok(pieces.pop().unwrap());
        }
        let n = pieces[0].hidden_states.len();
        let hidden_states = (0..n)
            .map(|i| {
                let ts: Vec<&Tensor> = pieces.iter().map(|p| &p.hidden_states[i]).collect();
                Tensor::cat(&ts, 1)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lasts: Vec<&Tensor> = pieces.iter().map(|p| &p.last_hidden_state).collect();
        Ok(Self {
            hidden_states,
            last_hidden_state: Tensor::cat(&lasts, 1)?,
        })
    }
}

pub enum Encoder {
    Wav2Vec2(Box<wav2vec2::Wav2Vec2Model>),
    Whisper(Box<whisper::WhisperEncoder>),
}

impl Encoder {
    /// Loads an HF encoder directory, telling the architecture from `config.json`.
    pub fn load_dir(
        dir: &Path,
        kind: Option<EncoderKind>,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let kind = match kind {
            Some(k) => k,
            None => detect_encoder_kind(dir)?,
        };
        Ok(match kind {
            EncoderKind::Wav2vec2 => Self::Wav2Vec2(Box::new(wav2vec2::Wav2Vec2Model::load_dir(
                dir, dtype, dev,
            )?)),
            EncoderKind::Whisper => Self::Whisper(Box::new(whisper::WhisperEncoder::load_dir(
                dir, dtype, dev,
            )?)),
        })
    }

    pub fn encode(&self, samples: &[f32]) -> Result<EncoderOutput> {
        self.encode_upto(samples, None)
    }

    /// Re-stores the transformer layers' projection weights as 8-bit values run by `kernel` (on
    /// the CPU; a no-op on other devices).
    pub fn quantize(&mut self, kernel: kernels::int8::Int8Kernel) -> Result<()> {
        match self {
            Self::Wav2Vec2(m) => m.quantize(kernel),
            Self::Whisper(m) => m.quantize(kernel),
        }
    }

    /// Runs only the layers up to `upto` (all when None): a head that reads layers 2-4 of a
    /// 6-layer encoder does not pay for layers 5 and 6. When cut short, `last_hidden_state` is
    /// the state of layer `upto`, not the model output.
    pub fn encode_upto(&self, samples: &[f32], upto: Option<usize>) -> Result<EncoderOutput> {
        match self {
            Self::Wav2Vec2(m) => m.encode_upto(samples, upto),
            Self::Whisper(m) => m.encode_upto(samples, upto),
        }
    }

    /// Encodes inputs of one length as one batch (see the encoders' `encode_batch_upto`).
    pub fn encode_batch_upto(
        &self,
        inputs: &[&[f32]],
        upto: Option<usize>,
    ) -> Result<EncoderOutput> {
        match self {
            Self::Wav2Vec2(m) => m.encode_batch_upto(inputs, upto),
            Self::Whisper(m) => m.encode_batch_upto(inputs, upto),
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Self::Wav2Vec2(m) => m.config.num_hidden_layers,
            Self::Whisper(m) => m.config.encoder_layers,
        }
    }

    pub fn width(&self) -> usize {
        match self {
            Self::Wav2Vec2(m) => m.config.hidden_size,
            Self::Whisper(m) => m.config.d_model,
        }
    }

    /// Shortest input (in 16 kHz samples) the encoder accepts.
    pub fn min_samples(&self) -> usize {
        match self {
            Self::Wav2Vec2(m) => m.receptive_field(),
            Self::Whisper(_) => 2 * whisper::HOP_LENGTH,
        }
    }
}

/// The indices of `windows` grouped by length (shortest first, each group in input order): an
/// encoder batch, or a server's, holds inputs of one shape.
pub fn groups_by_length(windows: &[&[f32]]) -> Vec<Vec<usize>> {
    let mut lengths: Vec<usize> = windows.iter().map(|w| w.len()).collect();
    lengths.sort_unstable();
    lengths.dedup();
    lengths
        .into_iter()
        .map(|len| {
            (0..windows.len())
                .filter(|&i| windows[i].len() == len)
                .collect()
        })
        .collect()
}

/// The common length of a batch's inputs (an error for an empty batch or mixed lengths).
pub(crate) fn batch_length(inputs: &[&[f32]]) -> Result<usize> {
    let Some(first) = inputs.first() else {
        bail!("empty batch");
    };
    if inputs.iter().any(|x| x.len() != first.len()) {
        bail!("a batch holds inputs of one length");
    }
    Ok(first.len())
}

/// Reads `model_type` from an HF `config.json`.
pub fn detect_encoder_kind(dir: &Path) -> Result<EncoderKind> {
    let path = dir.join("config.json");
    let v: serde_json::Value = serde_json::from_str(
        &files::read_metadata_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", path.display()))?;
    match v.get("model_type").and_then(|m| m.as_str()) {
        Some("wav2vec2") => Ok(EncoderKind::Wav2vec2),
        Some("whisper") => Ok(EncoderKind::Whisper),
        Some(other) => bail!("{}: unsupported model_type `{other}`", path.display()),
        None => bail!("{}: no model_type", path.display()),
    }
}

/// `model.safetensors` if present, else `pytorch_model.bin`.
pub fn find_weights_file(dir: &Path) -> Result<PathBuf> {
    for name in ["model.safetensors", "pytorch_model.bin"] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{}: no model.safetensors or pytorch_model.bin",
        dir.display()
    )
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`. `auto` is CUDA device 0 when this build has CUDA
/// and a GPU answers, else the CPU.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available()
                && let Ok(d) = Device::new_cuda(0)
            {
                return Ok(d);
            }
            Ok(Device::Cpu)
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let idx: usize = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .with_context(|| format!("bad CUDA index in `{s}`"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "device `{s}` asked for, but this build has no CUDA (build with --features cuda)"
                );
            }
            Device::new_cuda(idx).with_context(|| format!("cannot open CUDA device {idx}"))
        }
        other => bail!("unknown device `{other}` (auto, cpu, cuda or cuda:N)"),
    }
}

/// A stable name for a device, used in cache keys and messages.
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Numerically stable softmax of one logit row.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// A loaded valence model: encoder, feature pooling, scaler and head.
pub struct ValenceModel {
    pub name: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub encoder: Encoder,
    /// The weight format the encoder runs with here, and why (see [`serving::runtime::encoder_weight_format`]).
    pub encoder_weights: String,
    pub scaler: Option<scaler::StandardScaler>,
    pub head: head::Head,
    /// Training corpora's centroids and the temperature that follows the distance from them.
    pub familiarity: Option<familiarity::Familiarity>,
    pub labels: Vec<String>,
    pub device: Device,
    /// The speech detector the manifest names, if any (shared by the process).
    pub speech_detector: Option<std::sync::Arc<speech::SileroVad>>,
}

/// What one classification gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Probabilities in `labels` order.
    pub probabilities: Vec<f32>,
}

/// Index and value of the largest entry (the first one on ties).
pub fn argmax(values: &[f32]) -> (usize, f32) {
    values
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a })
}

impl Prediction {
    pub fn best(&self) -> (usize, f32) {
        argmax(&self.probabilities)
    }
}

impl ValenceModel {
    /// Loads a model directory (one holding `valence.json`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        manifest.load(dir, device)
    }

    /// Mean-pooled features the head reads, as configured in the manifest.
    pub fn pooled_features(&self, out: &EncoderOutput, samples: &[f32]) -> Result<Tensor> {
        self.manifest.features.pool(out, samples)
    }

    /// Encoder features for `samples` (16 kHz mono): [1, feature_dim], before the scaler.
    pub fn features(&self, samples: &[f32]) -> Result<Tensor> {
        let out = self.encoder.encode_upto(samples, self.layers_needed())?;
        self.pooled_features(&out, samples)
    }

    /// Head probabilities for pooled features [batch, dim].
    pub fn classify_features(&self, features: &Tensor) -> Result<Vec<Prediction>> {
        let x = features.to_device(&self.device)?.to_dtype(DType::F32)?;
        let x = match &self.scaler {
            Some(s) => s.transform(&x)?,
            None => x,
        };
        let mut logits = self
            .head
            .forward(&x, false)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        if let Some(f) = self
            .familiarity
            .as_ref()
            .filter(|f| f.temperature.is_some())
        {
            let rows = x.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (l, r) in logits.iter_mut().zip(&rows) {
                let t = f.temperature_for(r);
                l.iter_mut().for_each(|v| *v /= t);
            }
        }
        Ok(logits
            .iter()
            .map(|row| Prediction {
                probabilities: softmax(row),
            })
            .collect())
    }

    /// Classifies 16 kHz mono samples as one utterance.
    pub fn classify(&self, samples: &[f32]) -> Result<Prediction> {
        let f = self.features(samples)?;
        Ok(self.classify_features(&f)?.remove(0))
    }

    /// The deepest layer the features read (None: the whole encoder).
    pub fn layers_needed(&self) -> Option<usize> {
        let spec = &self.manifest.features;
        match spec.source {
            FeatureSource::HiddenStates => spec.layers.iter().max().copied(),
            FeatureSource::LastHiddenState => None,
        }
    }

    /// Classifies many windows at once, each as [`Self::classify`] would alone. Windows of one
    /// length run as one batch through the encoder (no padding, so no window changes another's
    /// result); each window gets its own outcome, so one bad window fails only itself.
    pub fn classify_batch(&self, windows: &[&[f32]]) -> Vec<Result<Prediction>> {
        let mut outcomes: Vec<Option<Result<Prediction>>> = windows.iter().map(|_| None).collect();
        for members in groups_by_length(windows) {
            let group: Vec<&[f32]> = members.iter().map(|&i| windows[i]).collect();
            match self.classify_same_length(&group) {
                Ok(preds) => {
                    for (&i, p) in members.iter().zip(preds) {
                        outcomes[i] = Some(Ok(p));
                    }
                }
                // The batch failed as a whole: classify its windows one by one, so the error
                // each gets is its own.
                Err(_) if group.len() > 1 => {
                    for &i in &members {
                        outcomes[i] = Some(self.classify(windows[i]));
                    }
                }
                Err(e) => outcomes[members[0]] = Some(Err(e)),
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(anyhow::anyhow!("window not classified"))))
            .collect()
    }

    fn classify_same_length(&self, windows: &[&[f32]]) -> Result<Vec<Prediction>> {
        if windows.len() == 1 {
            return Ok(vec![self.classify(windows[0])?]);
        }
        let out = self
            .encoder
            .encode_batch_upto(windows, self.layers_needed())?;
        let features = self.manifest.features.pool_batch(&out, windows)?;
        self.classify_features(&features)
    }
}
