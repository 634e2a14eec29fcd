//! Adapting the encoder with the head (issue #12, item 4): low-rank adapters (LoRA, Hu et al.
//! 2021) on the query and value projections of the Whisper layer that makes the deepest hidden
//! state the head reads, trained together with the head.
//!
//! The layers below it stay as imported and run as the model runs them (8-bit where it
//! quantizes), so their output is computed once per window ([`Window`]) and only the adapted
//! layer runs in each training step, in plain differentiable candle ops. The adapters start at
//! zero (B = 0), so training starts from exactly the frozen encoder's features. Attention
//! pooling of the adapted layer's frames (a learned query) is the alternative to its voiced mean.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};

use crate::training::{adamw, class_weights, clip_gradients, loss_fn, scheduled_lr, shuffle};
use valence_model::classifier::head::{Head, HeadConfig, seed_dropout};
use valence_model::classifier::scaler::StandardScaler;
use valence_model::rng::SeededNormal;
use valence_model::{Encoder, manifest::voiced_weights};

/// One Whisper encoder layer in plain candle ops (so that gradients flow through it), with
/// optional low-rank adapters on its query and value projections.
pub struct AdaptedLayer {
    /// Frozen weights, HF names within the layer (`self_attn.q_proj.weight`, ...); projection
    /// weights are stored transposed ([in, out]) for `x W`.
    frozen: HashMap<String, Tensor>,
    heads: usize,
    /// (A [rank, width], B [width, rank]) for the query and the value projection.
    lora: Option<[(Var, Var); 2]>,
    /// alpha / rank.
    scale: f64,
    /// Attention pooling's query [width, 1] (None: voiced mean).
    pool_query: Option<Var>,
}

/// The projections the adapters sit on.
const ADAPTED: [&str; 2] = ["self_attn.q_proj", "self_attn.v_proj"];

