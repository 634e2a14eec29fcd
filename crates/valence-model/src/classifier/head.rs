//! Classifier heads over a pooled feature vector.
//!
//! `transformer` is the reference model card's head: the vector is cut into `patch_size` chunks,
//! each projected to `d_model`, a CLS token and learned positions are added, then PyTorch
//! `nn.TransformerEncoderLayer`s run and the CLS output goes through an MLP. `mlp` is a plain
//! multi-layer perceptron (a single linear layer when `hidden` is empty). Tensor names follow
//! PyTorch's, so a state dict saved from the reference implementation loads as it is.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};

use candle_nn::layer_norm;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Relu,
    /// erf GELU (PyTorch's "gelu").
    Gelu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::Gelu => x.gelu_erf(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HeadConfig {
    Transformer(TransformerHeadConfig),
    Mlp(MlpHeadConfig),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransformerHeadConfig {
    pub input_dim: usize,
    pub patch_size: usize,
    pub d_model: usize,
    pub nhead: usize,
    pub num_layers: usize,
    pub dim_feedforward: usize,
    #[serde(default)]
    pub dropout: f32,
    #[serde(default)]
    pub norm_first: bool,
    #[serde(default)]
    pub activation: Activation,
    /// A LayerNorm after the last encoder layer (`encoder.norm`).
    #[serde(default)]
    pub final_norm: bool,
    pub hidden: Vec<usize>,
    #[serde(default)]
    pub head_activation: Activation,
    pub num_classes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlpHeadConfig {
    pub input_dim: usize,
    pub hidden: Vec<usize>,
    #[serde(default)]
    pub dropout: f32,
    #[serde(default)]
    pub head_activation: Activation,
    pub num_classes: usize,
}

impl HeadConfig {
    pub fn input_dim(&self) -> usize {
        match self {
            Self::Transformer(c) => c.input_dim,
            Self::Mlp(c) => c.input_dim,
        }
    }
    /// Widths of the classifier MLP's layers, from its input (d_model for the Transformer head,
    /// the feature width for the MLP head) through the hidden layers to the classes.
    pub fn classifier_dims(&self) -> Vec<usize> {
        let (input, hidden, classes) = match self {
            Self::Transformer(c) => (c.d_model, &c.hidden, c.num_classes),
            Self::Mlp(c) => (c.input_dim, &c.hidden, c.num_classes),
        };
        std::iter::once(input)
            .chain(hidden.iter().copied())
            .chain([classes])
            .collect()
    }

    pub fn num_classes(&self) -> usize {
        match self {
            Self::Transformer(c) => c.num_classes,
            Self::Mlp(c) => c.num_classes,
        }
    }

    /// Refuses sizes that would divide by zero or build empty layers at inference time.
    pub fn validate(&self) -> Result<()> {
        if let Some(w) = self.classifier_dims().iter().position(|&d| d == 0) {
            bail!(
                "head: classifier layer {w} has width 0 ({:?})",
                self.classifier_dims()
            );
        }
        if let Self::Transformer(c) = self {
            if c.nhead == 0 || c.patch_size == 0 || c.dim_feedforward == 0 {
                bail!(
                    "transformer head: nhead ({}), patch_size ({}) and dim_feedforward ({}) must be > 0",
                    c.nhead,
                    c.patch_size,
                    c.dim_feedforward
                );
            }
            if c.input_dim == 0 || !c.d_model.is_multiple_of(c.nhead) {
                bail!(
                    "transformer head: d_model {} must be divisible by nhead {} (input_dim {})",
                    c.d_model,
                    c.nhead,
                    c.input_dim
                );
            }
        }
        Ok(())
    }
}

/// Linear layers with an activation (and dropout when training) between them.
struct Mlp {
    layers: Vec<Linear>,
    act: Activation,
    dropout: f32,
}

impl Mlp {
    fn new(dims: &[usize], act: Activation, dropout: f32, vb: VarBuilder) -> Result<Self> {
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| candle_nn::linear(w[0], w[1], vb.pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            act,
            dropout,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(self.forward_with_hidden(x, train)?.1)
    }

    /// The last hidden layer's output (the input for a linear head) and the logits.
    fn forward_with_hidden(
        &self,
        x: &Tensor,
        train: bool,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let mut x = x.clone();
        let n = self.layers.len();
        let mut hidden = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            x = l.forward(&x)?;
            if i + 1 < n {
                x = self.act.apply(&x)?;
                x = dropout(&x, self.dropout, train)?;
                hidden = x.clone();
            }
        }
        Ok((hidden, x))
    }
}

thread_local! {
    /// Dropout masks come from a seeded generator so that training is reproducible
    /// (candle's CPU random numbers cannot be seeded).
    static DROPOUT_RNG: std::cell::RefCell<crate::rng::SeededNormal> =
        std::cell::RefCell::new(crate::rng::SeededNormal::new(0));
}

/// Seeds this thread's dropout masks.
pub fn seed_dropout(seed: u64) {
    DROPOUT_RNG.with(|r| *r.borrow_mut() = crate::rng::SeededNormal::new(seed));
}

fn dropout(x: &Tensor, p: f32, train: bool) -> candle_core::Result<Tensor> {
    if !(train && p > 0.0) {
        return Ok(x.clone());
    }
    let n = x.elem_count();
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = DROPOUT_RNG.with(|r| {
        let mut r = r.borrow_mut();
        (0..n)
            .map(|_| if r.uniform() as f32 >= p { scale } else { 0.0 })
            .collect()
    });
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

/// A layer norm over the last dimension. Training spells it out in tensor ops: candle's fused
/// layer norm (what `LayerNorm::forward` runs on contiguous input) has no backward pass and
/// would cut the gradient to every layer before it. The two agree in value.
fn norm(ln: &LayerNorm, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
    if !train {
        return ln.forward(x);
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centred.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
    let y = y.broadcast_mul(ln.weight())?;
    match ln.bias() {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `nn.TransformerEncoderLayer` (batch_first) with a fused `in_proj_weight`.
struct TorchEncoderLayer {
    in_proj: Linear,
    out_proj: Linear,
    linear1: Linear,
    linear2: Linear,
    norm1: LayerNorm,
    norm2: LayerNorm,
    nhead: usize,
    norm_first: bool,
    act: Activation,
    dropout: f32,
}

impl TorchEncoderLayer {
    fn new(c: &TransformerHeadConfig, vb: VarBuilder) -> Result<Self> {
        let d = c.d_model;
        let sa = vb.pp("self_attn");
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let in_proj = Linear::new(
            sa.get_with_hints((3 * d, d), "in_proj_weight", init)?,
            Some(sa.get_with_hints(3 * d, "in_proj_bias", candle_nn::Init::Const(0.))?),
        );
        Ok(Self {
            in_proj,
            out_proj: candle_nn::linear(d, d, sa.pp("out_proj"))?,
            linear1: candle_nn::linear(d, c.dim_feedforward, vb.pp("linear1"))?,
            linear2: candle_nn::linear(c.dim_feedforward, d, vb.pp("linear2"))?,
            norm1: layer_norm(d, 1e-5, vb.pp("norm1"))?,
            norm2: layer_norm(d, 1e-5, vb.pp("norm2"))?,
            nhead: c.nhead,
            norm_first: c.norm_first,
            act: c.activation,
            dropout: c.dropout,
        })
    }

    fn self_attention(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.nhead;
        let qkv = self.in_proj.forward(x)?;
        let heads = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(D::Minus1, i * d, d)?
                .reshape((b, t, self.nhead, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (heads(0)? * (hd as f64).powf(-0.5))?;
        let (k, v) = (heads(1)?, heads(2)?);
        let scores = q.matmul(&k.t()?)?;
        // Training needs `softmax`: `softmax_last_dim` is a custom op without a backward pass
        // (candle applies it with `apply_op1_no_bwd`), which would cut the gradient to the
        // query and key projections. The two agree in value.
        let att = if train {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let att = dropout(&att, self.dropout, train)?;
        let ctx = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out_proj.forward(&ctx)
    }

    fn feed_forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = dropout(
            &self.act.apply(&self.linear1.forward(x)?)?,
            self.dropout,
            train,
        )?;
        self.linear2.forward(&h)
    }

    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let p = self.dropout;
        let (n1, n2) = (&self.norm1, &self.norm2);
        if self.norm_first {
            let x = (x + dropout(&self.self_attention(&norm(n1, x, train)?, train)?, p, train)?)?;
            &x + dropout(&self.feed_forward(&norm(n2, &x, train)?, train)?, p, train)?
        } else {
            let x = norm(
                n1,
                &(x + dropout(&self.self_attention(x, train)?, p, train)?)?,
                train,
            )?;
            norm(
                n2,
                &(&x + dropout(&self.feed_forward(&x, train)?, p, train)?)?,
                train,
            )
        }
    }
}

struct TransformerHead {
    cfg: TransformerHeadConfig,
    n_patches: usize,
    patch_embed: Linear,
    cls_token: Tensor,
    pos_embed: Tensor,
    layers: Vec<TorchEncoderLayer>,
    final_norm: Option<LayerNorm>,
    classifier: Mlp,
}

impl TransformerHead {
    fn new(cfg: &TransformerHeadConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.patch_size == 0
            || cfg.nhead == 0
            || cfg.d_model == 0
            || !cfg.d_model.is_multiple_of(cfg.nhead)
        {
            bail!(
                "transformer head: d_model {} must be divisible by nhead {} and patch_size > 0",
                cfg.d_model,
                cfg.nhead
            );
        }
        let n_patches = cfg.input_dim.div_ceil(cfg.patch_size);
        let d = cfg.d_model;
        let small = candle_nn::Init::Randn {
            mean: 0.,
            stdev: 0.02,
        };
        let layers = (0..cfg.num_layers)
            .map(|i| TorchEncoderLayer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = if cfg.final_norm {
            Some(layer_norm(d, 1e-5, vb.pp("encoder.norm"))?)
        } else {
            None
        };
        let dims = HeadConfig::Transformer(cfg.clone()).classifier_dims();
        Ok(Self {
            n_patches,
            patch_embed: candle_nn::linear(cfg.patch_size, d, vb.pp("patch_embed"))?,
            cls_token: vb.get_with_hints((1, 1, d), "cls_token", small)?,
            pos_embed: vb.get_with_hints((1, n_patches + 1, d), "pos_embed", small)?,
            layers,
            final_norm,
            classifier: Mlp::new(&dims, cfg.head_activation, cfg.dropout, vb.pp("classifier"))?,
            cfg: cfg.clone(),
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (b, n) = x.dims2()?;
        let padded = self.n_patches * self.cfg.patch_size;
        let x = if padded > n {
            // The last patch is zero-padded when input_dim is not a multiple of patch_size.
            x.pad_with_zeros(1, 0, padded - n)?
        } else {
            x.clone()
        };
        let patches = x.reshape((b, self.n_patches, self.cfg.patch_size))?;
        let tokens = self.patch_embed.forward(&patches)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.cfg.d_model))?;
        let mut h = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.pos_embed)?;
        h = dropout(&h, self.cfg.dropout, train)?;
        for l in &self.layers {
            h = l.forward(&h, train)?;
        }
        if let Some(n) = &self.final_norm {
            h = norm(n, &h, train)?;
        }
        let cls_out = h.narrow(1, 0, 1)?.squeeze(1)?;
        self.classifier.forward(&cls_out, train)
    }
}

enum HeadImpl {
    Transformer(TransformerHead),
    Mlp(Mlp),
}

/// A classifier head: pooled features [batch, input_dim] to logits [batch, classes].
pub struct Head {
    pub config: HeadConfig,
    inner: HeadImpl,
}

impl Head {
    /// Builds the head from a `VarBuilder` (a checkpoint for inference, a `VarMap` for training).
    pub fn new(config: &HeadConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let inner = match config {
            HeadConfig::Transformer(c) => HeadImpl::Transformer(TransformerHead::new(c, vb)?),
            HeadConfig::Mlp(c) => HeadImpl::Mlp(Mlp::new(
                &config.classifier_dims(),
                c.head_activation,
                c.dropout,
                vb.pp("classifier"),
            )?),
        };
        Ok(Self {
            config: config.clone(),
            inner,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match &self.inner {
            HeadImpl::Transformer(h) => h.forward(x, train),
            HeadImpl::Mlp(m) => m.forward(x, train),
        }
    }

    /// An MLP head's last hidden representation and its logits (training objectives that act
    /// on the representation, such as a domain adversary); None for other heads.
    pub fn forward_with_hidden(
        &self,
        x: &Tensor,
        train: bool,
    ) -> Option<candle_core::Result<(Tensor, Tensor)>> {
        match &self.inner {
            HeadImpl::Mlp(m) if m.layers.len() > 1 => Some(m.forward_with_hidden(x, train)),
            _ => None,
        }
    }
}

/// Maps the reference card's checkpoint names onto this module's names and derives every size
/// from tensor shapes; `config` (the card's `config.json`) supplies what shapes cannot tell
/// (heads, norm placement, activations).
pub fn card_head(
    tensors: HashMap<String, Tensor>,
    config: &serde_json::Value,
) -> Result<(TransformerHeadConfig, HashMap<String, Tensor>)> {
    let find = |pred: &dyn Fn(&str) -> bool| -> Option<String> {
        let mut keys: Vec<&String> = tensors.keys().filter(|k| pred(k)).collect();
        keys.sort();
        keys.first().map(|s| s.to_string())
    };
    let enc_key = find(&|k| k.ends_with("layers.0.self_attn.in_proj_weight"))
        .context("no `layers.0.self_attn.in_proj_weight`: not a PyTorch TransformerEncoder head")?;
    let enc_prefix = enc_key
        .trim_end_matches("layers.0.self_attn.in_proj_weight")
        .to_string();
    let cls_key = find(&|k| k.contains("cls")).context("no CLS token tensor")?;
    let pos_key = find(&|k| k.contains("pos") && !k.starts_with(&enc_prefix))
        .context("no positional embedding tensor")?;
    let patch_key = find(&|k| {
        k.ends_with(".weight")
            && !k.starts_with(&enc_prefix)
            && (k.contains("patch") || k.contains("input_proj") || k.contains("embed"))
            && !k.contains("pos")
    })
    .context("no patch projection weight")?;
    let patch_prefix = patch_key.trim_end_matches(".weight").to_string();

    let get = |k: &str| -> Result<Tensor> {
        tensors
            .get(k)
            .cloned()
            .with_context(|| format!("missing tensor {k}"))
    };
    let (d_model, patch_size) = get(&patch_key)?.dims2()?;
    let pos = get(&pos_key)?;
    let n_pos = pos.elem_count() / d_model;
    let mut out = HashMap::new();
    out.insert("patch_embed.weight".into(), get(&patch_key)?);
    out.insert(
        "patch_embed.bias".into(),
        get(&format!("{patch_prefix}.bias"))?,
    );
    out.insert("cls_token".into(), get(&cls_key)?.reshape((1, 1, d_model))?);
    out.insert("pos_embed".into(), pos.reshape((1, n_pos, d_model))?);

    let mut num_layers = 0;
    let mut ffn = 0;
    for (k, v) in &tensors {
        if let Some(rest) = k.strip_prefix(&enc_prefix) {
            if let Some(layer) = rest.strip_prefix("layers.") {
                let i: usize = layer.split('.').next().unwrap_or("").parse().unwrap_or(0);
                num_layers = num_layers.max(i + 1);
                if layer.ends_with("linear1.weight") {
                    ffn = v.dim(0)?;
                }
            }
            out.insert(format!("encoder.{rest}"), v.clone());
        }
    }
    let final_norm = out.contains_key("encoder.norm.weight");
    // Everything else with 2-D weights is the classifier MLP, in index order; a lone LayerNorm
    // before it would be `norm.*`.
    let used: Vec<&str> = vec![&patch_prefix, &cls_key, &pos_key];
    let mut linear_prefixes: Vec<String> = tensors
        .iter()
        .filter(|(k, v)| {
            k.ends_with(".weight")
                && v.rank() == 2
                && !k.starts_with(&enc_prefix)
                && !used.iter().any(|u| k.starts_with(u))
        })
        .map(|(k, _)| k.trim_end_matches(".weight").to_string())
        .collect();
    linear_prefixes.sort_by_key(|p| {
        let idx: usize = p
            .rsplit('.')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (
            p.rsplit_once('.')
                .map(|x| x.0.to_string())
                .unwrap_or_default(),
            idx,
        )
    });
    if linear_prefixes.is_empty() {
        bail!("no classifier layers found after the encoder");
    }
    let mut hidden = Vec::new();
    for (j, p) in linear_prefixes.iter().enumerate() {
        let w = get(&format!("{p}.weight"))?;
        if j + 1 < linear_prefixes.len() {
            hidden.push(w.dim(0)?);
        }
        out.insert(format!("classifier.{j}.weight"), w);
        out.insert(format!("classifier.{j}.bias"), get(&format!("{p}.bias"))?);
    }
    let num_classes = out[&format!("classifier.{}.weight", linear_prefixes.len() - 1)].dim(0)?;
    let num = |names: &[&str], default: f64| -> f64 {
        names
            .iter()
            .find_map(|n| config.get(*n).and_then(|v| v.as_f64()))
            .unwrap_or(default)
    };
    let text = |names: &[&str], default: &str| -> String {
        names
            .iter()
            .find_map(|n| config.get(*n).and_then(|v| v.as_str()))
            .unwrap_or(default)
            .to_string()
    };
    let act = |s: String| -> Result<Activation> {
        match s.as_str() {
            "relu" => Ok(Activation::Relu),
            "gelu" => Ok(Activation::Gelu),
            o => bail!("unsupported activation {o} in the head config"),
        }
    };
    let cfg = TransformerHeadConfig {
        input_dim: num(
            &["input_dim", "feature_dim", "in_dim"],
            ((n_pos - 1) * patch_size) as f64,
        ) as usize,
        patch_size,
        d_model,
        nhead: num(&["nhead", "num_heads", "n_heads"], 8.0) as usize,
        num_layers,
        dim_feedforward: ffn,
        dropout: 0.0,
        norm_first: config
            .get("norm_first")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        activation: act(text(&["activation", "encoder_activation"], "relu"))?,
        final_norm,
        hidden,
        head_activation: act(text(&["head_activation", "classifier_activation"], "relu"))?,
        num_classes,
    };
    if cfg.input_dim.div_ceil(patch_size) + 1 != n_pos {
        bail!(
            "positional embedding has {n_pos} rows but input_dim {} / patch {} needs {}",
            cfg.input_dim,
            patch_size,
            cfg.input_dim.div_ceil(patch_size) + 1
        );
    }
    Ok((cfg, out))
}

/// Loads head weights from named tensors (on CPU) onto `device`.
pub fn head_from_tensors(
    config: &HeadConfig,
    tensors: HashMap<String, Tensor>,
    origin: &std::path::Path,
    dtype: DType,
    device: &Device,
) -> Result<Head> {
    let store = crate::encoders::weights::TensorStore::new(tensors, origin);
    let head = Head::new(config, store.var_builder(dtype, device))
        .with_context(|| format!("loading head weights from {}", origin.display()))?;
    store.check_all_used(&[])?;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transformer(nhead: usize) -> HeadConfig {
        HeadConfig::Transformer(TransformerHeadConfig {
            input_dim: 16,
            patch_size: 4,
            d_model: 8,
            nhead,
            num_layers: 1,
            dim_feedforward: 16,
            dropout: 0.0,
            norm_first: false,
            activation: Activation::Relu,
            final_norm: false,
            hidden: vec![4],
            head_activation: Activation::Relu,
            num_classes: 3,
        })
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// `nhead: 0` used to load and then divide by zero on every window.
    #[test]
    fn sizes_that_cannot_run_are_refused_at_load() {
        let vb = || VarBuilder::zeros(DType::F32, &Device::Cpu);
        let e = Head::new(&transformer(0), vb())
            .err()
            .expect("nhead 0 must fail");
        assert!(e.to_string().contains("nhead"), "{e}");
        assert!(
            Head::new(&transformer(3), vb()).is_err(),
            "8 is not divisible by 3"
        );
        assert!(Head::new(&transformer(2), vb()).is_ok());
        let mlp = HeadConfig::Mlp(MlpHeadConfig {
            input_dim: 4,
            hidden: vec![0],
            dropout: 0.0,
            head_activation: Activation::Relu,
            num_classes: 3,
        });
        assert!(Head::new(&mlp, vb()).is_err());
    }

    /// Training a Transformer head reaches the query and key projections: the attention
    /// softmax and the layer norms after it must carry a gradient.
    #[test]
    fn transformer_head_training_reaches_the_query_and_key_projections() {
        let cfg = transformer(2);
        let varmap = candle_nn::VarMap::new();
        let head = Head::new(
            &cfg,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 16), &Device::Cpu).unwrap();
        // Without dropout, training's spelled-out softmax and layer norm give inference's values.
        let diff =
            max_abs(&(head.forward(&x, true).unwrap() - head.forward(&x, false).unwrap()).unwrap());
        assert!(diff < 1e-5, "{diff}");
        let loss = head
            .forward(&x, true)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        let (_, w) = data
            .iter()
            .find(|(n, _)| n.ends_with("in_proj_weight"))
            .expect("an attention input projection");
        let g = grads.get(w.as_tensor()).expect("a gradient for in_proj");
        // Rows 0..d are the query projection, d..2d the key projection.
        for (what, rows) in [("query", 0..8), ("key", 8..16)] {
            let m = max_abs(&g.narrow(0, rows.start, rows.len()).unwrap());
            assert!(m > 0.0, "no gradient reaches the {what} projection");
        }
    }
}
