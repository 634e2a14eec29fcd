//! Whisper audio encoder: log-mel front end (Hugging Face `WhisperFeatureExtractor` numbers)
//! and the transformer encoder, run on the real length of the audio instead of a padded 30 s
//! chunk, with every hidden state exposed.
//!
//! The encoder is written out here rather than taken from candle-transformers because its
//! `AudioEncoder` returns only its last state and uses the tanh GELU, while Whisper checkpoints
//! are trained with the erf GELU.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::kernels::int8::Int8Kernel;
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, VarBuilder};
use rustfft::{FftPlanner, num_complex::Complex};
use serde::Deserialize;

use crate::EncoderOutput;
use crate::encoders::weights::{TensorStore, read_checkpoint};
use crate::nn::{
    Conv1dLayer, FusedQkv, Marks, Norm, Projection, layer_norm, no_marks, self_attention_marked,
};

pub const SAMPLE_RATE: usize = 16000;
pub const N_FFT: usize = 400;
pub const HOP_LENGTH: usize = 160;
/// Longest input one encoder pass takes (30 s); longer audio is encoded in 30 s pieces.
pub const MAX_SAMPLES: usize = 30 * SAMPLE_RATE;

/// The encoder half of an HF `WhisperConfig`.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct WhisperEncoderConfig {
    pub num_mel_bins: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub max_source_positions: usize,
    #[serde(default = "default_gelu")]
    pub activation_function: String,
}

fn default_gelu() -> String {
    "gelu".into()
}

impl WhisperEncoderConfig {
    /// Every size within what a Whisper encoder can have (the largest has 32 layers of width
    /// 1280 and 1500 positions), so nothing is allocated from a corrupt value.
    pub fn validate(&self) -> Result<()> {
        use crate::files::check_size;
        let f = "Whisper config";
        check_size(f, "num_mel_bins", self.num_mel_bins, 1..=512)?;
        check_size(f, "d_model", self.d_model, 1..=16384)?;
        check_size(f, "encoder_layers", self.encoder_layers, 0..=256)?;
        crate::files::check_heads(
            f,
            ("d_model", self.d_model),
            ("encoder_attention_heads", self.encoder_attention_heads),
        )?;
        check_size(f, "encoder_ffn_dim", self.encoder_ffn_dim, 1..=65536)?;
        check_size(
            f,
            "max_source_positions",
            self.max_source_positions,
            1..=1 << 20,
        )?;
        Ok(())
    }
}

/// Log-mel spectrogram exactly as HF's `WhisperFeatureExtractor` computes it, without padding
/// to 30 s: centred STFT (reflect padding), periodic Hann window, power spectrum, Slaney mel
/// filters, log10, dynamic range clamp to max - 8, then (x + 4) / 4. Returns [n_mels, frames].
pub struct LogMel {
    n_mels: usize,
    filters: Vec<f64>, // [n_mels][N_FFT / 2 + 1]
    /// Per mel band, the range of FFT bins where its triangle is non-zero (a few percent of
    /// the dense matrix, so the filter bank skips the zeros).
    support: Vec<std::ops::Range<usize>>,
    window: Vec<f64>,
    fft: Arc<dyn rustfft::Fft<f64>>,
}

impl LogMel {
    pub fn new(n_mels: usize) -> Self {
        let window = (0..N_FFT).map(hann).collect();
        let filters = slaney_mel_filters(n_mels, N_FFT, SAMPLE_RATE);
        let n_bins = N_FFT / 2 + 1;
        let support = filters
            .chunks(n_bins)
            .map(|row| {
                let first = row.iter().position(|&w| w != 0.0).unwrap_or(0);
                let last = row.iter().rposition(|&w| w != 0.0).map_or(0, |i| i + 1);
                first..last.max(first)
            })
            .collect();
        Self {
            n_mels,
            filters,
            support,
            window,
            fft: FftPlanner::new().plan_fft_forward(N_FFT),
        }
    }

    pub fn n_mels(&self) -> usize {
        self.n_mels
    }

    /// Number of frames for `n` samples (the last STFT frame is dropped, as Whisper does).
    pub fn frames(n: usize) -> usize {
        n / HOP_LENGTH
    }