impl AdaptedLayer {
    /// Layer `index` of the HF Whisper encoder in `encoder_dir`, with adapters of `rank` (none
    /// for 0) whose A is drawn from `seed` and whose B is zero.
    pub fn load(
        encoder_dir: &Path,
        index: usize,
        rank: usize,
        alpha: f64,
        seed: u64,
    ) -> Result<Self> {
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(encoder_dir.join("config.json"))
                .with_context(|| format!("reading {}/config.json", encoder_dir.display()))?,
        )?;
        let heads = config["encoder_attention_heads"]
            .as_u64()
            .context("config.json lacks encoder_attention_heads")? as usize;
        let weights = valence_model::find_weights_file(encoder_dir)?;
        let prefix = format!("encoder.layers.{index}.");
        let mut frozen = HashMap::new();
        for (name, t) in valence_model::encoders::weights::read_checkpoint(&weights)? {
            let name = name.strip_prefix("model.").unwrap_or(&name);
            if let Some(rest) = name.strip_prefix(&prefix) {
                let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
                let t = if t.rank() == 2 {
                    t.t()?.contiguous()?
                } else {
                    t
                };
                frozen.insert(rest.to_string(), t);
            }
        }
        if frozen.is_empty() {
            bail!("{} has no encoder layer {index}", weights.display());
        }
        let width = frozen
            .get("self_attn.q_proj.weight")
            .context("the layer has no query projection")?
            .dim(0)?;
        let lora = if rank == 0 {
            None
        } else {
            let mut rng = SeededNormal::new(seed);
            // A as nn.Linear's default (Kaiming uniform, a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
            let bound = 1.0 / (width as f64).sqrt();
            let mut pair = || -> Result<(Var, Var)> {
                let a: Vec<f32> = (0..rank * width)
                    .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                    .collect();
                Ok((
                    Var::from_tensor(&Tensor::from_vec(a, (rank, width), &Device::Cpu)?)?,
                    Var::zeros((width, rank), DType::F32, &Device::Cpu)?,
                ))
            };
            Some([pair()?, pair()?])
        };
        Ok(Self {
            frozen,
            heads,
            lora,
            scale: alpha / rank.max(1) as f64,
            pool_query: None,
        })
    }

    /// Pools this layer's output with attention over the voiced frames (a learned query; it
    /// starts at zero, where attention pooling is the voiced mean) instead of the voiced mean.
    pub fn with_attention_pooling(mut self) -> Result<Self> {
        let width = self.get("self_attn.q_proj.weight")?.dim(0)?;
        self.pool_query = Some(Var::zeros((width, 1), DType::F32, &Device::Cpu)?);
        Ok(self)
    }

    /// What training updates: the adapters and the pooling query, where present.
    pub fn vars(&self) -> Vec<Var> {
        self.lora
            .iter()
            .flatten()
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .chain(self.pool_query.clone())
            .collect()
    }

    /// The output `h` [batch, frames, width] pooled with `voiced` ([batch, frames, 1], 1/n on
    /// the n voiced frames): their mean, or attention weights over them.
    pub fn pool(&self, h: &Tensor, voiced: &Tensor) -> candle_core::Result<Tensor> {
        let Some(query) = &self.pool_query else {
            return h.broadcast_mul(voiced)?.sum(1);
        };
        let (b, t, d) = h.dims3()?;
        let scores = (h.reshape((b * t, d))?.matmul(query.as_tensor())? / (d as f64).sqrt())?
            .reshape((b, t, 1))?;
        // The softmax runs over the voiced frames only: an unvoiced frame neither weighs (its
        // exponential is multiplied by its zero weight) nor sets the maximum subtracted for
        // stability (else a loud unvoiced score would underflow every voiced exponential).
        let unvoiced = (voiced.le(0f32)?.to_dtype(DType::F32)? * -1e30)?;
        let masked = (scores + unvoiced)?;
        let shifted = masked.broadcast_sub(&masked.max_keepdim(1)?.detach())?;
        let e = (shifted.exp()? * voiced)?;
        let weights = e.broadcast_div(&e.sum_keepdim(1)?)?;
        h.broadcast_mul(&weights)?.sum(1)
    }

    fn get(&self, name: &str) -> candle_core::Result<&Tensor> {
        self.frozen
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("layer weight {name} missing")))
    }

    /// `x W + b` (+ the adapter's `s x A^T B^T` on adapted projections) for x [rows, in].
    fn project(&self, x: &Tensor, name: &str) -> candle_core::Result<Tensor> {
        let w = self.get(&format!("{name}.weight"))?;
        let mut y = x.contiguous()?.apply_op1(FrozenProduct(w.clone()))?;
        if let Some(b) = self.frozen.get(&format!("{name}.bias")) {
            y = y.broadcast_add(b)?;
        }
        if let (Some(lora), Some(i)) = (&self.lora, ADAPTED.iter().position(|a| *a == name)) {
            let (a, b) = &lora[i];
            let delta = x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)?;
            y = (y + (delta * self.scale)?)?;
        }
        Ok(y)
    }

    fn layer_norm(&self, x: &Tensor, name: &str) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        centred
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(self.get(&format!("{name}.weight"))?)?
            .broadcast_add(self.get(&format!("{name}.bias"))?)
    }

    /// The layer on `x` [batch, frames, width] (pre-norm attention and feed-forward, GELU).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (h, hd) = (self.heads, d / self.heads);
        let rows = x.reshape((b * t, d))?;
        let a_in = self.layer_norm(&rows, "self_attn_layer_norm")?;
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split((self.project(&a_in, "self_attn.q_proj")? * (hd as f64).powf(-0.5))?)?;
        let k = split(self.project(&a_in, "self_attn.k_proj")?)?;
        let v = split(self.project(&a_in, "self_attn.v_proj")?)?;
        let scores = q.matmul(&k.t()?.contiguous()?)?;
        let shifted = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?.detach())?;
        let e = shifted.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * t, d))?;
        let rows = (rows + self.project(&ctx, "self_attn.out_proj")?)?;
        let f_in = self.layer_norm(&rows, "final_layer_norm")?;
        let f = self.project(&self.project(&f_in, "fc1")?.gelu_erf()?, "fc2")?;
        (rows + f)?.reshape((b, t, d))
    }

    /// The adapted projections' weights with the adapters merged in, PyTorch layout [out, in]
    /// and HF names within the layer (`self_attn.q_proj.weight`, ...).
    pub fn merged_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, name) in ADAPTED.iter().enumerate() {
            let w = self.get(&format!("{name}.weight"))?.t()?; // [out, in]
            let w = match &self.lora {
                Some(lora) => {
                    let (a, b) = &lora[i];
                    (w + (b.as_tensor().matmul(a.as_tensor())? * self.scale)?)?
                }
                None => w,
            };
            out.insert(format!("{name}.weight"), w.contiguous()?);
        }
        Ok(out)
    }
}

