//! Wav2Vec2 encoder with Hugging Face `transformers` semantics (candle-transformers has none).
//!
//! Both layouts are covered: `feat_extract_norm = "group"` (base models: group norm on the first
//! conv only, post-norm transformer layers, encoder layer norm before the layers) and
//! `"layer"` with `do_stable_layer_norm` (large-lv60, xlsr-53: layer norm in every conv,
//! pre-norm layers, encoder layer norm after the last layer).

use std::path::Path;

use crate::kernels::int8::Int8Kernel;
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv1dConfig, GroupNorm, VarBuilder};
use serde::Deserialize;

use crate::EncoderOutput;
use crate::encoders::weights::{TensorStore, normalize_names, read_checkpoint};
use crate::nn::{FrameConv1d, FusedQkv, Norm, Projection, gelu_erf, layer_norm, self_attention};

fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_gelu() -> String {
    "gelu".into()
}

/// The subset of HF `Wav2Vec2Config` that inference needs.
#[derive(Debug, Clone, Deserialize)]
pub struct Wav2Vec2Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_gelu")]
    pub hidden_act: String,
    #[serde(default = "default_gelu")]
    pub feat_extract_activation: String,
    pub feat_extract_norm: String,
    #[serde(default)]
    pub do_stable_layer_norm: bool,
    pub conv_dim: Vec<usize>,
    pub conv_kernel: Vec<usize>,
    pub conv_stride: Vec<usize>,
    #[serde(default)]
    pub conv_bias: bool,
    pub num_conv_pos_embeddings: usize,
    pub num_conv_pos_embedding_groups: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl Wav2Vec2Config {
    /// Every size within what a Wav2Vec2 model can have, so nothing is allocated or multiplied
    /// from a corrupt value.
    pub fn validate(&self) -> Result<()> {
        use crate::files::check_size;
        let f = "Wav2Vec2 config";
        let n = self.conv_dim.len();
        if self.conv_kernel.len() != n || self.conv_stride.len() != n || n == 0 {
            bail!("conv_dim, conv_kernel and conv_stride must have the same non-zero length");
        }
        check_size(f, "number of conv layers", n, 1..=32)?;
        for i in 0..n {
            check_size(f, "conv_dim", self.conv_dim[i], 1..=16384)?;
            check_size(f, "conv_kernel", self.conv_kernel[i], 1..=1024)?;
            check_size(f, "conv_stride", self.conv_stride[i], 1..=1024)?;
        }
        check_size(f, "hidden_size", self.hidden_size, 1..=16384)?;
        check_size(f, "num_hidden_layers", self.num_hidden_layers, 0..=256)?;
        crate::files::check_heads(
            f,
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
        )?;
        check_size(f, "intermediate_size", self.intermediate_size, 1..=65536)?;
        check_size(
            f,
            "num_conv_pos_embeddings",
            self.num_conv_pos_embeddings,
            1..=1024,
        )?;
        check_size(
            f,
            "num_conv_pos_embedding_groups",
            self.num_conv_pos_embedding_groups,
            1..=self.hidden_size,
        )?;
        if !self
            .hidden_size
            .is_multiple_of(self.num_conv_pos_embedding_groups)
        {
            bail!("{f}: hidden_size is not divisible by num_conv_pos_embedding_groups");
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            bail!("{f}: layer_norm_eps must be a positive number");
        }
        Ok(())
    }
}

/// HF `preprocessor_config.json` fields that change the numbers.
#[derive(Debug, Clone, Deserialize)]
pub struct Wav2Vec2Preprocessor {
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    #[serde(default = "default_rate")]
    pub sampling_rate: usize,
}

fn default_rate() -> usize {
    16000
}

impl Default for Wav2Vec2Preprocessor {
    fn default() -> Self {
        Self {
            do_normalize: true,
            sampling_rate: 16000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "relu" => Self::Relu,
            other => bail!("unsupported activation `{other}`"),
        })
    }
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluErf => gelu_erf(x),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
        }
    }
}

struct FeatureConv {
    /// With the layer norm ("layer" variant) and an erf GELU fused in where the layer has them.
    conv: FrameConv1d,
    /// The "group" variant's first layer: per-channel normalisation over time, after the conv.
    group_norm: Option<GroupNorm>,
    /// The activation, when not fused into `conv`.
    act: Option<Activation>,
}

struct Attention {
    qkv: FusedQkv,
    out: Projection,
    heads: usize,
}