    pub fn compute(&self, samples: &[f32]) -> Vec<f32> {
        let n_bins = N_FFT / 2 + 1;
        let frames = Self::frames(samples.len());
        if frames == 0 {
            return Vec::new();
        }
        let at = |i: usize| -> f64 { samples[padded_index(i, samples.len())] as f64 };
        let mut mel = vec![0f64; self.n_mels * frames];
        let mut buf = vec![Complex::new(0f64, 0f64); N_FFT];
        let mut power = vec![0f64; n_bins];
        for f in 0..frames {
            let start = f * HOP_LENGTH;
            for (k, b) in buf.iter_mut().enumerate() {
                *b = Complex::new(at(start + k) * self.window[k], 0.0);
            }
            self.fft.process(&mut buf);
            for (p, b) in power.iter_mut().zip(&buf) {
                *p = b.norm_sqr();
            }
            for (m, bins) in self.support.iter().enumerate() {
                let row = &self.filters[m * n_bins..(m + 1) * n_bins];
                let s: f64 = row[bins.clone()]
                    .iter()
                    .zip(&power[bins.clone()])
                    .map(|(w, p)| w * p)
                    .sum();
                mel[m * frames + f] = s.max(1e-10).log10();
            }
        }
        let max = mel.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        mel.iter()
            .map(|&v| ((v.max(max - 8.0) + 4.0) / 4.0) as f32)
            .collect()
    }
}

/// The periodic Hann window of `N_FFT` values at `k`.
fn hann(k: usize) -> f64 {
    0.5 - 0.5 * (2.0 * std::f64::consts::PI * k as f64 / N_FFT as f64).cos()
}

/// The sample at position `i` of the centred STFT's input: `len` samples reflect-padded by
/// `N_FFT / 2` on both sides (numpy "reflect": the edge sample is not repeated; short inputs
/// reflect more than once).
fn padded_index(i: usize, len: usize) -> usize {
    if len == 1 {
        return 0;
    }
    let len = len as isize;
    let mut j = i as isize - (N_FFT / 2) as isize;
    while j < 0 || j >= len {
        if j < 0 {
            j = -j;
        }
        if j >= len {
            j = 2 * (len - 1) - j;
        }
    }
    j as usize
}

/// The periodic Hann window times the DFT basis, [2 * (N_FFT / 2 + 1), N_FFT]: one row per
/// frequency bin of `window * cos`, then one of `-window * sin`. A frame times its transpose
/// gives the real parts, then the imaginary parts, of the windowed FFT.
pub fn windowed_dft_basis() -> Vec<f32> {
    let n_bins = N_FFT / 2 + 1;
    let mut basis = vec![0f32; 2 * n_bins * N_FFT];
    for f in 0..n_bins {
        for k in 0..N_FFT {
            let w = hann(k);
            // Reduced modulo N_FFT first: the exact phase, not a large multiple of 2 pi.
            let phase = 2.0 * std::f64::consts::PI * (f * k % N_FFT) as f64 / N_FFT as f64;
            basis[f * N_FFT + k] = (w * phase.cos()) as f32;
            basis[(n_bins + f) * N_FFT + k] = (-w * phase.sin()) as f32;
        }
    }
    basis
}

/// [`LogMel`] as tensor operations on any device, for a batch [batch, n] of one length: the
/// frames are gathered by index (reflect padding folded into the indices), the windowed DFT
/// is one product with [`windowed_dft_basis`], and the power spectrum meets the mel filters in
/// a second product (filters stacked twice, for the squared real and imaginary parts). The
/// encoder uses it off the CPU, where the FFT would otherwise run on the host for every window
/// of a GPU batch and the host would send 2.5x more data (frames overlap). f32 throughout; the
/// CPU's [`LogMel`] computes in f64 (they agree within ~1e-4, a test checks it).
pub struct TensorLogMel {
    /// [2 * n_bins, N_FFT]
    basis: Tensor,
    /// [n_mels, 2 * n_bins]
    filters: Tensor,
    n_mels: usize,
    /// The frame-gathering indices of the last input length and that length: windows of a
    /// stream all have one length, so they cross to the device once, not with every batch.
    index: std::sync::Mutex<Option<(usize, Tensor)>>,
}

impl TensorLogMel {
    pub fn new(n_mels: usize, device: &Device) -> Result<Self> {
        let n_bins = N_FFT / 2 + 1;
        let basis = Tensor::from_vec(windowed_dft_basis(), (2 * n_bins, N_FFT), device)?;
        let filters: Vec<f32> = slaney_mel_filters(n_mels, N_FFT, SAMPLE_RATE)
            .chunks(n_bins)
            .flat_map(|row| row.iter().chain(row).map(|&v| v as f32))
            .collect();
        let filters = Tensor::from_vec(filters, (n_mels, 2 * n_bins), device)?;
        Ok(Self {
            basis,
            filters,
            n_mels,
            index: std::sync::Mutex::new(None),
        })
    }