/// `x W` for a frozen `W` [in, out]: candle's own matmul would also compute the gradient of
/// `W`, as costly as the product itself, which nothing here needs.
#[derive(Clone)]
struct FrozenProduct(Tensor);

impl candle_core::CustomOp1 for FrozenProduct {
    fn name(&self) -> &'static str {
        "frozen-product"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("frozen-product: f32 only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-product: contiguous input only");
        };
        let x = Tensor::from_slice(&data[start..end], layout.shape(), &Device::Cpu)?;
        let y = x.matmul(&self.0)?;
        let shape = y.shape().clone();
        Ok((
            candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?),
            shape,
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.0.t()?)?))
    }
}

/// One window's input to the adapted layer, and what pooling needs.
pub struct Window {
    /// Hidden state `layer` of the frozen encoder: [frames, width].
    pub states: Tensor,
    /// The pooled hidden states the head reads below the adapted layer: [width * n].
    pub fixed: Vec<f32>,
    /// `voiced_mean`'s frame weights: [frames, 1].
    pub pool: Tensor,
    pub label: usize,
}

/// Runs the frozen encoder over `samples` up to hidden state `input_state` (the adapted
/// layer's input) and pools the states in `fixed_states` over the voiced frames.
pub fn prepare(
    encoder: &Encoder,
    samples: &[f32],
    input_state: usize,
    fixed_states: &[usize],
    label: usize,
) -> Result<Window> {
    let out = encoder.encode_upto(samples, Some(input_state))?;
    let states = out.hidden_states[input_state]
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .squeeze(0)?;
    let frames = states.dim(0)?;
    let pool = voiced_weights(&[samples], frames, &Device::Cpu)?.squeeze(0)?;
    let mut fixed = Vec::new();
    for &s in fixed_states {
        let h = out.hidden_states[s].to_dtype(DType::F32)?.squeeze(0)?;
        fixed.extend(h.broadcast_mul(&pool)?.sum(0)?.to_vec1::<f32>()?);
    }
    Ok(Window {
        states,
        fixed,
        pool,
        label,
    })
}

/// Features of `windows` (all of one length): the fixed pooled states beside the adapted
/// layer's pooled output, [batch, dim], unscaled.
fn batch_features(layer: &AdaptedLayer, windows: &[&Window]) -> candle_core::Result<Tensor> {
    let states = Tensor::stack(&windows.iter().map(|w| &w.states).collect::<Vec<_>>(), 0)?;
    let pool = Tensor::stack(&windows.iter().map(|w| &w.pool).collect::<Vec<_>>(), 0)?;
    let pooled = layer.pool(&layer.forward(&states)?, &pool)?;
    let fixed_dim = windows[0].fixed.len();
    if fixed_dim == 0 {
        return Ok(pooled);
    }
    let fixed: Vec<f32> = windows.iter().flat_map(|w| w.fixed.clone()).collect();
    let fixed = Tensor::from_vec(fixed, (windows.len(), fixed_dim), &Device::Cpu)?;
    Tensor::cat(&[&fixed, &pooled], 1)
}

/// Groups of `idx` whose windows have the same number of frames (so that they stack), at most
/// `size` each, in the order of `idx` within a length.
fn length_groups(windows: &[Window], idx: &[usize], size: usize) -> Vec<Vec<usize>> {
    let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for &i in idx {
        by_len
            .entry(windows[i].states.dim(0).unwrap_or(0))
            .or_default()
            .push(i);
    }
    by_len
        .values()
        .flat_map(|v| v.chunks(size).map(<[usize]>::to_vec))
        .collect()
}