impl Attention {
    fn load(cfg: &Wav2Vec2Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size; // divisible by the heads: checked by `Wav2Vec2Config::validate`
        Ok(Self {
            qkv: FusedQkv::load(h, true, vb.clone())?,
            out: Projection::load(h, h, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self_attention(x, &self.qkv, &self.out, self.heads)
    }
}

struct FeedForward {
    intermediate: Projection,
    output: Projection,
    act: Activation,
}

impl FeedForward {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = match self.act {
            Activation::GeluErf => self.intermediate.forward_gelu(x)?,
            act => act.apply(&self.intermediate.forward(x)?)?,
        };
        self.output.forward(&hidden)
    }
}

struct EncoderLayer {
    attention: Attention,
    layer_norm: Norm,
    feed_forward: FeedForward,
    final_layer_norm: Norm,
    pre_norm: bool,
}

impl EncoderLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.pre_norm {
            let h = (x + self.attention.forward(&self.layer_norm.forward(x)?)?)?;
            &h + self
                .feed_forward
                .forward(&self.final_layer_norm.forward(&h)?)?
        } else {
            let h = self
                .layer_norm
                .forward(&(x + self.attention.forward(x)?)?)?;
            self.final_layer_norm
                .forward(&(&h + self.feed_forward.forward(&h)?)?)
        }
    }
}

/// A Wav2Vec2 model (feature encoder + transformer), without any task head.
pub struct Wav2Vec2Model {
    pub config: Wav2Vec2Config,
    pub preprocessor: Wav2Vec2Preprocessor,
    convs: Vec<FeatureConv>,
    projection_norm: Norm,
    projection: Projection,
    pos_conv: FrameConv1d,
    pos_conv_drop_last: bool,
    encoder_norm: Norm,
    layers: Vec<EncoderLayer>,
    device: Device,
    dtype: DType,
}

/// Tensor names a Wav2Vec2 checkpoint may carry that inference does not need.
const IGNORED_KEYS: &[&str] = &[
    "quantizer.",
    "project_q.",
    "project_hid.",
    "lm_head.",
    "masked_spec_embed",
    "classifier.",
    "projector.",
    "adapter.",
];