    /// Indices into `n` samples of every frame's `N_FFT` values, frame after frame.
    /// The lock is held only to read or replace the cache, never while the indices are built
    /// or copied to the device (two batches may then both build them: harmless).
    fn frame_index(&self, n: usize, device: &Device) -> Result<Tensor> {
        let lock = || self.index.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((len, index)) = &*lock()
            && *len == n
        {
            return Ok(index.clone());
        }
        let index: Vec<u32> = (0..LogMel::frames(n))
            .flat_map(|f| (0..N_FFT).map(move |k| padded_index(f * HOP_LENGTH + k, n) as u32))
            .collect();
        let len = index.len();
        let index = Tensor::from_vec(index, len, device)?;
        *lock() = Some((n, index.clone()));
        Ok(index)
    }

    /// Log-mels of `samples` [batch, n] f32: [batch, n_mels, n / HOP_LENGTH] f32.
    pub fn compute(&self, samples: &Tensor) -> Result<Tensor> {
        let (batch, n) = samples.dims2()?;
        let frames = LogMel::frames(n);
        if frames == 0 {
            bail!("{n} samples make no log-mel frame (at least {HOP_LENGTH} needed)");
        }
        let index = self.frame_index(n, samples.device())?;
        let framed = samples
            .to_dtype(DType::F32)?
            .index_select(&index, 1)?
            .reshape((batch * frames, N_FFT))?;
        let spectrum = framed.matmul(&self.basis.t()?)?;
        let mel = spectrum.sqr()?.matmul(&self.filters.t()?)?;
        let mel = (mel.maximum(1e-10)?.log()? / std::f64::consts::LN_10)?.reshape((
            batch,
            frames,
            self.n_mels,
        ))?;
        // Clamp to each input's loudest value - 8, then (x + 4) / 4.
        let floor = (mel.max_keepdim(2)?.max_keepdim(1)? - 8.0)?;
        let mel = mel.broadcast_maximum(&floor)?.affine(0.25, 1.0)?;
        Ok(mel.transpose(1, 2)?.contiguous()?)
    }
}

fn hz_to_mel_slaney(f: f64) -> f64 {
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if f >= min_log_hz {
        min_log_mel + (f / min_log_hz).ln() / logstep
    } else {
        f / f_sp
    }
}

fn mel_to_hz_slaney(m: f64) -> f64 {
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if m >= min_log_mel {
        min_log_hz * (logstep * (m - min_log_mel)).exp()
    } else {
        f_sp * m
    }
}

/// Triangular Slaney-normalised mel filters over 0..sr/2, as `transformers.audio_utils.
/// mel_filter_bank(norm="slaney", mel_scale="slaney")` (the same as librosa's defaults).
pub fn slaney_mel_filters(n_mels: usize, n_fft: usize, sr: usize) -> Vec<f64> {
    let n_bins = n_fft / 2 + 1;
    let mel_max = hz_to_mel_slaney(sr as f64 / 2.0);
    let filter_freqs: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz_slaney(mel_max * i as f64 / (n_mels + 1) as f64))
        .collect();
    let fft_freqs: Vec<f64> = (0..n_bins)
        .map(|i| (sr / 2) as f64 * i as f64 / (n_bins - 1) as f64)
        .collect();
    let mut out = vec![0f64; n_mels * n_bins];
    for m in 0..n_mels {
        let (lo, mid, hi) = (filter_freqs[m], filter_freqs[m + 1], filter_freqs[m + 2]);
        let enorm = 2.0 / (hi - lo);
        for (b, &f) in fft_freqs.iter().enumerate() {
            let down = (f - lo) / (mid - lo);
            let up = (hi - f) / (hi - mid);
            out[m * n_bins + b] = down.min(up).max(0.0) * enorm;
        }
    }
    out
}

struct EncoderLayer {
    attn_norm: Norm,
    qkv: FusedQkv,
    out: Projection,
    ffn_norm: Norm,
    fc1: Projection,
    fc2: Projection,
    heads: usize,
}