/// [`length_groups`] of `idx` shuffled, in a shuffled order: one epoch's batches.
fn length_batches(
    windows: &[Window],
    idx: &[usize],
    size: usize,
    rng: &mut SeededNormal,
) -> Vec<Vec<usize>> {
    let mut order = idx.to_vec();
    shuffle(&mut order, rng);
    let mut batches = length_groups(windows, &order, size);
    shuffle(&mut batches, rng);
    batches
}

/// How the adapters and the head are trained.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdaptConfig {
    pub head: HeadConfig,
    pub lr: f64,
    pub weight_decay: f64,
    pub label_smoothing: f64,
    pub batch_size: usize,
    pub epochs: usize,
    pub clip_norm: f64,
    pub seed: u64,
}

/// A head trained on the adapted layer's features.
pub struct Adapted {
    pub layer: AdaptedLayer,
    pub head: Head,
    pub scaler: StandardScaler,
    /// Mean training loss per epoch (before each epoch's last update: the loss the steps saw).
    pub train_loss: Vec<f64>,
}

/// Trains the adapters of `layer` (none if it has none: the head alone) and a new head on
/// `windows[train]`, for a fixed number of epochs (cosine schedule, 5 % warm-up). The scaler is
/// fitted on the unadapted features and kept.
pub fn fit(
    mut layer: AdaptedLayer,
    windows: &[Window],
    train: &[usize],
    cfg: &AdaptConfig,
    mut progress: impl FnMut(usize, f64),
) -> Result<Adapted> {
    if train.is_empty() {
        bail!("no training windows");
    }
    let k = cfg.head.num_classes();
    let (lora, query) = (layer.lora.take(), layer.pool_query.take());
    let initial = features(&layer, windows, train)?;
    (layer.lora, layer.pool_query) = (lora, query);
    let scaler = StandardScaler::fit(&initial)?;
    if scaler.dim() != cfg.head.input_dim() {
        bail!(
            "features have {} values, the head expects {}",
            scaler.dim(),
            cfg.head.input_dim()
        );
    }
    let weights = class_weights(train.iter().map(|&i| windows[i].label), k, true)?;
    let head_vars = VarMap::new();
    let head = Head::new(
        &cfg.head,
        VarBuilder::from_varmap(&head_vars, DType::F32, &Device::Cpu),
    )?;
    crate::training::init_vars(&head_vars, cfg.seed)?;
    seed_dropout(cfg.seed.wrapping_add(17));
    let mut vars = head_vars.all_vars();
    let adapter_vars = layer.vars();
    vars.extend(adapter_vars.iter().cloned());
    let mut opt = adamw(vars.clone(), cfg.lr, cfg.weight_decay)?;
    // With nothing to train in the layer its pooled output never changes: pool it once.
    let fixed_rows: Option<HashMap<usize, Vec<f32>>> = if adapter_vars.is_empty() {
        Some(train.iter().copied().zip(initial).collect())
    } else {
        None
    };
    let mut rng = SeededNormal::new(cfg.seed.wrapping_add(99));
    let steps_per_epoch = length_groups(windows, train, cfg.batch_size).len();
    let total = (steps_per_epoch * cfg.epochs).max(1);
    let warmup = ((total as f64 * 0.05).ceil() as usize).max(1);
    let mut step = 0;
    let mut train_loss = Vec::new();
    for epoch in 0..cfg.epochs {
        let mut sum = 0f64;
        for batch in length_batches(windows, train, cfg.batch_size, &mut rng) {
            opt.set_learning_rate(scheduled_lr(cfg.lr, step, warmup, total));
            let x = match &fixed_rows {
                Some(rows) => {
                    let flat: Vec<f32> = batch.iter().flat_map(|i| rows[i].clone()).collect();
                    Tensor::from_vec(flat, (batch.len(), scaler.dim()), &Device::Cpu)?
                }
                None => {
                    let w: Vec<&Window> = batch.iter().map(|&i| &windows[i]).collect();
                    batch_features(&layer, &w)?
                }
            };
            let x = scaler.transform(&x)?;
            let labels: Vec<usize> = batch.iter().map(|&i| windows[i].label).collect();
            let loss = loss_fn(
                &head.forward(&x, true)?,
                &labels,
                &weights,
                cfg.label_smoothing,
            )?;
            let mut grads = loss.backward()?;
            clip_gradients(&mut grads, &vars, cfg.clip_norm)?;
            opt.step(&grads)?;
            sum += loss.to_scalar::<f32>()? as f64 * batch.len() as f64;
            step += 1;
        }
        let mean_loss = sum / train.len() as f64;
        train_loss.push(mean_loss);
        progress(epoch + 1, mean_loss);
    }
    Ok(Adapted {
        layer,
        head,
        scaler,
        train_loss,
    })
}

