//! `valence.json`: one file that says how a model directory's parts fit together.
//!
//! ```json
//! {
//!   "format_version": 1,
//!   "name": "valence-whisper-base",
//!   "labels": ["negative", "neutral", "positive"],
//!   "sample_rate": 16000,
//!   "encoder": {"kind": "whisper", "path": "encoder"},
//!   "features": {"source": "hidden_states", "layers": [4, 5], "combine": "mean", "pooling": "mean"},
//!   "scaler": "scaler.safetensors",
//!   "head": {"config": "head_config.json", "weights": "head.safetensors"},
//!   "dtype": "f32"
//! }
//! ```
//! Relative paths are relative to the model directory; `encoder.path` may also start with
//! `@cache/`, meaning the valence cache directory (see [`crate::serving::registry::cache_dir`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{Encoder, EncoderOutput, ValenceModel};
use crate::classifier::head::{self, HeadConfig};
use crate::classifier::scaler::StandardScaler;

pub const MANIFEST_FILE: &str = "valence.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    Wav2vec2,
    Whisper,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderSpec {
    pub kind: EncoderKind,
    /// An HF-layout encoder directory.
    pub path: String,
    /// `"int8"` (or `"q8_0"`, its name in older manifests): on CPUs with an 8-bit kernel faster
    /// than f32 (AVX2 and up) the transformer layers' projections run with 8-bit weights; other
    /// CPUs keep f32 ([`crate::serving::runtime::encoder_weight_format`]). GPUs use `dtype`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<String>,
    /// Fine-tuned weights of some of the base encoder's layers, carried by the model directory
    /// (Whisper only): [`crate::encoders::adapted`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapted: Option<crate::encoders::adapted::AdaptedSpec>,
}