impl EncoderLayer {
    fn forward(&self, x: &Tensor, marks: Marks) -> candle_core::Result<Tensor> {
        let normed = self.attn_norm.forward(x)?;
        marks("layer norms")?;
        let a = self_attention_marked(&normed, &self.qkv, &self.out, self.heads, marks)?;
        let x = (x + a)?;
        marks("residual adds")?;
        let normed = self.ffn_norm.forward(&x)?;
        marks("layer norms")?;
        let hidden = self.fc1.forward_gelu(&normed)?;
        marks("fc1 + GELU")?;
        let f = self.fc2.forward(&hidden)?;
        marks("fc2")?;
        let y = (x + f)?;
        marks("residual adds")?;
        Ok(y)
    }

    fn quantize(&mut self, kernel: Int8Kernel) -> candle_core::Result<()> {
        self.qkv = self.qkv.quantize(kernel)?;
        self.out = self.out.quantize(kernel)?;
        self.fc1 = self.fc1.quantize(kernel)?;
        self.fc2 = self.fc2.quantize(kernel)?;
        Ok(())
    }
}

pub struct WhisperEncoder {
    pub config: WhisperEncoderConfig,
    mel: LogMel,
    /// The log-mel on the model's device: set off the CPU (see [`TensorLogMel`]).
    device_mel: Option<TensorLogMel>,
    conv1: Conv1dLayer,
    conv2: Conv1dLayer,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: Norm,
    device: Device,
    dtype: DType,
}

/// A Whisper checkpoint's tensors, names without the `model.` prefix.
pub fn read_whisper_checkpoint(weights: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(read_checkpoint(weights)?
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("model.").map(str::to_string).unwrap_or(k), v))
        .collect())
}

/// An HF Whisper directory's config.
pub fn read_whisper_config(dir: &Path) -> Result<WhisperEncoderConfig> {
    let config_path = dir.join("config.json");
    let text = crate::files::read_metadata_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a Whisper config", config_path.display()))
}