/// Unscaled features of `idx` through `layer`, one row each.
pub fn features(layer: &AdaptedLayer, windows: &[Window], idx: &[usize]) -> Result<Vec<Vec<f32>>> {
    let mut rows = vec![Vec::new(); idx.len()];
    let pos: HashMap<usize, usize> = idx.iter().enumerate().map(|(p, &i)| (i, p)).collect();
    for batch in length_groups(windows, idx, 16) {
        let w: Vec<&Window> = batch.iter().map(|&i| &windows[i]).collect();
        let f = batch_features(layer, &w)?.to_vec2::<f32>()?;
        for (i, r) in batch.iter().zip(f) {
            rows[pos[i]] = r;
        }
    }
    Ok(rows)
}

impl Adapted {
    /// Class probabilities of `idx`, one row each.
    pub fn predict(&self, windows: &[Window], idx: &[usize]) -> Result<Vec<Vec<f32>>> {
        let rows = features(&self.layer, windows, idx)?;
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(256) {
            let flat: Vec<f32> = chunk.iter().flatten().copied().collect();
            let x = self.scaler.transform(&Tensor::from_vec(
                flat,
                (chunk.len(), self.scaler.dim()),
                &Device::Cpu,
            )?)?;
            let logits = self.head.forward(&x, false)?.to_vec2::<f32>()?;
            out.extend(logits.iter().map(|r| valence_model::softmax(r)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use valence_model::classifier::head::{Activation, MlpHeadConfig};

    fn tiny_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../valence-model/tests/fixtures/whisper_tiny")
    }

    fn tone(n: usize, f: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * f).sin() * 0.2).collect()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }

    /// Without adapters (and with fresh ones, whose B is zero) the differentiable copy gives
    /// the encoder's own next hidden state.
    #[test]
    fn unadapted_layer_is_the_encoders_layer() -> Result<()> {
        let encoder = Encoder::load_dir(&tiny_dir(), None, DType::F32, &Device::Cpu)?;
        let out = encoder.encode_upto(&tone(16_000, 0.05), Some(2))?;
        for rank in [0, 4] {
            let layer = AdaptedLayer::load(&tiny_dir(), 1, rank, 8.0, 1)?;
            let got = layer.forward(&out.hidden_states[1])?;
            let d = max_diff(&got, &out.hidden_states[2]);
            assert!(d < 1e-4, "rank {rank}: max |diff| {d}");
            for (name, w) in layer.merged_weights()? {
                assert!(max_diff(&w, &layer.get(&name)?.t()?) == 0.0, "{name}");
            }
        }
        Ok(())
    }

    /// Attention pooling starts as the voiced mean, ignores unvoiced frames whatever its query,
    /// and its query receives a gradient.
    #[test]
    fn attention_pooling_starts_as_the_voiced_mean() -> Result<()> {
        let layer = AdaptedLayer::load(&tiny_dir(), 1, 0, 1.0, 0)?;
        let plain = AdaptedLayer::load(&tiny_dir(), 1, 0, 1.0, 0)?;
        let layer = layer.with_attention_pooling()?;
        let d = layer.pool_query.as_ref().unwrap().dim(0)?;
        let h = Tensor::randn(0f32, 1., (2, 5, d), &Device::Cpu)?;
        // Frames 0 and 3 unvoiced in the first window; all voiced in the second.
        let voiced = Tensor::new(
            &[
                [[0f32], [1. / 3.], [1. / 3.], [0.], [1. / 3.]],
                [[0.2], [0.2], [0.2], [0.2], [0.2]],
            ],
            &Device::Cpu,
        )?;
        let want = plain.pool(&h, &voiced)?;
        assert!(max_diff(&layer.pool(&h, &voiced)?, &want) < 1e-6);
        let q = layer.pool_query.as_ref().unwrap();
        q.set(&Tensor::randn(0f32, 3., (d, 1), &Device::Cpu)?)?;
        // Moving frame 0 or 3 of the first window changes nothing.
        let mask = Tensor::new(&[1f32, 0., 0., 1., 0.], &Device::Cpu)?.reshape((1, 5, 1))?;
        let moved = Tensor::cat(
            &[
                (h.narrow(0, 0, 1)?
                    + mask
                        .broadcast_mul(&Tensor::ones((1, 5, d), DType::F32, &Device::Cpu)?)?
                        .affine(50., 0.)?)?,
                h.narrow(0, 1, 1)?,
            ],
            0,
        )?;
        let a = layer.pool(&h, &voiced)?;
        assert!(
            max_diff(
                &layer.pool(&moved, &voiced)?.narrow(0, 0, 1)?,
                &a.narrow(0, 0, 1)?
            ) < 1e-5
        );
        assert!(
            max_diff(&a, &want) > 1e-3,
            "a random query should weigh frames unevenly"
        );
        let grads = a.sum_all()?.backward()?;
        assert!(grads.get(q.as_tensor()).is_some());
        Ok(())
    }

    /// Training steps lower the loss and move the adapters; the merged weights then carry the
    /// change and give the adapted layer's output through plain projections.
    #[test]
    fn training_moves_the_adapters_and_lowers_the_loss() -> Result<()> {
        let encoder = Encoder::load_dir(&tiny_dir(), None, DType::F32, &Device::Cpu)?;
        let windows: Vec<Window> = (0..12)
            .map(|i| {
                let samples = tone(8_000 + 1_600 * (i % 2), 0.01 + 0.02 * (i % 3) as f32);
                prepare(&encoder, &samples, 1, &[1], i % 3)
            })
            .collect::<Result<_>>()?;
        let width = windows[0].states.dim(1)?;
        let cfg = AdaptConfig {
            head: HeadConfig::Mlp(MlpHeadConfig {
                input_dim: 2 * width,
                hidden: vec![16],
                dropout: 0.0,
                head_activation: Activation::Relu,
                num_classes: 3,
            }),
            lr: 3e-3,
            weight_decay: 0.0,
            label_smoothing: 0.0,
            batch_size: 4,
            epochs: 8,
            clip_norm: 1.0,
            seed: 3,
        };
        let layer = AdaptedLayer::load(&tiny_dir(), 1, 4, 8.0, 5)?;
        let idx: Vec<usize> = (0..windows.len()).collect();
        let fitted = fit(layer, &windows, &idx, &cfg, |_, _| {})?;
        let losses = &fitted.train_loss;
        assert!(losses.last() < losses.first(), "losses {losses:?}");
        let moved: f32 = fitted
            .layer
            .vars()
            .iter()
            .skip(1)
            .step_by(2)
            .map(|b| max_abs(b.as_tensor()))
            .fold(0.0, f32::max);
        assert!(moved > 0.0, "B stayed zero");
        // The merged weights in a layer without adapters give the adapted output.
        let mut plain = AdaptedLayer::load(&tiny_dir(), 1, 0, 8.0, 0)?;
        for (name, w) in fitted.layer.merged_weights()? {
            plain.frozen.insert(name, w.t()?.contiguous()?);
        }
        let x = windows[0].states.unsqueeze(0)?;
        let d = max_diff(&plain.forward(&x)?, &fitted.layer.forward(&x)?);
        assert!(d < 1e-4, "merged vs adapters: {d}");
        let p = fitted.predict(&windows, &idx)?;
        assert!(p.iter().all(|r| (r.iter().sum::<f32>() - 1.0).abs() < 1e-4));
        Ok(())
    }
}