/// Checks a manifest's `encoder.quantize` value: 8-bit weights are the one quantization.
pub fn parse_quantization(s: &str) -> Result<()> {
    match s {
        "int8" | "q8_0" => Ok(()),
        other => bail!("unsupported encoder quantization `{other}` (int8)"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FeatureSource {
    /// `hidden_states[i]` for each listed layer.
    #[default]
    HiddenStates,
    /// The model output.
    LastHiddenState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// Element-wise mean of the listed layers.
    #[default]
    Mean,
    /// Layers side by side.
    Concat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over time.
    #[default]
    Mean,
    /// Mean and standard deviation over time, side by side.
    MeanStd,
    /// Mean over the frames that carry sound: frames whose stretch of input is within
    /// [`VOICED_RANGE_DB`] of the loudest one and above [`VOICED_FLOOR_DBFS`]
    /// ([`voiced_frame_mask`]). A word in 3 s of room sound pools as the word, not the room.
    VoicedMean,
}

/// Frames quieter than the loudest frame by more than this do not count for `voiced_mean`.
pub const VOICED_RANGE_DB: f64 = 30.0;
/// Frames below this level (RMS, dBFS) never count for `voiced_mean`.
pub const VOICED_FLOOR_DBFS: f64 = -55.0;

/// Mean over dimension 1 (frames) of `states` [n, frames, width], counting only the frames
/// [`voiced_frame_mask`] keeps for `samples`: [n, width].
pub fn voiced_mean(states: &Tensor, samples: &[f32]) -> Result<Tensor> {
    let w = voiced_weights(&[samples], states.dim(1)?, states.device())?;
    Ok(states.broadcast_mul(&w)?.sum(1)?)
}

/// Which of `frames` encoder frames (each covering an equal share of `samples`) count as
/// voiced: RMS within [`VOICED_RANGE_DB`] of the loudest frame and above
/// [`VOICED_FLOOR_DBFS`]; every frame when none does (silence pools like `mean`).
pub fn voiced_frame_mask(samples: &[f32], frames: usize) -> Vec<bool> {
    if frames == 0 {
        return Vec::new();
    }
    let db: Vec<f64> = (0..frames)
        .map(|f| {
            let a = f * samples.len() / frames;
            let b = ((f + 1) * samples.len() / frames)
                .max(a + 1)
                .min(samples.len());
            crate::audio::rms_dbfs(samples.get(a..b).unwrap_or(&[]))
        })
        .collect();
    let loudest = db.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let threshold = (loudest - VOICED_RANGE_DB).max(VOICED_FLOOR_DBFS);
    let mask: Vec<bool> = db.iter().map(|&d| d >= threshold).collect();
    if mask.iter().any(|&m| m) {
        mask
    } else {
        vec![true; frames]
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpec {
    #[serde(default)]
    pub source: FeatureSource,
    #[serde(default)]
    pub layers: Vec<usize>,
    #[serde(default)]
    pub combine: Combine,
    #[serde(default)]
    pub pooling: Pooling,
    /// Append the utterance's prosodic statistics ([`crate::classifier::prosody`]) to the pooled states.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prosody: bool,
}

impl FeatureSpec {
    pub fn last_hidden_state() -> Self {
        Self {
            source: FeatureSource::LastHiddenState,
            layers: vec![],
            combine: Combine::Mean,
            pooling: Pooling::Mean,
            prosody: false,
        }
    }

    /// Feature width for an encoder of width `w`.
    pub fn dim(&self, w: usize) -> usize {
        let per_layer = match self.pooling {
            Pooling::Mean | Pooling::VoicedMean => w,
            Pooling::MeanStd => 2 * w,
        };
        let states = match (self.source, self.combine) {
            (FeatureSource::HiddenStates, Combine::Concat) => per_layer * self.layers.len(),
            _ => per_layer,
        };
        states
            + if self.prosody {
                crate::classifier::prosody::DIM
            } else {
                0
            }
    }

    pub fn validate(&self, num_layers: usize) -> Result<()> {
        if self.source == FeatureSource::HiddenStates {
            if self.layers.is_empty() {
                bail!("features.layers is empty");
            }
            if let Some(&bad) = self.layers.iter().find(|&&l| l > num_layers) {
                bail!("features.layers names layer {bad}, the encoder has {num_layers}");
            }
        }
        Ok(())
    }

    /// Pools `out`, the encoder's states for `samples` (which `voiced_mean` and `prosody`
    /// read), into [1, dim] (f32).
    pub fn pool(&self, out: &EncoderOutput, samples: &[f32]) -> Result<Tensor> {
        self.pool_batch(out, &[samples])
    }

    /// Pools a batch: `out` holds the encoder's states for `windows` (all of one length, the
    /// batch's rows in order) into [windows, dim] (f32). One operation per layer for the whole
    /// batch, and one copy of the voiced-frame weights: on a GPU, per-window pooling would cost
    /// more launches and copies than the encoder.
    pub fn pool_batch(&self, out: &EncoderOutput, windows: &[&[f32]]) -> Result<Tensor> {
        let device = out.last_hidden_state.device();
        let frames = out.last_hidden_state.dim(1)?;
        let voiced = match self.pooling {
            Pooling::VoicedMean => Some(voiced_weights(windows, frames, device)?),
            _ => None,
        };
        let pool_one = |t: &Tensor| -> Result<Tensor> {
            let t = t.to_dtype(DType::F32)?; // [batch, frames, width]
            Ok(match self.pooling {
                Pooling::Mean => t.mean(1)?,
                Pooling::MeanStd => {
                    let mean = t.mean(1)?;
                    let var = t.broadcast_sub(&mean.unsqueeze(1)?)?.sqr()?.mean(1)?;
                    Tensor::cat(&[mean, var.sqrt()?], 1)?
                }
                Pooling::VoicedMean => t
                    .broadcast_mul(voiced.as_ref().context("voiced-frame weights")?)?
                    .sum(1)?,
            })
        };
        let states = match self.source {
            FeatureSource::LastHiddenState => pool_one(&out.last_hidden_state)?,
            FeatureSource::HiddenStates => {
                let pooled = self
                    .layers
                    .iter()
                    .map(|&l| {
                        pool_one(out.hidden_states.get(l).with_context(|| {
                            format!(
                                "layer {l} asked for, encoder gave {}",
                                out.hidden_states.len()
                            )
                        })?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                match self.combine {
                    Combine::Mean => (Tensor::stack(&pooled, 0)?.mean(0))?,
                    Combine::Concat => Tensor::cat(&pooled, 1)?,
                }
            }
        };
        if !self.prosody {
            return Ok(states);
        }
        let p: Vec<f32> = windows
            .iter()
            .flat_map(|w| crate::classifier::prosody::utterance_features(w))
            .collect();
        let p = Tensor::from_vec(p, (windows.len(), crate::classifier::prosody::DIM), device)?;
        Ok(Tensor::cat(&[states, p], 1)?)
    }
}

/// `voiced_mean`'s weights for a batch: [windows, frames, 1], each row 1/n on its n voiced
/// frames (see [`voiced_frame_mask`]).
pub fn voiced_weights(windows: &[&[f32]], frames: usize, device: &Device) -> Result<Tensor> {
    let mut w = Vec::with_capacity(windows.len() * frames);
    for samples in windows {
        let mask = voiced_frame_mask(samples, frames);
        let n = mask.iter().filter(|&&m| m).count().max(1) as f32;
        w.extend(mask.iter().map(|&m| m as u8 as f32 / n));
    }
    Ok(Tensor::from_vec(w, (windows.len(), frames, 1), device)?)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeadSpec {
    /// Our own head: a config file and a safetensors file.
    Files { config: String, weights: String },
    /// The reference card's repository files (`config.json`,
    /// `emotion_classifier_complete.safetensors`, `emotion_classifier_scaler.pkl`).
    Card { card: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    pub labels: Vec<String>,
    #[serde(default = "default_rate")]
    pub sample_rate: u32,
    pub encoder: EncoderSpec,
    pub features: FeatureSpec,
    #[serde(default)]
    pub scaler: Option<String>,
    pub head: HeadSpec,
    /// Encoder precision: f32 (default), f16 or bf16 (half precision is meant for CUDA).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// The speech detector whose verdict gates this model's windows: a Silero VAD safetensors
    /// file (relative, absolute or under the cache as `@cache/...`), or absent for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speech_detector: Option<String>,
    /// Training corpora's centroids and the temperature that grows with the distance from
    /// them ([`crate::classifier::familiarity`]); absent: the head's probabilities as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub familiarity: Option<crate::classifier::familiarity::FamiliaritySpec>,
    /// Free-form provenance (training command, data, figures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<serde_json::Value>,
}

fn default_rate() -> u32 {
    16000
}
fn default_dtype() -> String {
    "f32".into()
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "f16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("unsupported dtype `{other}` (f32, f16, bf16)"),
    })
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        if !dir.is_dir() {
            bail!("model directory {} does not exist", dir.display());
        }
        let text = crate::files::read_metadata_string(&path)
            .with_context(|| format!("{} is missing or unreadable", path.display()))?;
        let m: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid valence manifest", path.display()))?;
        if m.format_version != 1 {
            bail!(
                "{}: unsupported format_version {}",
                path.display(),
                m.format_version
            );
        }
        if m.sample_rate != 16000 {
            bail!("{}: only 16 kHz models are supported", path.display());
        }
        if m.labels.len() < 2 {
            bail!("{}: a model needs at least two labels", path.display());
        }
        Ok(m)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join(MANIFEST_FILE),
            serde_json::to_string_pretty(self)? + "\n",
        )?;
        Ok(())
    }

    pub fn resolve(dir: &Path, p: &str) -> PathBuf {
        if let Some(rest) = p.strip_prefix("@cache/") {
            crate::serving::registry::cache_dir().join(rest)
        } else {
            let pb = PathBuf::from(p);
            if pb.is_absolute() { pb } else { dir.join(pb) }
        }
    }

    /// The speech detector this model names, loaded (shared by the process); None when it
    /// names none. A named file that is missing is an error that says how to install it.
    pub fn speech_detector(
        &self,
        dir: &Path,
    ) -> Result<Option<std::sync::Arc<crate::speech::SileroVad>>> {
        let Some(p) = &self.speech_detector else {
            return Ok(None);
        };
        let path = Self::resolve(dir, p);
        if !path.is_file() && p.starts_with("@cache/") {
            bail!(
                "speech detector {} is missing (run `valence setup` to install it)",
                path.display()
            );
        }
        crate::speech::shared_detector(&path).map(Some)
    }

    pub fn encoder_dir(&self, dir: &Path) -> PathBuf {
        Self::resolve(dir, &self.encoder.path)
    }

    /// A Whisper encoder's config and tensors as this model runs them: the base checkpoint,
    /// with the adapted layers the manifest names in place of the base's (what [`Self::load`]
    /// builds the encoder from, and what an exporter writes out). Also returns the base file.
    pub fn whisper_tensors(
        &self,
        dir: &Path,
    ) -> Result<(
        crate::encoders::whisper::WhisperEncoderConfig,
        HashMap<String, Tensor>,
        PathBuf,
    )> {
        if self.encoder.kind != EncoderKind::Whisper {
            bail!(
                "{}: adapted layers need a Whisper encoder, not {:?}",
                dir.join(MANIFEST_FILE).display(),
                self.encoder.kind
            );
        }
        let enc_dir = self.encoder_dir(dir);
        let config = crate::encoders::whisper::read_whisper_config(&enc_dir)?;
        let weights = crate::find_weights_file(&enc_dir)?;
        let mut tensors = crate::encoders::whisper::read_whisper_checkpoint(&weights)?;
        if let Some(spec) = &self.encoder.adapted {
            let path = Self::resolve(dir, &spec.weights);
            crate::encoders::adapted::apply(&mut tensors, spec, &path)
                .with_context(|| format!("{}", dir.join(MANIFEST_FILE).display()))?;
        }
        Ok((config, tensors, weights))
    }

    /// The head's config and tensors and the scaler, as the manifest names them (read, not yet
    /// built): what [`Self::load`] builds the head from, and what an exporter writes out.
    pub fn head_parts(&self, dir: &Path) -> Result<HeadParts> {
        let (config, tensors, origin, card_scaler) = match &self.head {
            HeadSpec::Files { config, weights } => {
                let cpath = Self::resolve(dir, config);
                let cfg: HeadConfig = serde_json::from_str(
                    &crate::files::read_metadata_string(&cpath)
                        .with_context(|| format!("cannot read head config {}", cpath.display()))?,
                )
                .with_context(|| format!("{} is not a valid head config", cpath.display()))?;
                let wpath = Self::resolve(dir, weights);
                (
                    cfg,
                    crate::encoders::weights::read_checkpoint(&wpath)?,
                    wpath,
                    None,
                )
            }
            HeadSpec::Card { card } => {
                let cdir = Self::resolve(dir, card);
                let (cfg, tensors, origin, scaler) = load_card_head(&cdir)?;
                (HeadConfig::Transformer(cfg), tensors, origin, scaler)
            }
        };
        let scaler = match (&self.scaler, card_scaler) {
            (Some(p), _) => Some(StandardScaler::load(&Self::resolve(dir, p))?),
            (None, s) => s,
        };
        Ok(HeadParts {
            config,
            tensors,
            origin,
            scaler,
        })
    }

    /// Loads every part. Errors name the file at fault.
    pub fn load(self, dir: &Path, device: &Device) -> Result<ValenceModel> {
        let mut dtype = parse_dtype(&self.dtype)?;
        if device.is_cpu() && dtype != DType::F32 {
            dtype = DType::F32; // half-precision matmuls are slow or missing on CPU
        }
        let enc_dir = self.encoder_dir(dir);
        if !enc_dir.join("config.json").is_file() {
            bail!(
                "encoder directory {} is missing{}",
                enc_dir.display(),
                if self.encoder.path.starts_with("@cache/") {
                    " (run `valence setup` to fetch and import the default encoder)"
                } else {
                    ""
                }
            );
        }
        let mut encoder = match &self.encoder.adapted {
            None => Encoder::load_dir(&enc_dir, Some(self.encoder.kind), dtype, device)?,
            Some(_) => {
                let (config, tensors, origin) = self.whisper_tensors(dir)?;
                Encoder::Whisper(Box::new(
                    crate::encoders::whisper::WhisperEncoder::from_tensors(
                        config, tensors, &origin, dtype, device,
                    )?,
                ))
            }
        };
        // One description, the format chosen here for this device and CPU.
        let weights = if device.is_cpu() {
            crate::serving::runtime::encoder_weight_format(
                self.encoder.quantize.as_deref(),
                crate::serving::runtime::int8_kernel(),
                &crate::serving::runtime::CpuFeatures::detect(),
            )
        } else {
            crate::serving::runtime::WeightChoice {
                int8: None,
                reason: format!("{dtype:?} on {}", crate::device_name(device)),
            }
        };
        if let Some(q) = &self.encoder.quantize {
            parse_quantization(q)
                .with_context(|| format!("{}", dir.join(MANIFEST_FILE).display()))?;
            if let Some(kernel) = weights.int8 {
                encoder.quantize(kernel)?;
            }
        }
        self.features
            .validate(encoder.num_layers())
            .with_context(|| format!("{}", dir.join(MANIFEST_FILE).display()))?;
        let feature_dim = self.features.dim(encoder.width());

        let HeadParts {
            config: head_cfg,
            tensors: head_tensors,
            origin: head_origin,
            scaler,
        } = self.head_parts(dir)?;
        if head_cfg.input_dim() != feature_dim {
            bail!(
                "{}: head expects {} features, the encoder and feature spec give {}",
                head_origin.display(),
                head_cfg.input_dim(),
                feature_dim
            );
        }
        if head_cfg.num_classes() != self.labels.len() {
            bail!(
                "{}: head has {} classes, the manifest lists {} labels",
                head_origin.display(),
                head_cfg.num_classes(),
                self.labels.len()
            );
        }
        let head =
            head::head_from_tensors(&head_cfg, head_tensors, &head_origin, DType::F32, device)?;
        if let Some(s) = &scaler
            && s.dim() != feature_dim
        {
            bail!(
                "scaler has {} features, the model gives {feature_dim}",
                s.dim()
            );
        }
        let familiarity = self
            .familiarity
            .as_ref()
            .map(|f| crate::classifier::familiarity::Familiarity::load(dir, f, feature_dim))
            .transpose()?;
        let speech_detector = self.speech_detector(dir)?;
        Ok(ValenceModel {
            familiarity,
            speech_detector,
            name: self.name.clone(),
            dir: dir.to_path_buf(),
            labels: self.labels.clone(),
            manifest: self,
            encoder,
            encoder_weights: weights.reason,
            scaler,
            head,
            device: device.clone(),
        })
    }
}

/// A head as read from a model directory (see [`Manifest::head_parts`]).
pub struct HeadParts {
    pub config: HeadConfig,
    /// Tensors by the names [`head::Head`] loads them under.
    pub tensors: std::collections::HashMap<String, Tensor>,
    /// The file the tensors came from (for messages).
    pub origin: PathBuf,
    pub scaler: Option<StandardScaler>,
}

/// The reference card's files: `config.json`, `emotion_classifier_complete.safetensors`, and
/// `emotion_classifier_scaler.pkl` (or a `.json`/`.safetensors` conversion of it).
#[allow(clippy::type_complexity)]
pub fn load_card_head(
    card_dir: &Path,
) -> Result<(
    head::TransformerHeadConfig,
    std::collections::HashMap<String, Tensor>,
    PathBuf,
    Option<StandardScaler>,
)> {
    let cfg_path = card_dir.join("config.json");
    let cfg: serde_json::Value = serde_json::from_str(
        &crate::files::read_metadata_string(&cfg_path)
            .with_context(|| format!("cannot read {}", cfg_path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", cfg_path.display()))?;
    let wpath = card_dir.join("emotion_classifier_complete.safetensors");
    let tensors = crate::encoders::weights::read_checkpoint(&wpath)?;
    let (hc, mapped) =
        head::card_head(tensors, &cfg).with_context(|| format!("{}", wpath.display()))?;
    let mut scaler = None;
    for name in [
        "emotion_classifier_scaler.json",
        "emotion_classifier_scaler.safetensors",
        "emotion_classifier_scaler.pkl",
    ] {
        let p = card_dir.join(name);
        if p.is_file() {
            scaler = Some(StandardScaler::load(&p)?);
            break;
        }
    }
    Ok((hc, mapped, wpath, scaler))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voiced_mask_keeps_the_loud_stretch_of_a_word_in_room_sound() {
        let mut x = vec![0.001f32; 16000];
        for v in &mut x[6400..9600] {
            *v = 0.3;
        }
        let mask = voiced_frame_mask(&x, 50);
        let on: Vec<usize> = (0..50).filter(|&f| mask[f]).collect();
        assert_eq!(on, (20..30).collect::<Vec<_>>());
        assert!(voiced_frame_mask(&[0.0; 1600], 5).iter().all(|&m| m));
        assert!(voiced_frame_mask(&[], 0).is_empty());
    }

    /// `voiced_mean` pools only the voiced frames; `mean` all of them.
    #[test]
    fn voiced_mean_pools_the_voiced_frames_only() -> Result<()> {
        let mut x = vec![0.0f32; 1000];
        for v in &mut x[500..] {
            *v = 0.5;
        }
        // Two frames: the first silent (state 10), the second voiced (state 2).
        let state = Tensor::new(&[[[10f32, 10.], [2., 2.]]], &candle_core::Device::Cpu)?;
        let out = EncoderOutput {
            hidden_states: vec![state.clone()],
            last_hidden_state: state,
        };
        let mut spec = FeatureSpec {
            source: FeatureSource::HiddenStates,
            layers: vec![0],
            combine: Combine::Concat,
            pooling: Pooling::VoicedMean,
            prosody: false,
        };
        assert_eq!(spec.pool(&out, &x)?.to_vec2::<f32>()?, vec![vec![2f32, 2.]]);
        spec.pooling = Pooling::Mean;
        assert_eq!(spec.pool(&out, &x)?.to_vec2::<f32>()?, vec![vec![6f32, 6.]]);
        Ok(())
    }

    /// `prosody` appends the utterance's prosodic statistics after the pooled states, and the
    /// manifest's feature width counts them.
    #[test]
    fn prosody_follows_the_pooled_states() -> Result<()> {
        let x: Vec<f32> = (0..16_000)
            .map(|i| 0.2 * (std::f32::consts::TAU * 180.0 * i as f32 / 16_000.0).sin())
            .collect();
        let state = Tensor::new(&[[[1f32, 3.], [3., 5.]]], &candle_core::Device::Cpu)?;
        let out = EncoderOutput {
            hidden_states: vec![state.clone()],
            last_hidden_state: state,
        };
        let spec = FeatureSpec {
            source: FeatureSource::HiddenStates,
            layers: vec![0],
            combine: Combine::Concat,
            pooling: Pooling::Mean,
            prosody: true,
        };
        let row = spec.pool(&out, &x)?.to_vec2::<f32>()?.remove(0);
        assert_eq!(row.len(), spec.dim(2));
        assert_eq!(row[..2], [2f32, 4.]);
        assert_eq!(row[2..], crate::classifier::prosody::utterance_features(&x));
        let json = serde_json::to_string(&spec)?;
        assert!(json.contains("\"prosody\":true"), "{json}");
        let without: FeatureSpec = serde_json::from_str(&json.replace(",\"prosody\":true", ""))?;
        assert!(!without.prosody, "older manifests have no prosody");
        Ok(())
    }
}