impl WhisperEncoder {
    /// Loads an HF Whisper directory (`config.json` + `model.safetensors` or
    /// `pytorch_model.bin`); decoder weights, if any, are ignored.
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = read_whisper_config(dir)?;
        let weights = crate::find_weights_file(dir)?;
        Self::load(config, &weights, dtype, device)
    }

    pub fn load(
        config: WhisperEncoderConfig,
        weights: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let tensors = read_whisper_checkpoint(weights)?;
        Self::from_tensors(config, tensors, weights, dtype, device)
    }

    /// Builds the encoder from named tensors (checkpoint names without `model.`), as read by
    /// [`read_whisper_checkpoint`] and perhaps adapted ([`crate::encoders::adapted`]).
    pub fn from_tensors(
        config: WhisperEncoderConfig,
        tensors: HashMap<String, Tensor>,
        weights: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let store = TensorStore::new(tensors, weights);
        let vb = store.var_builder(dtype, device);
        let enc = Self::from_var_builder(config, vb.pp("encoder"), device).with_context(|| {
            format!("loading Whisper encoder weights from {}", weights.display())
        })?;
        store.check_all_used(&["decoder.", "proj_out."])?;
        Ok(enc)
    }

    fn from_var_builder(
        cfg: WhisperEncoderConfig,
        vb: VarBuilder,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        if cfg.activation_function != "gelu" {
            bail!(
                "unsupported Whisper activation `{}`",
                cfg.activation_function
            );
        }
        let d = cfg.d_model;
        let conv = |cin: usize, stride: usize, vb: VarBuilder| -> candle_core::Result<Conv1d> {
            Ok(Conv1d::new(
                vb.get((d, cin, 3), "weight")?,
                Some(vb.get(d, "bias")?),
                Conv1dConfig {
                    padding: 1,
                    stride,
                    ..Default::default()
                },
            ))
        };
        let conv1 = Conv1dLayer::packed_or_dense(conv(cfg.num_mel_bins, 1, vb.pp("conv1"))?)?;
        let conv2 = Conv1dLayer::packed_or_dense(conv(d, 2, vb.pp("conv2"))?)?;
        let positions = vb.get((cfg.max_source_positions, d), "embed_positions.weight")?;
        let mut layers = Vec::with_capacity(cfg.encoder_layers);
        for i in 0..cfg.encoder_layers {
            let l = vb.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            layers.push(EncoderLayer {
                attn_norm: layer_norm(d, 1e-5, l.pp("self_attn_layer_norm"))?,
                qkv: FusedQkv::load(d, false, a.clone())?,
                out: Projection::load(d, d, a.pp("out_proj"))?,
                ffn_norm: layer_norm(d, 1e-5, l.pp("final_layer_norm"))?,
                fc1: Projection::load(d, cfg.encoder_ffn_dim, l.pp("fc1"))?,
                fc2: Projection::load(cfg.encoder_ffn_dim, d, l.pp("fc2"))?,
                heads: cfg.encoder_attention_heads,
            });
        }
        let final_norm = layer_norm(d, 1e-5, vb.pp("layer_norm"))?;
        let device_mel = if device.is_cpu() {
            None
        } else {
            Some(TensorLogMel::new(cfg.num_mel_bins, device)?)
        };
        Ok(Self {
            mel: LogMel::new(cfg.num_mel_bins),
            device_mel,
            config: cfg,
            conv1,
            conv2,
            positions,
            layers,
            final_norm,
            device: device.clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Stores the transformer layers' projection weights and the front end's second
    /// convolution as 8-bit values ([`crate::kernels::int8`]): a quarter of the weight memory
    /// and, with `kernel`, faster than f32 (figures in MODEL_CARD.md). Layer norms, positions
    /// and the cheap 80-mel conv1 stay in the load dtype. A no-op off the CPU: GPUs run the
    /// load dtype.
    pub fn quantize(&mut self, kernel: Int8Kernel) -> Result<()> {
        if !self.device.is_cpu() {
            return Ok(());
        }
        self.conv1 = self.conv1.quantize(kernel)?;
        self.conv2 = self.conv2.quantize(kernel)?;
        for layer in &mut self.layers {
            layer.quantize(kernel)?;
        }
        Ok(())
    }

    /// Encodes 16 kHz mono samples. Audio longer than 30 s is encoded in 30 s pieces whose
    /// frames are concatenated, so every frame has positions the model was trained with.
    pub fn encode(&self, samples: &[f32]) -> Result<EncoderOutput> {
        self.encode_upto(samples, None)
    }

    /// Like [`Self::encode`], stopping after layer `upto` when given (see
    /// [`crate::Encoder::encode_upto`]).
    pub fn encode_upto(&self, samples: &[f32], upto: Option<usize>) -> Result<EncoderOutput> {
        if LogMel::frames(samples.len()) < 2 {
            bail!(
                "audio too short for Whisper: {} samples, at least {} needed",
                samples.len(),
                2 * HOP_LENGTH
            );
        }
        let mut pieces = Vec::new();
        for chunk in samples.chunks(MAX_SAMPLES) {
            if LogMel::frames(chunk.len()) < 2 && !pieces.is_empty() {
                break; // a sliver under 20 ms at the end carries nothing
            }
            let mel = self.log_mel_tensor(&[chunk])?;
            pieces.push(self.forward_mel_upto(&mel, upto)?);
        }
        EncoderOutput::concat_time(pieces)
    }

    /// Encodes several inputs of the same length (at most 30 s) as one batch: row `i` of every
    /// state is what [`Self::encode_upto`] gives for `inputs[i]` alone.
    pub fn encode_batch_upto(
        &self,
        inputs: &[&[f32]],
        upto: Option<usize>,
    ) -> Result<EncoderOutput> {
        let len = crate::batch_length(inputs)?;
        if len > MAX_SAMPLES || inputs.len() == 1 {
            if inputs.len() == 1 {
                return self.encode_upto(inputs[0], upto);
            }
            bail!("batched inputs are at most {MAX_SAMPLES} samples");
        }
        if LogMel::frames(len) < 2 {
            bail!(
                "audio too short for Whisper: {len} samples, at least {} needed",
                2 * HOP_LENGTH
            );
        }
        let mel = self.log_mel_tensor(inputs)?;
        self.forward_mel_upto(&mel, upto)
    }

    /// Log-mels of inputs of one length as [batch, n_mels, frames] on the model's device in its
    /// dtype: computed there off the CPU ([`TensorLogMel`]), by [`Self::log_mels`] on it.
    pub fn log_mel_tensor(&self, inputs: &[&[f32]]) -> Result<Tensor> {
        let len = crate::batch_length(inputs)?;
        let mel = match &self.device_mel {
            Some(device_mel) => {
                let samples: Vec<f32> = inputs.iter().flat_map(|x| x.iter().copied()).collect();
                device_mel.compute(&Tensor::from_vec(
                    samples,
                    (inputs.len(), len),
                    &self.device,
                )?)?
            }
            None => {
                let mel = self.log_mels(inputs);
                let frames = LogMel::frames(len);
                Tensor::from_vec(mel, (inputs.len(), self.mel.n_mels(), frames), &self.device)?
            }
        };
        Ok(mel.to_dtype(self.dtype)?)
    }

    /// The log-mel spectrograms of `inputs`, one after another. A large batch (a GPU's) computes
    /// them on every core: one at a time they would cost more than the GPU's whole batch.
    pub fn log_mels(&self, inputs: &[&[f32]]) -> Vec<f32> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if inputs.len() < 8 || threads < 2 {
            return inputs.iter().flat_map(|x| self.mel.compute(x)).collect();
        }
        let per_thread = inputs.len().div_ceil(threads);
        std::thread::scope(|s| {
            let parts: Vec<_> = inputs
                .chunks(per_thread)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .flat_map(|x| self.mel.compute(x))
                            .collect::<Vec<f32>>()
                    })
                })
                .collect();
            parts
                .into_iter()
                .flat_map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    }

    /// `mel` is [batch, n_mels, frames] with frames <= 3000.
    pub fn forward_mel(&self, mel: &Tensor) -> Result<EncoderOutput> {
        self.forward_mel_upto(mel, None)
    }

    /// The encoder from log-mels [batch, n_mels, frames], through layer `upto` (all: None).
    pub fn forward_mel_upto(&self, mel: &Tensor, upto: Option<usize>) -> Result<EncoderOutput> {
        self.forward_mel_marked(mel, upto, &mut no_marks)
    }

    /// [`Self::forward_mel_upto`], calling `marks` after each step (see [`Marks`]).
    pub fn forward_mel_marked(
        &self,
        mel: &Tensor,
        upto: Option<usize>,
        marks: Marks,
    ) -> Result<EncoderOutput> {
        // Frame-major out of conv1, read as such by conv2 (a view, no copy, on every path).
        let x = self.conv1.forward_gelu_frames(mel)?.transpose(1, 2)?;
        marks("conv1 + GELU")?;
        let x = self.conv2.forward_gelu_frames(&x)?;
        marks("conv2 + GELU")?;
        let t = x.dim(1)?;
        if t > self.config.max_source_positions {
            bail!(
                "{t} encoder frames exceed the model's {} positions",
                self.config.max_source_positions
            );
        }
        let mut h = x.broadcast_add(&self.positions.narrow(0, 0, t)?)?;
        marks("positions")?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(h.clone());
        let n = upto.unwrap_or(self.layers.len()).min(self.layers.len());
        for layer in &self.layers[..n] {
            h = layer.forward(&h, marks)?;
            hidden_states.push(h.clone());
        }
        let last_hidden_state = if n == self.layers.len() {
            self.final_norm.forward(&h)?
        } else {
            h
        };
        Ok(EncoderOutput {
            hidden_states,
            last_hidden_state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tensor log-mel (what GPUs run) against the CPU's f64 FFT one, on inputs long enough
    /// for one reflection and short enough to reflect twice, in a batch of two different signals.
    #[test]
    fn tensor_log_mel_follows_the_fft_one() -> Result<()> {
        let cpu = LogMel::new(80);
        let tensor = TensorLogMel::new(80, &Device::Cpu)?;
        // The last length again: the cached frame indices of another length were replaced.
        for n in [48_000usize, 480, 330, 48_000] {
            let a: Vec<f32> = (0..n)
                .map(|i| (i as f32 * 0.07).sin() * 0.3 + (i as f32 * 0.011).cos() * 0.05)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1)
                .collect();
            let want: Vec<f32> = [&a, &b].iter().flat_map(|x| cpu.compute(x)).collect();
            let samples = Tensor::from_vec([a, b].concat(), (2, n), &Device::Cpu)?;
            let got = tensor.compute(&samples)?;
            assert_eq!(got.dims(), &[2, 80, LogMel::frames(n)]);
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            assert!(worst < 2e-4, "{n} samples: largest difference {worst}");
        }
        Ok(())
    }

    #[test]
    fn padded_index_reflects_without_repeating_the_edge() {
        // numpy.pad(range(5), 200, "reflect") around index 200 (the first sample).
        let at = |i| padded_index(i, 5);
        assert_eq!(
            [at(198), at(199), at(200), at(204), at(205), at(206)],
            [2, 1, 0, 4, 3, 2]
        );
        assert_eq!(padded_index(7, 1), 0);
    }

    #[test]
    fn tensor_log_mel_refuses_input_without_a_frame() {
        let tensor = TensorLogMel::new(80, &Device::Cpu).unwrap();
        let samples = Tensor::zeros((1, 100), DType::F32, &Device::Cpu).unwrap();
        let err = tensor.compute(&samples).unwrap_err().to_string();
        assert!(err.contains("no log-mel frame"), "{err}");
    }
}