impl Wav2Vec2Model {
    /// Loads a Hugging Face model directory: `config.json`, `model.safetensors` or
    /// `pytorch_model.bin`, and `preprocessor_config.json` when present.
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: Wav2Vec2Config = serde_json::from_str(
            &crate::files::read_metadata_string(&config_path)
                .with_context(|| format!("cannot read {}", config_path.display()))?,
        )
        .with_context(|| format!("{} is not a Wav2Vec2 config", config_path.display()))?;
        let pre_path = dir.join("preprocessor_config.json");
        let preprocessor = if pre_path.is_file() {
            serde_json::from_str(&crate::files::read_metadata_string(&pre_path)?)
                .with_context(|| format!("{} is not valid", pre_path.display()))?
        } else {
            Wav2Vec2Preprocessor::default()
        };
        let weights = crate::find_weights_file(dir)?;
        Self::load(config, preprocessor, &weights, dtype, device)
    }

    pub fn load(
        config: Wav2Vec2Config,
        preprocessor: Wav2Vec2Preprocessor,
        weights: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let tensors = normalize_names(read_checkpoint(weights)?, "wav2vec2.");
        let store = TensorStore::new(tensors, weights);
        let vb = store.var_builder(dtype, device);
        let model = Self::from_var_builder(config, preprocessor, vb, device)
            .with_context(|| format!("loading Wav2Vec2 weights from {}", weights.display()))?;
        store.check_all_used(IGNORED_KEYS)?;
        Ok(model)
    }

    fn from_var_builder(
        cfg: Wav2Vec2Config,
        preprocessor: Wav2Vec2Preprocessor,
        vb: VarBuilder,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.conv_dim.len();
        let layer_norm_convs = match cfg.feat_extract_norm.as_str() {
            "layer" => true,
            "group" => false,
            other => bail!("unsupported feat_extract_norm `{other}`"),
        };
        let conv_act = Activation::parse(&cfg.feat_extract_activation)?;
        let fe = vb.pp("feature_extractor.conv_layers");
        let mut convs = Vec::with_capacity(n);
        for i in 0..n {
            let c_in = if i == 0 { 1 } else { cfg.conv_dim[i - 1] };
            let c_out = cfg.conv_dim[i];
            let lvb = fe.pp(i);
            let weight = lvb
                .pp("conv")
                .get((c_out, c_in, cfg.conv_kernel[i]), "weight")?;
            let bias = if cfg.conv_bias {
                Some(lvb.pp("conv").get(c_out, "bias")?)
            } else {
                None
            };
            let mut conv = FrameConv1d::new(
                weight,
                bias,
                Conv1dConfig {
                    stride: cfg.conv_stride[i],
                    ..Default::default()
                },
            )?;
            let nvb = lvb.pp("layer_norm");
            let mut group_norm = None;
            if layer_norm_convs {
                conv = conv.with_layer_norm(
                    nvb.get(c_out, "weight")?,
                    nvb.get(c_out, "bias")?,
                    cfg.layer_norm_eps,
                )?;
            } else if i == 0 {
                group_norm = Some(GroupNorm::new(
                    nvb.get(c_out, "weight")?,
                    nvb.get(c_out, "bias")?,
                    c_out,
                    c_out,
                    cfg.layer_norm_eps,
                )?);
            }
            let act = match conv_act {
                Activation::GeluErf if group_norm.is_none() => {
                    conv = conv.with_gelu();
                    None
                }
                other => Some(other),
            };
            convs.push(FeatureConv {
                conv,
                group_norm,
                act,
            });
        }
        let last = *cfg.conv_dim.last().unwrap_or(&0);
        let h = cfg.hidden_size;
        let fp = vb.pp("feature_projection");
        let projection_norm = layer_norm(last, cfg.layer_norm_eps, fp.pp("layer_norm"))?;
        let projection = Projection::load(last, h, fp.pp("projection"))?;

        let enc = vb.pp("encoder");
        let pc = enc.pp("pos_conv_embed.conv");
        let k = cfg.num_conv_pos_embeddings;
        let groups = cfg.num_conv_pos_embedding_groups;
        // Weight norm with dim=2: w = g * v / ||v||, the norm taken over dims 0 and 1.
        let g = pc.get((1, 1, k), "weight_g")?;
        let v = pc.get((h, h / groups, k), "weight_v")?;
        let v_norm = v.sqr()?.sum_keepdim(0)?.sum_keepdim(1)?.sqrt()?;
        let pos_weight = v.broadcast_mul(&g.broadcast_div(&v_norm)?)?;
        let pos_conv = FrameConv1d::new(
            pos_weight,
            Some(pc.get(h, "bias")?),
            Conv1dConfig {
                padding: k / 2,
                groups,
                ..Default::default()
            },
        )?
        .with_gelu();
        let encoder_norm = layer_norm(h, cfg.layer_norm_eps, enc.pp("layer_norm"))?;
        let act = Activation::parse(&cfg.hidden_act)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = enc.pp(format!("layers.{i}"));
            let ff = l.pp("feed_forward");
            layers.push(EncoderLayer {
                attention: Attention::load(&cfg, l.pp("attention"))?,
                layer_norm: layer_norm(h, cfg.layer_norm_eps, l.pp("layer_norm"))?,
                feed_forward: FeedForward {
                    intermediate: Projection::load(
                        h,
                        cfg.intermediate_size,
                        ff.pp("intermediate_dense"),
                    )?,
                    output: Projection::load(cfg.intermediate_size, h, ff.pp("output_dense"))?,
                    act,
                },
                final_layer_norm: layer_norm(h, cfg.layer_norm_eps, l.pp("final_layer_norm"))?,
                pre_norm: cfg.do_stable_layer_norm,
            });
        }
        Ok(Self {
            pos_conv_drop_last: k.is_multiple_of(2),
            config: cfg,
            preprocessor,
            convs,
            projection_norm,
            projection,
            pos_conv,
            encoder_norm,
            layers,
            device: device.clone(),
            dtype: vb.dtype(),
        })
    }

    /// Stores the transformer layers' projection weights, the feature encoder's convolutions
    /// after the first and the positional convolution as 8-bit values (see
    /// [`crate::encoders::whisper::WhisperEncoder::quantize`]; a no-op off the CPU).
    pub fn quantize(&mut self, kernel: Int8Kernel) -> Result<()> {
        if !self.device.is_cpu() {
            return Ok(());
        }
        for c in &mut self.convs {
            c.conv.quantize(kernel)?;
        }
        self.pos_conv.quantize(kernel)?;
        for l in &mut self.layers {
            l.attention.qkv = l.attention.qkv.quantize(kernel)?;
            l.attention.out = l.attention.out.quantize(kernel)?;
            l.feed_forward.intermediate = l.feed_forward.intermediate.quantize(kernel)?;
            l.feed_forward.output = l.feed_forward.output.quantize(kernel)?;
        }
        Ok(())
    }

    /// Number of samples the conv feature encoder needs for one output frame.
    pub fn receptive_field(&self) -> usize {
        let mut field = 1;
        for (k, s) in self
            .config
            .conv_kernel
            .iter()
            .zip(&self.config.conv_stride)
            .rev()
        {
            field = (field - 1) * s + k;
        }
        field
    }

    /// Applies the feature extractor's normalisation: zero mean, unit variance per utterance.
    pub fn preprocess(&self, samples: &[f32]) -> Vec<f32> {
        if !self.preprocessor.do_normalize || samples.is_empty() {
            return samples.to_vec();
        }
        let n = samples.len() as f64;
        let mean = samples.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = samples
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        let inv = 1.0 / (var + 1e-7).sqrt();
        samples
            .iter()
            .map(|&x| ((x as f64 - mean) * inv) as f32)
            .collect()
    }

    /// Runs the model on 16 kHz mono samples (preprocessing included).
    pub fn encode(&self, samples: &[f32]) -> Result<EncoderOutput> {
        self.encode_upto(samples, None)
    }

    /// Like [`Self::encode`], stopping after layer `upto` when given.
    pub fn encode_upto(&self, samples: &[f32], upto: Option<usize>) -> Result<EncoderOutput> {
        if samples.len() < self.receptive_field() {
            bail!(
                "audio too short for Wav2Vec2: {} samples, at least {} needed",
                samples.len(),
                self.receptive_field()
            );
        }
        let x = self.preprocess(samples);
        let x = Tensor::from_vec(x, (1, 1, samples.len()), &self.device)?.to_dtype(self.dtype)?;
        self.forward_upto(&x, upto)
    }

    /// Encodes several inputs of the same length as one batch: row `i` of every state is what
    /// [`Self::encode_upto`] gives for `inputs[i]` alone (normalisation is per input).
    pub fn encode_batch_upto(
        &self,
        inputs: &[&[f32]],
        upto: Option<usize>,
    ) -> Result<EncoderOutput> {
        let len = crate::batch_length(inputs)?;
        if len < self.receptive_field() {
            bail!(
                "audio too short for Wav2Vec2: {len} samples, at least {} needed",
                self.receptive_field()
            );
        }
        let mut x = Vec::with_capacity(len * inputs.len());
        for input in inputs {
            x.extend(self.preprocess(input));
        }
        let x = Tensor::from_vec(x, (inputs.len(), 1, len), &self.device)?.to_dtype(self.dtype)?;
        self.forward_upto(&x, upto)
    }

    /// `input` is [batch, 1, samples], already preprocessed.
    pub fn forward(&self, input: &Tensor) -> Result<EncoderOutput> {
        self.forward_upto(input, None)
    }

    fn forward_upto(&self, input: &Tensor, upto: Option<usize>) -> Result<EncoderOutput> {
        // Channels-last throughout: [batch, frames, channels] (see `conv`): the layer norms
        // then normalise contiguous rows and the projection needs no transpose.
        let mut x = input.transpose(1, 2)?;
        for c in &self.convs {
            x = c.conv.forward(&x)?;
            if let Some(gn) = &c.group_norm {
                // Per-channel statistics over time: candle's group norm wants channels first.
                x = gn
                    .forward(&x.transpose(1, 2)?.contiguous()?)?
                    .transpose(1, 2)?
                    .contiguous()?;
            }
            if let Some(act) = c.act {
                x = act.apply(&x)?;
            }
        }
        let x = self
            .projection
            .forward(&self.projection_norm.forward(&x)?)?;

        let mut pos = self.pos_conv.forward(&x)?; // GELU included
        if self.pos_conv_drop_last {
            let t = pos.dim(1)?;
            pos = pos.narrow(1, 0, t - 1)?;
        }
        let mut h = (x + pos)?;
        if !self.config.do_stable_layer_norm {
            h = self.encoder_norm.forward(&h)?;
        }
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(h.clone());
        let n = upto.unwrap_or(self.layers.len()).min(self.layers.len());
        for layer in &self.layers[..n] {
            h = layer.forward(&h)?;
            hidden_states.push(h.clone());
        }
        let last_hidden_state = if n < self.layers.len() {
            h
        } else if self.config.do_stable_layer_norm {
            self.encoder_norm.forward(&h)?
        } else {
            h
        };
        Ok(EncoderOutput {
            hidden_states,
            last_hidden_state,
        })
    }
}
