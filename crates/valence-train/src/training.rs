//! Training classifier heads on pooled features, and speaker-independent evaluation.
//!
//! The recipe is the reference card's: AdamW (lr 2e-4, weight decay 0.01), cross-entropy with
//! label smoothing 0.1 and class weights, cosine schedule with 5% warm-up, batch 32, gradient
//! clipping at 1.0, early stopping on a validation split whose speakers are not in training.
//! Everything random (initialisation, shuffling, dropout, splits) is seeded.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};
use serde::Serialize;

use crate::metrics;
use valence_model::classifier::head::{Head, HeadConfig, head_from_tensors, seed_dropout};
use valence_model::classifier::scaler::StandardScaler;
use valence_model::rng::SeededNormal;
use valence_model::softmax;

#[derive(Debug, Clone, Serialize)]
pub struct TrainConfig {
    pub head: HeadConfig,
    pub lr: f64,
    pub weight_decay: f64,
    pub label_smoothing: f64,
    pub batch_size: usize,
    pub max_epochs: usize,
    pub patience: usize,
    pub warmup_fraction: f64,
    pub clip_norm: f64,
    pub val_fraction: f64,
    pub class_weights: bool,
    pub seed: u64,
    /// Weight of a domain adversary (0: none): a linear classifier of the head's hidden layer
    /// predicts each row's domain (its corpus) through a gradient-reversal layer, so the hidden
    /// layer is pushed to carry no corpus identity (DANN, Ganin & Lempitsky 2015). Needs domain
    /// labels and an MLP head with a hidden layer.
    pub adversary: f64,
    /// Mixup's Beta(a, a) parameter (0: none): each batch also trains on mixtures
    /// `w x_i + (1 - w) x_j` of its rows with a shuffled copy, the loss mixed the same way
    /// (Zhang et al. 2018); with an adversary its corpus loss is mixed too.
    pub mixup: f64,
    /// Weight of an auxiliary emotion classifier (0: none): a linear classifier of the head's
    /// hidden layer also predicts each row's emotion category (angry, sad, calm, ...), so the
    /// hidden layer keeps what tells the emotions inside one valence class apart (angry and sad
    /// are both negative and sound opposite). Dropped after training; needs emotion labels and
    /// an MLP head with a hidden layer. Left out of the recorded recipe when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub aux_emotion: f64,
    /// Weight of a cost on the opposite valence (0: none): the mean probability a row gives
    /// to the class opposite its own (positive for a negative row, negative for a positive
    /// one; nothing for neutral) is added to the loss, so that anger heard as joy costs more
    /// than anger heard as neutral. Left out of the recorded recipe when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub polarity_cost: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// Per-row labels of training objectives beside the valence class.
#[derive(Debug, Clone, Copy, Default)]
pub struct SideLabels<'a> {
    /// Each row's domain (its corpus or speaker), for a domain adversary.
    pub domains: &'a [usize],
    /// Each row's emotion category, for the auxiliary emotion classifier.
    pub emotions: &'a [usize],
}

impl TrainConfig {
    /// The reference card's recipe around `head`.
    pub fn card_recipe(head: HeadConfig) -> Self {
        Self {
            head,
            lr: 2e-4,
            weight_decay: 0.01,
            label_smoothing: 0.1,
            batch_size: 32,
            max_epochs: 60,
            patience: 10,
            warmup_fraction: 0.05,
            clip_norm: 1.0,
            val_fraction: 0.15,
            class_weights: true,
            seed: 0,
            adversary: 0.0,
            mixup: 0.0,
            aux_emotion: 0.0,
            polarity_cost: 0.0,
        }
    }
}

/// A trained head with what it needs at inference.
pub struct Trained {
    pub head_config: HeadConfig,
    pub tensors: HashMap<String, Tensor>,
    pub scaler: StandardScaler,
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub best_val_macro_f1: f64,
    /// Mean training loss per epoch.
    pub train_loss: Vec<f64>,
}

/// A seeded Fisher-Yates shuffle (a deterministic permutation).
pub(crate) fn shuffle<T>(v: &mut [T], rng: &mut SeededNormal) {
    for i in (1..v.len()).rev() {
        let j = (rng.uniform() * (i + 1) as f64) as usize % (i + 1);
        v.swap(i, j);
    }
}

/// Splits speakers into validation (about `fraction` of the clips) and the rest.
pub fn speaker_split(speakers: &[String], fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut unique: Vec<&String> = speakers
        .iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if unique.len() < 2 || fraction <= 0.0 {
        return ((0..speakers.len()).collect(), vec![]);
    }
    let mut rng = SeededNormal::new(seed ^ 0x5eed);
    shuffle(&mut unique, &mut rng);
    let target = (speakers.len() as f64 * fraction).ceil() as usize;
    let mut val_speakers = BTreeSet::new();
    let mut count = 0;
    for s in &unique[..unique.len() - 1] {
        if count >= target {
            break;
        }
        val_speakers.insert(*s);
        count += speakers.iter().filter(|x| x == s).count();
    }
    let (mut train, mut val) = (vec![], vec![]);
    for (i, s) in speakers.iter().enumerate() {
        if val_speakers.contains(s) {
            val.push(i)
        } else {
            train.push(i)
        }
    }
    (train, val)
}

pub(crate) fn init_vars(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = SeededNormal::new(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let is_norm = name.contains("norm");
        let values: Vec<f32> = if is_norm && name.ends_with("weight") {
            vec![1.0; n]
        } else if is_norm || name.ends_with("in_proj_bias") {
            vec![0.0; n]
        } else if name.contains("cls_token") || name.contains("pos_embed") {
            (0..n).map(|_| rng.sample() * 0.02).collect()
        } else if name.ends_with("in_proj_weight") {
            // xavier uniform, as nn.MultiheadAttention
            let bound = (6.0 / (dims[0] + dims[1]) as f64).sqrt();
            (0..n)
                .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                .collect()
        } else {
            // nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
            let fan_in = if dims.len() == 2 { dims[1] } else { n };
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n)
                .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                .collect()
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?)?;
    }
    Ok(())
}

/// Balanced class weights (`n / (k * count)`, as scikit-learn's "balanced") for `labels`, or
/// ones when `enabled` is false; a class with no rows weighs 1.
pub(crate) fn class_weights(
    labels: impl Iterator<Item = usize>,
    k: usize,
    enabled: bool,
) -> candle_core::Result<Tensor> {
    let mut counts = vec![0usize; k];
    for y in labels {
        counts[y] += 1;
    }
    let n: usize = counts.iter().sum();
    let weights: Vec<f32> = counts
        .iter()
        .map(|&c| {
            if enabled && c > 0 {
                n as f32 / (k * c) as f32
            } else {
                1.0
            }
        })
        .collect();
    Tensor::new(weights.as_slice(), &Device::Cpu)
}

/// AdamW over `vars` (candle's defaults for the betas and epsilon, as PyTorch's).
pub(crate) fn adamw(
    vars: Vec<Var>,
    lr: f64,
    weight_decay: f64,
) -> candle_core::Result<candle_nn::AdamW> {
    candle_nn::AdamW::new(
        vars,
        ParamsAdamW {
            lr,
            weight_decay,
            ..Default::default()
        },
    )
}

/// The learning rate at `step` of `total`: linear warm-up over `warmup` steps, then a cosine
/// decay to zero.
pub(crate) fn scheduled_lr(base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        base * (step + 1) as f64 / warmup as f64
    } else {
        let p = (step - warmup) as f64 / (total - warmup).max(1) as f64;
        base * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

/// The identity forward; backward, the gradient times `-lambda` (gradient reversal).
fn reverse_gradient(x: &Tensor, lambda: f64) -> candle_core::Result<Tensor> {
    let fixed = x.detach();
    // fixed + lambda * (fixed - x): equals x, and only `-lambda * x` carries a gradient.
    fixed.clone() + ((fixed - x)? * lambda)?
}

/// A draw from Gamma(shape, 1): Marsaglia and Tsang's method, boosted below shape 1.
fn gamma_sample(shape: f64, rng: &mut SeededNormal) -> f64 {
    if shape < 1.0 {
        return gamma_sample(shape + 1.0, rng) * rng.uniform().powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let z = rng.sample() as f64;
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        if rng.uniform().ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// A draw from Beta(a, a).
fn beta_sample(a: f64, rng: &mut SeededNormal) -> f64 {
    let x = gamma_sample(a, rng);
    let y = gamma_sample(a, rng);
    x / (x + y)
}

/// Cross-entropy with label smoothing and class weights, as PyTorch computes it.
pub(crate) fn loss_fn(
    logits: &Tensor,
    labels: &[usize],
    weights: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let (b, k) = logits.dims2()?;
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    let mut onehot = vec![0f32; b * k];
    for (i, &y) in labels.iter().enumerate() {
        onehot[i * k + y] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (b, k), logits.device())?;
    let wy = onehot.broadcast_mul(weights)?.sum(1)?; // [b]
    let nll = (logp.mul(&onehot)?.sum(1)? * -1.0)?;
    let smooth = (logp.broadcast_mul(weights)?.sum(1)? * -1.0)?;
    let denom = wy.sum_all()?;
    let main = wy.mul(&nll)?.sum_all()?.div(&denom)?;
    let smooth = (smooth.sum_all()?.div(&denom)? / k as f64)?;
    (main * (1.0 - eps))? + (smooth * eps)?
}

pub(crate) fn clip_gradients(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[Var],
    max_norm: f64,
) -> Result<()> {
    let mut total = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = total.sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(())
}

fn rows_tensor(x: &[Vec<f32>], idx: &[usize], scaler: &StandardScaler) -> Result<Tensor> {
    let dim = scaler.dim();
    let mut flat = Vec::with_capacity(idx.len() * dim);
    for &i in idx {
        let mut r = x[i].clone();
        scaler.transform_vec(&mut r);
        flat.extend(r);
    }
    Ok(Tensor::from_vec(flat, (idx.len(), dim), &Device::Cpu)?)
}

fn predict_with(
    head: &Head,
    x: &[Vec<f32>],
    idx: &[usize],
    scaler: &StandardScaler,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(idx.len());
    for chunk in idx.chunks(256) {
        let logits = head
            .forward(&rows_tensor(x, chunk, scaler)?, false)?
            .to_vec2::<f32>()?;
        out.extend(logits.iter().map(|r| softmax(r)));
    }
    Ok(out)
}

fn argmax(p: &[f32]) -> usize {
    valence_model::argmax(p).0
}

/// A training-only linear classifier of `classes` on the MLP head's hidden layer, its variables
/// under `prefix` in `varmap` (`what` names it in errors).
fn side_classifier(
    cfg: &TrainConfig,
    what: &str,
    classes: usize,
    varmap: &VarMap,
    prefix: &str,
) -> Result<candle_nn::Linear> {
    let HeadConfig::Mlp(mlp) = &cfg.head else {
        bail!("{what} needs an MLP head");
    };
    let Some(&width) = mlp.hidden.last() else {
        bail!("{what} needs an MLP head with a hidden layer");
    };
    Ok(candle_nn::linear(
        width,
        classes,
        VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu).pp(prefix),
    )?)
}

/// Trains a head on rows `x` with labels `y`; `speakers` picks the validation split.
pub fn train(
    x: &[Vec<f32>],
    y: &[usize],
    speakers: &[String],
    side: SideLabels,
    cfg: &TrainConfig,
    mut progress: impl FnMut(usize, f64, f64),
) -> Result<Trained> {
    if x.is_empty() || x.len() != y.len() || y.len() != speakers.len() {
        bail!("training needs as many labels and speakers as rows (and at least one row)");
    }
    let domains = side.domains;
    if cfg.adversary > 0.0 && domains.len() != x.len() {
        bail!("a domain adversary needs one domain label per row");
    }
    if cfg.aux_emotion > 0.0 && side.emotions.len() != x.len() {
        bail!("an auxiliary emotion classifier needs one emotion label per row");
    }
    let k = cfg.head.num_classes();
    let (train_idx, val_idx) = speaker_split(speakers, cfg.val_fraction, cfg.seed);
    // The scaler sees every row given (no labels involved), so ensemble members trained on
    // different validation splits share it and can be merged into one head.
    let scaler = StandardScaler::fit(x)?;
    if scaler.dim() != cfg.head.input_dim() {
        bail!(
            "features have {} values, the head expects {}",
            scaler.dim(),
            cfg.head.input_dim()
        );
    }
    let weights = class_weights(train_idx.iter().map(|&i| y[i]), k, cfg.class_weights)?;

    let varmap = VarMap::new();
    let head = Head::new(
        &cfg.head,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )?;
    // The adversary: only where the training rows span at least two domains.
    let n_domains = domains.iter().max().map_or(0, |m| m + 1);
    let adversary = if cfg.adversary > 0.0 && {
        let seen: BTreeSet<usize> = train_idx.iter().map(|&i| domains[i]).collect();
        seen.len() > 1
    } {
        Some(side_classifier(
            cfg,
            "a domain adversary",
            n_domains,
            &varmap,
            "adversary",
        )?)
    } else {
        None
    };
    let n_emotions = side.emotions.iter().max().map_or(0, |m| m + 1);
    let emotion_head = if cfg.aux_emotion > 0.0 {
        Some(side_classifier(
            cfg,
            "an auxiliary emotion classifier",
            n_emotions,
            &varmap,
            "emotion_aux",
        )?)
    } else {
        None
    };
    init_vars(&varmap, cfg.seed)?;
    seed_dropout(cfg.seed.wrapping_add(17));
    let vars = varmap.all_vars();
    let mut opt = adamw(vars.clone(), cfg.lr, cfg.weight_decay)?;
    let steps_per_epoch = train_idx.len().div_ceil(cfg.batch_size);
    let total_steps = (steps_per_epoch * cfg.max_epochs).max(1);
    let warmup = ((total_steps as f64 * cfg.warmup_fraction).ceil() as usize).max(1);
    let mut rng = SeededNormal::new(cfg.seed.wrapping_add(99));
    // Its own stream, so runs without mixup keep their shuffles.
    let mut mix_rng = SeededNormal::new(cfg.seed.wrapping_add(7919));
    let mut order = train_idx.clone();
    let mut step = 0usize;
    let snapshot = |vm: &VarMap| -> Result<HashMap<String, Tensor>> {
        let d = vm.data().lock().unwrap_or_else(|e| e.into_inner());
        d.iter()
            // Side objectives' layers are training-only.
            .filter(|(n, _)| !n.starts_with("adversary.") && !n.starts_with("emotion_aux."))
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect()
    };
    let mut best = (f64::MIN, f64::MAX, 0usize, snapshot(&varmap)?);
    let mut train_loss = Vec::new();
    let mut since_best = 0;
    let mut epochs_run = 0;
    for epoch in 0..cfg.max_epochs {
        shuffle(&mut order, &mut rng);
        let mut loss_sum = 0f64;
        for batch in order.chunks(cfg.batch_size) {
            opt.set_learning_rate(scheduled_lr(cfg.lr, step, warmup, total_steps));
            let xb = rows_tensor(x, batch, &scaler)?;
            // Mixup: rows mixed with a shuffled copy of the batch, weight `w` on the row itself.
            let mix = if cfg.mixup > 0.0 && batch.len() > 1 {
                let w = beta_sample(cfg.mixup, &mut mix_rng);
                let w = w.max(1.0 - w);
                let mut partner: Vec<usize> = (0..batch.len()).collect();
                shuffle(&mut partner, &mut mix_rng);
                Some((w, partner))
            } else {
                None
            };
            let xb = match &mix {
                Some((w, partner)) => {
                    let idx = Tensor::from_vec(
                        partner.iter().map(|&p| p as u32).collect::<Vec<_>>(),
                        partner.len(),
                        &Device::Cpu,
                    )?;
                    ((&xb * *w)? + (xb.index_select(&idx, 0)? * (1.0 - w))?)?
                }
                None => xb,
            };
            // The loss of `logits` against labels `of(row)`, mixed like the rows when mixing.
            let mixed_loss = |logits: &Tensor,
                              of: &dyn Fn(usize) -> usize,
                              weights: &Tensor,
                              smoothing: f64|
             -> candle_core::Result<Tensor> {
                let own: Vec<usize> = batch.iter().map(|&i| of(i)).collect();
                let l = loss_fn(logits, &own, weights, smoothing)?;
                match &mix {
                    None => Ok(l),
                    Some((w, partner)) => {
                        let other: Vec<usize> = partner.iter().map(|&p| own[p]).collect();
                        (l * *w)? + (loss_fn(logits, &other, weights, smoothing)? * (1.0 - w))?
                    }
                }
            };
            // The epoch's loss reports the class loss; the side objectives only add gradient.
            let (hidden, logits) = if adversary.is_some() || emotion_head.is_some() {
                let (h, l) = head
                    .forward_with_hidden(&xb, true)
                    .context("side objectives need an MLP head with a hidden layer")??;
                (Some(h), l)
            } else {
                (None, head.forward(&xb, true)?)
            };
            let class_loss = mixed_loss(&logits, &|i| y[i], &weights, cfg.label_smoothing)?;
            let mut loss = class_loss.clone();
            if let (Some(adv), Some(hidden)) = (&adversary, &hidden) {
                // DANN's schedule: the reversal strength grows from 0 to `adversary`.
                let p = step as f64 / total_steps as f64;
                let lambda = cfg.adversary * (2.0 / (1.0 + (-10.0 * p).exp()) - 1.0);
                let domain_logits =
                    candle_core::Module::forward(adv, &reverse_gradient(hidden, lambda)?)?;
                let ones = Tensor::ones(n_domains, DType::F32, &Device::Cpu)?;
                let domain_loss = mixed_loss(&domain_logits, &|i| domains[i], &ones, 0.0)?;
                loss = (loss + domain_loss)?;
            }
            if let (Some(aux), Some(hidden)) = (&emotion_head, &hidden) {
                let emotion_logits = candle_core::Module::forward(aux, hidden)?;
                let ones = Tensor::ones(n_emotions, DType::F32, &Device::Cpu)?;
                let emotion_loss = mixed_loss(
                    &emotion_logits,
                    &|i| side.emotions[i],
                    &ones,
                    cfg.label_smoothing,
                )?;
                loss = (loss + (emotion_loss * cfg.aux_emotion)?)?;
            }
            if cfg.polarity_cost > 0.0 {
                loss = (loss + (polarity_cost(&logits, batch, y)? * cfg.polarity_cost)?)?;
            }
            let mut grads = loss.backward()?;
            clip_gradients(&mut grads, &vars, cfg.clip_norm)?;
            opt.step(&grads)?;
            loss_sum += class_loss.to_scalar::<f32>()? as f64 * batch.len() as f64;
            step += 1;
        }
        epochs_run = epoch + 1;
        let mean_loss = loss_sum / train_idx.len() as f64;
        train_loss.push(mean_loss);
        // Validation: macro-F1 first, loss to break ties.
        let (val_f1, val_loss) = if val_idx.is_empty() {
            (-mean_loss, mean_loss)
        } else {
            let probs = predict_with(&head, x, &val_idx, &scaler)?;
            let pred: Vec<usize> = probs.iter().map(|p| argmax(p)).collect();
            let actual: Vec<usize> = val_idx.iter().map(|&i| y[i]).collect();
            let nll = probs
                .iter()
                .zip(&actual)
                .map(|(p, &a)| -(p[a].max(1e-7) as f64).ln())
                .sum::<f64>()
                / actual.len() as f64;
            (metrics::report(&actual, &pred, k).macro_f1, nll)
        };
        progress(epoch + 1, mean_loss, val_f1);
        if val_f1 > best.0 + 1e-9 || (val_f1 > best.0 - 1e-9 && val_loss < best.1) {
            best = (val_f1, val_loss, epoch + 1, snapshot(&varmap)?);
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= cfg.patience {
                break;
            }
        }
    }
    Ok(Trained {
        head_config: cfg.head.clone(),
        tensors: best.3,
        scaler,
        epochs_run,
        best_epoch: best.2,
        best_val_macro_f1: best.0,
        train_loss,
    })
}

/// Trains `members` heads with seeds `cfg.seed`, `cfg.seed + 1`, ... (each with its own
/// validation speakers and initialisation) and merges them into one head that outputs their
/// mean logits. Averaging a few seeds removes much of the run-to-run variance of a small head
/// trained on a few thousand clips. A one-hidden-layer MLP of N members is exactly an MLP
/// with N times the hidden width (first layers stacked, last layers side by side / N), so the
/// merged head needs no new head type; linear heads average directly.
pub fn train_ensemble(
    x: &[Vec<f32>],
    y: &[usize],
    speakers: &[String],
    side: SideLabels,
    cfg: &TrainConfig,
    members: usize,
    mut progress: impl FnMut(usize, usize, f64, f64),
) -> Result<Trained> {
    if members <= 1 {
        return train(x, y, speakers, side, cfg, |e, l, f| progress(0, e, l, f));
    }
    let HeadConfig::Mlp(mlp) = &cfg.head else {
        bail!("ensembles are supported for MLP and linear heads");
    };
    if mlp.hidden.len() > 1 {
        bail!("ensembles need an MLP with at most one hidden layer");
    }
    let mut runs = Vec::with_capacity(members);
    for m in 0..members {
        let mut c = cfg.clone();
        c.seed = cfg.seed.wrapping_add(m as u64);
        runs.push(train(x, y, speakers, side, &c, |e, l, f| {
            progress(m, e, l, f)
        })?);
    }
    let n = members as f64;
    let get = |r: &Trained, k: &str| -> Result<Tensor> {
        r.tensors
            .get(k)
            .cloned()
            .with_context(|| format!("trained head lacks {k}"))
    };
    let last = mlp.hidden.len();
    let mut tensors = HashMap::new();
    let cat_all = |k: &str, dim: usize| -> Result<Tensor> {
        let ts = runs.iter().map(|r| get(r, k)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&ts, dim)?)
    };
    let mean_all = |k: &str| -> Result<Tensor> {
        let ts = runs.iter().map(|r| get(r, k)).collect::<Result<Vec<_>>>()?;
        Ok((Tensor::stack(&ts, 0)?.sum(0)? / n)?)
    };
    if last == 1 {
        tensors.insert(
            "classifier.0.weight".into(),
            cat_all("classifier.0.weight", 0)?,
        );
        tensors.insert("classifier.0.bias".into(), cat_all("classifier.0.bias", 0)?);
        tensors.insert(
            "classifier.1.weight".into(),
            (cat_all("classifier.1.weight", 1)? / n)?,
        );
        tensors.insert("classifier.1.bias".into(), mean_all("classifier.1.bias")?);
    } else {
        tensors.insert(
            "classifier.0.weight".into(),
            mean_all("classifier.0.weight")?,
        );
        tensors.insert("classifier.0.bias".into(), mean_all("classifier.0.bias")?);
    }
    let mut merged_cfg = mlp.clone();
    merged_cfg.hidden = mlp.hidden.iter().map(|h| h * members).collect();
    Ok(Trained {
        head_config: HeadConfig::Mlp(merged_cfg),
        tensors,
        scaler: runs[0].scaler.clone(),
        epochs_run: runs.iter().map(|r| r.epochs_run).max().unwrap_or(0),
        best_epoch: runs.iter().map(|r| r.best_epoch).max().unwrap_or(0),
        best_val_macro_f1: runs.iter().map(|r| r.best_val_macro_f1).sum::<f64>() / n,
        train_loss: runs[0].train_loss.clone(),
    })
}

impl Trained {
    pub fn head(&self) -> Result<Head> {
        head_from_tensors(
            &self.head_config,
            self.tensors.clone(),
            std::path::Path::new("<trained>"),
            DType::F32,
            &Device::Cpu,
        )
    }

    /// Class probabilities for rows `idx` of `x`.
    pub fn predict(&self, x: &[Vec<f32>], idx: &[usize]) -> Result<Vec<Vec<f32>>> {
        predict_with(&self.head()?, x, idx, &self.scaler)
    }
}

/// Assigns whole speakers to `k` folds, balancing clip counts (largest speakers first).
pub fn speaker_folds(speakers: &[String], k: usize, seed: u64) -> Vec<usize> {
    let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
    for s in speakers {
        *counts.entry(s).or_default() += 1;
    }
    let mut list: Vec<(&String, usize)> = counts.into_iter().collect();
    let mut rng = SeededNormal::new(seed ^ 0xf01d);
    shuffle(&mut list, &mut rng);
    list.sort_by_key(|e| std::cmp::Reverse(e.1));
    let mut fold_size = vec![0usize; k];
    let mut fold_of: HashMap<&String, usize> = HashMap::new();
    for (s, c) in list {
        let f = (0..k).min_by_key(|&f| fold_size[f]).unwrap_or(0);
        fold_size[f] += c;
        fold_of.insert(s, f);
    }
    speakers.iter().map(|s| fold_of[s]).collect()
}

/// Figures for one group of clips.
#[derive(Debug, Clone, Serialize)]
pub struct GroupFigures {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub n: usize,
}

/// Out-of-fold predictions and the usual figures.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub report: metrics::Report,
    pub per_language: BTreeMap<String, GroupFigures>,
    pub per_corpus: BTreeMap<String, GroupFigures>,
    pub predictions: Vec<usize>,
}

pub fn evaluate(
    actual: &[usize],
    predicted: &[usize],
    languages: &[String],
    corpora: &[String],
    k: usize,
) -> Evaluation {
    let group = |keys: &[String]| -> BTreeMap<String, GroupFigures> {
        let mut by: BTreeMap<String, (Vec<usize>, Vec<usize>)> = BTreeMap::new();
        for i in 0..actual.len() {
            let e = by.entry(keys[i].clone()).or_default();
            e.0.push(actual[i]);
            e.1.push(predicted[i]);
        }
        by.into_iter()
            .map(|(g, (a, p))| {
                let r = metrics::report(&a, &p, k);
                (
                    g,
                    GroupFigures {
                        accuracy: r.accuracy,
                        macro_f1: r.macro_f1,
                        n: r.n,
                    },
                )
            })
            .collect()
    };
    Evaluation {
        report: metrics::report(actual, predicted, k),
        per_language: group(languages),
        per_corpus: group(corpora),
        predictions: predicted.to_vec(),
    }
}

/// One feature row, label and speaker per clip.
#[derive(Debug, Clone, Copy)]
pub struct ClipRows<'a> {
    pub x: &'a [Vec<f32>],
    pub y: &'a [usize],
    pub speakers: &'a [String],
    /// Each clip's domain (its corpus), for a domain adversary.
    pub domains: &'a [usize],
    /// Each clip's emotion category, for an auxiliary emotion classifier.
    pub emotions: &'a [usize],
}

/// Training rows.
pub struct Rows {
    pub x: Vec<Vec<f32>>,
    pub y: Vec<usize>,
    pub speakers: Vec<String>,
    pub domains: Vec<usize>,
    pub emotions: Vec<usize>,
}

impl Rows {
    pub fn side(&self) -> SideLabels<'_> {
        SideLabels {
            domains: &self.domains,
            emotions: &self.emotions,
        }
    }
}

/// Extra training rows tied to clips (augmented views): row `i` belongs to clip `clip[i]` and
/// trains only the folds that do not hold that clip out.
#[derive(Debug, Clone, Default)]
pub struct ExtraRows {
    pub x: Vec<Vec<f32>>,
    pub clip: Vec<usize>,
}

impl ExtraRows {
    /// The clip of training row `r`: row ids below `n_clips` are clips, the rest extra rows.
    pub fn clip_of(&self, r: usize, n_clips: usize) -> usize {
        if r < n_clips {
            r
        } else {
            self.clip[r - n_clips]
        }
    }

    /// Features, labels, speakers and domains of training rows `rows` (ids as in
    /// [`Self::clip_of`]).
    pub fn gather(&self, clips: ClipRows, rows: &[usize]) -> Rows {
        let n = clips.x.len();
        let x = rows
            .iter()
            .map(|&r| {
                if r < n {
                    clips.x[r].clone()
                } else {
                    self.x[r - n].clone()
                }
            })
            .collect();
        let y = rows.iter().map(|&r| clips.y[self.clip_of(r, n)]).collect();
        let s = rows
            .iter()
            .map(|&r| clips.speakers[self.clip_of(r, n)].clone())
            .collect();
        // Clip labels a run does not use are empty; rows then get 0.
        let per_clip = |labels: &[usize]| -> Vec<usize> {
            rows.iter()
                .map(|&r| labels.get(self.clip_of(r, n)).copied().unwrap_or(0))
                .collect()
        };
        Rows {
            x,
            y,
            speakers: s,
            domains: per_clip(clips.domains),
            emotions: per_clip(clips.emotions),
        }
    }
}

/// Trains on all folds but one and predicts the held-out fold's clips, for every fold; returns
/// each clip's class probabilities. `extra` rows join the training side of the folds that do
/// not hold their clip out, and `expand` may repeat training rows (e.g. to balance corpora).
pub fn out_of_fold_probs(
    clips: ClipRows,
    fold: &[usize],
    extra: &ExtraRows,
    expand: impl Fn(&[usize]) -> Vec<usize>,
    cfg: &TrainConfig,
    members: usize,
) -> Result<Vec<Vec<f32>>> {
    let x = clips.x;
    let held_out = HeldOut {
        versions: &[x],
        windows: &ExtraRows::default(),
    };
    let mut probs = out_of_fold_probs_on(clips, fold, extra, expand, cfg, members, held_out)?;
    Ok(probs.remove(0))
}

/// What each fold's model predicts of its held-out clips.
#[derive(Debug, Clone, Copy)]
pub struct HeldOut<'a> {
    /// Versions of the clips' features (`versions[v][clip]`, e.g. the clips as recorded and
    /// after a codec).
    pub versions: &'a [&'a [Vec<f32>]],
    /// Rows tied to clips (e.g. the element's windows of each clip), possibly none.
    pub windows: &'a ExtraRows,
}

/// [`out_of_fold_probs`] on several versions of the clips' features: each fold's model,
/// trained once on `clips`, predicts its held-out clips in every version. With windows, one more
/// version follows: each clip's mean probabilities over its windows, or its first version's
/// where it has none.
pub fn out_of_fold_probs_on(
    clips: ClipRows,
    fold: &[usize],
    extra: &ExtraRows,
    expand: impl Fn(&[usize]) -> Vec<usize>,
    cfg: &TrainConfig,
    members: usize,
    held_out: HeldOut,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let (tests, windows) = (held_out.versions, held_out.windows);
    let x = clips.x;
    if let Some(bad) = tests.iter().find(|t| t.len() != x.len()) {
        bail!(
            "a test version has {} rows for {} clips",
            bad.len(),
            x.len()
        );
    }
    if windows.clip.len() != windows.x.len() || windows.clip.iter().any(|&c| c >= x.len()) {
        bail!("window rows must each name one of the {} clips", x.len());
    }
    let n_folds = fold.iter().max().map(|m| m + 1).unwrap_or(0);
    let mut probs = vec![vec![Vec::new(); x.len()]; tests.len()];
    let mut window_sums = vec![Vec::<f32>::new(); x.len()];
    let mut window_counts = vec![0usize; x.len()];
    for f in 0..n_folds {
        let test_idx: Vec<usize> = (0..x.len()).filter(|&i| fold[i] == f).collect();
        if test_idx.is_empty() {
            continue;
        }
        // Row ids: clips first, then extra rows offset by the number of clips.
        let mut rows: Vec<usize> = (0..x.len()).filter(|&i| fold[i] != f).collect();
        rows.extend(
            (0..extra.x.len())
                .filter(|&e| fold[extra.clip[e]] != f)
                .map(|e| x.len() + e),
        );
        let rows = expand(&rows);
        let r = extra.gather(clips, &rows);
        let t = train_ensemble(
            &r.x,
            &r.y,
            &r.speakers,
            r.side(),
            cfg,
            members,
            |_, _, _, _| {},
        )?;
        for (version, probs) in tests.iter().zip(probs.iter_mut()) {
            for (i, p) in test_idx.iter().zip(t.predict(version, &test_idx)?) {
                probs[*i] = p;
            }
        }
        let held_out: Vec<usize> = (0..windows.x.len())
            .filter(|&w| fold[windows.clip[w]] == f)
            .collect();
        if !held_out.is_empty() {
            for (w, p) in held_out.iter().zip(t.predict(&windows.x, &held_out)?) {
                let c = windows.clip[*w];
                let sum = &mut window_sums[c];
                if sum.is_empty() {
                    *sum = p;
                } else {
                    sum.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
                }
                window_counts[c] += 1;
            }
        }
    }
    if !windows.x.is_empty() {
        let per_clip = window_sums
            .into_iter()
            .zip(&window_counts)
            .enumerate()
            .map(|(c, (sum, &n))| match n {
                0 => probs.first().map(|p| p[c].clone()).unwrap_or_default(),
                n => sum.into_iter().map(|v| v / n as f32).collect(),
            })
            .collect();
        probs.push(per_clip);
    }
    Ok(probs)
}

/// The mean probability the rows give to the valence opposite their own (negative 0 against
/// positive 2; neutral rows cost nothing).
fn polarity_cost(logits: &Tensor, batch: &[usize], y: &[usize]) -> candle_core::Result<Tensor> {
    let k = logits.dim(1)?;
    let mask: Vec<f32> = batch
        .iter()
        .flat_map(|&i| {
            (0..k).map(move |c| match (y[i], c) {
                (0, 2) | (2, 0) => 1.0,
                _ => 0.0,
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (batch.len(), k), logits.device())?;
    // `softmax`, not `softmax_last_dim`: the latter is a custom op without a backward pass.
    let p = candle_nn::ops::softmax(logits, 1)?;
    (p * mask)?.sum_all()? / batch.len().max(1) as f64
}

/// Trains on all folds but one and predicts the held-out fold, for every fold.
pub fn out_of_fold(
    x: &[Vec<f32>],
    y: &[usize],
    speakers: &[String],
    fold: &[usize],
    cfg: &TrainConfig,
    members: usize,
) -> Result<Vec<usize>> {
    let probs = out_of_fold_probs(
        ClipRows {
            x,
            y,
            speakers,
            domains: &[],
            emotions: &[],
        },
        fold,
        &ExtraRows::default(),
        |r| r.to_vec(),
        cfg,
        members,
    )?;
    Ok(probs.iter().map(|p| argmax(p)).collect())
}

/// Row indices with the rows of smaller groups repeated so that every group contributes about
/// as many rows as the largest one (each row at most `max_repeat` times), in a stable order.
pub fn balance_groups(
    rows: &[usize],
    group_of: impl Fn(usize) -> String,
    max_repeat: usize,
) -> Vec<usize> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for &r in rows {
        *counts.entry(group_of(r)).or_default() += 1;
    }
    let largest = counts.values().copied().max().unwrap_or(0);
    let mut out = Vec::with_capacity(rows.len());
    for &r in rows {
        let n = counts[&group_of(r)];
        let repeat = (largest as f64 / n as f64)
            .round()
            .clamp(1.0, max_repeat as f64) as usize;
        out.extend(std::iter::repeat_n(r, repeat));
    }
    out
}

/// Divides the last layer of an MLP/linear head by `t`: the same as dividing its logits by `t`
/// (temperature scaling), so a calibrated head needs no new head type.
pub fn apply_temperature(trained: &mut Trained, t: f64) -> Result<()> {
    let HeadConfig::Mlp(mlp) = &trained.head_config else {
        bail!("temperature scaling is implemented for MLP and linear heads");
    };
    let last = mlp.hidden.len();
    for k in [
        format!("classifier.{last}.weight"),
        format!("classifier.{last}.bias"),
    ] {
        let v = trained
            .tensors
            .get(&k)
            .with_context(|| format!("trained head lacks {k}"))?;
        let scaled = (v / t)?;
        trained.tensors.insert(k, scaled);
    }
    Ok(())
}

/// Per-speaker standardisation (what a running per-stream normalisation approximates).
pub fn normalize_per_group(x: &[Vec<f32>], groups: &[String]) -> Vec<Vec<f32>> {
    let mut extra = ExtraRows::default();
    normalize_per_group_with_extra(x, &mut extra, groups)
}

/// [`normalize_per_group`], where extra rows (augmented views) are standardised with the
/// statistics of their clip's group (fitted on the clips alone).
pub fn normalize_per_group_with_extra(
    x: &[Vec<f32>],
    extra: &mut ExtraRows,
    groups: &[String],
) -> Vec<Vec<f32>> {
    let mut members: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, g) in groups.iter().enumerate() {
        members.entry(g).or_default().push(i);
    }
    // One scaler per group, fitted on its clips; clips and views then look theirs up.
    let scalers: HashMap<&str, StandardScaler> = members
        .into_iter()
        .filter_map(|(g, idx)| {
            let rows: Vec<Vec<f32>> = idx.iter().map(|&i| x[i].clone()).collect();
            StandardScaler::fit(&rows).ok().map(|s| (g, s))
        })
        .collect();
    let mut out = x.to_vec();
    for (row, g) in out.iter_mut().zip(groups) {
        if let Some(s) = scalers.get(g.as_str()) {
            s.transform_vec(row);
        }
    }
    for (v, &c) in extra.x.iter_mut().zip(&extra.clip) {
        if let Some(s) = scalers.get(groups[c].as_str()) {
            s.transform_vec(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use valence_model::classifier::head::MlpHeadConfig;

    #[test]
    fn group_normalisation_centres_each_group_and_views_follow_their_clip() {
        // Two groups far apart; a view copies a clip of group b.
        let x = vec![
            vec![0.0, 1.0],
            vec![2.0, 3.0],
            vec![100.0, -5.0],
            vec![104.0, -9.0],
        ];
        let groups: Vec<String> = ["a", "a", "b", "b"].map(String::from).to_vec();
        let mut extra = ExtraRows {
            x: vec![x[3].clone()],
            clip: vec![3],
        };
        let out = normalize_per_group_with_extra(&x, &mut extra, &groups);
        for [a, b] in [[0, 1], [2, 3]] {
            for (d, (u, v)) in out[a].iter().zip(&out[b]).enumerate() {
                let mean = (u + v) / 2.0;
                assert!(mean.abs() < 1e-5, "rows {a},{b} dim {d} mean {mean}");
                assert!((u - v).abs() > 1.0);
            }
        }
        assert_eq!(extra.x[0], out[3]);
        assert_eq!(normalize_per_group(&x, &groups), out);
    }

    #[test]
    fn folds_never_split_a_speaker() {
        let speakers: Vec<String> = (0..50).map(|i| format!("s{}", i % 13)).collect();
        let folds = speaker_folds(&speakers, 5, 1);
        for s in &speakers {
            let fs: BTreeSet<usize> = speakers
                .iter()
                .zip(&folds)
                .filter(|(x, _)| *x == s)
                .map(|(_, f)| *f)
                .collect();
            assert_eq!(fs.len(), 1);
        }
        let (tr, va) = speaker_split(&speakers, 0.2, 3);
        let trs: BTreeSet<&String> = tr.iter().map(|&i| &speakers[i]).collect();
        assert!(va.iter().all(|&i| !trs.contains(&speakers[i])));
        assert!(!va.is_empty());
    }

    #[test]
    fn gradient_reversal_is_identity_forward_and_negated_backward() {
        let x = Var::new(&[1.5f32, -2.0, 0.25], &Device::Cpu).unwrap();
        let r = reverse_gradient(x.as_tensor(), 0.7).unwrap();
        assert_eq!(r.to_vec1::<f32>().unwrap(), vec![1.5, -2.0, 0.25]);
        let w = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let grads = r.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        for (got, want) in g.iter().zip([-0.7f32, -1.4, -2.1]) {
            assert!((got - want).abs() < 1e-6, "{g:?}");
        }
    }

    #[test]
    fn a_domain_adversary_trains_and_leaves_no_trace_in_the_head() {
        let (x, y, s) = toy_problem();
        let domains: Vec<usize> = (0..x.len()).map(|i| i % 2).collect();
        let mut cfg = toy_recipe_to_convergence();
        cfg.adversary = 0.5;
        let t = train(&x, &y, &s, adversarial(&domains), &cfg, |_, _, _| {}).unwrap();
        assert!(
            t.tensors.keys().all(|k| k.starts_with("classifier.")),
            "{:?}",
            t.tensors.keys()
        );
        assert!(t.best_val_macro_f1 > 0.9, "{}", t.best_val_macro_f1);
        assert!(train(&x, &y, &s, SideLabels::default(), &cfg, |_, _, _| {}).is_err());
    }

    #[test]
    fn an_auxiliary_emotion_classifier_shapes_the_head_and_is_dropped() {
        let (x, y, s) = toy_problem();
        // Two emotions per class, told apart by a feature the class does not use.
        let emotions: Vec<usize> = x
            .iter()
            .zip(&y)
            .map(|(r, &c)| 2 * c + usize::from(r[7] > 0.0))
            .collect();
        let side = SideLabels {
            domains: &[],
            emotions: &emotions,
        };
        let mut cfg = toy_recipe_to_convergence();
        let plain = train(&x, &y, &s, side, &cfg, |_, _, _| {}).unwrap();
        cfg.aux_emotion = 0.5;
        let aux = train(&x, &y, &s, side, &cfg, |_, _, _| {}).unwrap();
        assert!(
            aux.tensors.keys().all(|k| k.starts_with("classifier.")),
            "{:?}",
            aux.tensors.keys()
        );
        assert!(aux.best_val_macro_f1 > 0.9, "{}", aux.best_val_macro_f1);
        let w = |t: &Trained| t.tensors["classifier.0.weight"].flatten_all().unwrap();
        let moved = (w(&aux) - w(&plain))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(moved.to_scalar::<f32>().unwrap() > 1e-3);
        // Only recorded in the recipe when used.
        assert!(serde_json::to_string(&cfg).unwrap().contains("aux_emotion"));
        cfg.aux_emotion = 0.0;
        assert!(!serde_json::to_string(&cfg).unwrap().contains("aux_emotion"));
        cfg.aux_emotion = 0.5;
        assert!(train(&x, &y, &s, SideLabels::default(), &cfg, |_, _, _| {}).is_err());
    }

    #[test]
    fn polarity_cost_is_the_mean_probability_of_the_opposite_valence() {
        // Rows: negative, neutral, positive; each gives the others' classes known shares.
        let logits = Tensor::new(
            &[
                [0.0f32, 0.0, 0.0],
                [0.0, 5.0, 0.0],
                [(3.0f32).ln(), 0.0, 0.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let y = [0usize, 1, 2];
        let c = polarity_cost(&logits, &[0, 1, 2], &y)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Negative row: p(positive) 1/3; neutral row: nothing; positive row: p(negative) 3/5.
        assert!((c - (1.0 / 3.0 + 0.6) / 3.0).abs() < 1e-6, "{c}");
        // Trained with the cost, the rows give less probability to their opposite valence (a
        // cost without a gradient would change nothing).
        let (x, y, s) = toy_problem();
        let mut cfg = toy_recipe();
        let opposite = |t: &Trained| -> f64 {
            let idx: Vec<usize> = (0..x.len()).collect();
            let p = t.predict(&x, &idx).unwrap();
            let o: f64 = idx
                .iter()
                .map(|&i| match y[i] {
                    0 => p[i][2] as f64,
                    2 => p[i][0] as f64,
                    _ => 0.0,
                })
                .sum();
            o / x.len() as f64
        };
        let plain = train(&x, &y, &s, SideLabels::default(), &cfg, |_, _, _| {}).unwrap();
        cfg.polarity_cost = 5.0;
        let costed = train(&x, &y, &s, SideLabels::default(), &cfg, |_, _, _| {}).unwrap();
        let (before, after) = (opposite(&plain), opposite(&costed));
        assert!(
            after < 0.97 * before,
            "opposite valence {before:.4} -> {after:.4}"
        );
        let mut cfg = TrainConfig::card_recipe(toy_recipe().head);
        assert!(
            !serde_json::to_string(&cfg)
                .unwrap()
                .contains("polarity_cost")
        );
        cfg.polarity_cost = 0.5;
        assert!(
            serde_json::to_string(&cfg)
                .unwrap()
                .contains("polarity_cost")
        );
    }

    fn adversarial(domains: &[usize]) -> SideLabels<'_> {
        SideLabels {
            domains,
            emotions: &[],
        }
    }

    fn toy_problem() -> (Vec<Vec<f32>>, Vec<usize>, Vec<String>) {
        let mut rng = SeededNormal::new(4);
        let (mut x, mut y, mut s) = (vec![], vec![], vec![]);
        for i in 0..300 {
            let c = i % 3;
            x.push(
                (0..8)
                    .map(|d| rng.sample() * 0.5 + if d == c { 2.0 } else { 0.0 })
                    .collect(),
            );
            y.push(c);
            s.push(format!("spk{}", i % 10));
        }
        (x, y, s)
    }

    fn toy_recipe() -> TrainConfig {
        TrainConfig::card_recipe(HeadConfig::Mlp(MlpHeadConfig {
            input_dim: 8,
            hidden: vec![16],
            dropout: 0.1,
            head_activation: Default::default(),
            num_classes: 3,
        }))
    }

    /// [`toy_recipe`] at a learning rate and length that fit the toy problem.
    fn toy_recipe_to_convergence() -> TrainConfig {
        let mut cfg = toy_recipe();
        cfg.lr = 1e-2;
        cfg.max_epochs = 30;
        cfg
    }

    #[test]
    fn ensemble_head_outputs_the_mean_of_its_members_logits() {
        let (x, y, s) = toy_problem();
        let mut cfg = toy_recipe();
        cfg.max_epochs = 5;
        let merged =
            train_ensemble(&x, &y, &s, SideLabels::default(), &cfg, 3, |_, _, _, _| {}).unwrap();
        assert_eq!(merged.head_config.input_dim(), 8);
        let HeadConfig::Mlp(m) = &merged.head_config else {
            panic!("an MLP")
        };
        assert_eq!(m.hidden, vec![48]);
        let rows = rows_tensor(&x, &[0, 1, 2, 3], &merged.scaler).unwrap();
        let got = merged.head().unwrap().forward(&rows, false).unwrap();
        let mut sum = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
        for seed in 0..3 {
            let mut c = cfg.clone();
            c.seed = seed;
            let one = train(&x, &y, &s, SideLabels::default(), &c, |_, _, _| {}).unwrap();
            sum = (sum + one.head().unwrap().forward(&rows, false).unwrap()).unwrap();
        }
        let want = (sum / 3.0).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    }

    #[test]
    fn out_of_fold_models_score_every_version_of_the_held_out_clips() {
        let (x, y, s) = toy_problem();
        let mut cfg = toy_recipe();
        cfg.max_epochs = 5;
        let fold = speaker_folds(&s, 3, 2);
        // A second version that loses the class signal: its predictions must differ.
        let blurred: Vec<Vec<f32>> = x.iter().map(|r| vec![r.iter().sum::<f32>(); 8]).collect();
        let rows = ClipRows {
            x: &x,
            y: &y,
            speakers: &s,
            domains: &[],
            emotions: &[],
        };
        let none = ExtraRows::default();
        let same = |r: &[usize]| r.to_vec();
        fn held_out<'a>(versions: &'a [&'a [Vec<f32>]], windows: &'a ExtraRows) -> HeldOut<'a> {
            HeldOut { versions, windows }
        }
        let both = out_of_fold_probs_on(
            rows,
            &fold,
            &none,
            same,
            &cfg,
            1,
            held_out(&[&x, &blurred], &none),
        )
        .unwrap();
        let alone = out_of_fold_probs(rows, &fold, &none, same, &cfg, 1).unwrap();
        assert_eq!(
            both[0], alone,
            "the first version is the plain out-of-fold result"
        );
        assert_ne!(both[1], both[0]);
        assert!(both[1].iter().all(|p| p.len() == 3));
        assert!(
            out_of_fold_probs_on(
                rows,
                &fold,
                &none,
                same,
                &cfg,
                1,
                held_out(&[&x[1..]], &none)
            )
            .is_err()
        );
        // Windows: even clips twice as themselves, clip 0 once more blurred, odd clips none.
        let mut windows = ExtraRows::default();
        for c in (0..x.len()).step_by(2) {
            for _ in 0..2 {
                windows.x.push(x[c].clone());
                windows.clip.push(c);
            }
        }
        windows.x.push(blurred[0].clone());
        windows.clip.push(0);
        let with_windows =
            out_of_fold_probs_on(rows, &fold, &none, same, &cfg, 1, held_out(&[&x], &windows))
                .unwrap();
        assert_eq!(with_windows.len(), 2);
        assert_eq!(with_windows[0], both[0]);
        // (Predicted in other batches than the clips, so equal up to rounding.)
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-6);
        for c in 1..x.len() {
            assert!(close(&with_windows[1][c], &both[0][c]), "clip {c}");
        }
        for k in 0..3 {
            let want = (2.0 * both[0][0][k] + both[1][0][k]) / 3.0;
            assert!((with_windows[1][0][k] - want).abs() < 1e-6);
        }
        windows.clip[0] = x.len();
        assert!(
            out_of_fold_probs_on(rows, &fold, &none, same, &cfg, 1, held_out(&[&x], &windows))
                .is_err()
        );
    }

    #[test]
    fn beta_draws_have_the_distributions_moments() {
        let mut rng = SeededNormal::new(3);
        for a in [0.2, 0.4, 2.0] {
            let draws: Vec<f64> = (0..20_000).map(|_| beta_sample(a, &mut rng)).collect();
            assert!(draws.iter().all(|w| (0.0..=1.0).contains(w)));
            let mean = draws.iter().sum::<f64>() / draws.len() as f64;
            let var = draws.iter().map(|w| (w - mean).powi(2)).sum::<f64>() / draws.len() as f64;
            // Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
            let want = 1.0 / (4.0 * (2.0 * a + 1.0));
            assert!((mean - 0.5).abs() < 0.01, "a {a}: mean {mean}");
            assert!(
                (var - want).abs() < 0.05 * want,
                "a {a}: variance {var}, want {want}"
            );
        }
    }

    #[test]
    fn mixup_trains_on_mixtures_and_still_learns() {
        let (x, y, s) = toy_problem();
        let domains: Vec<usize> = (0..x.len()).map(|i| i % 2).collect();
        let mut cfg = toy_recipe_to_convergence();
        let plain = train(&x, &y, &s, adversarial(&domains), &cfg, |_, _, _| {}).unwrap();
        cfg.mixup = 0.4;
        let mixed = train(&x, &y, &s, adversarial(&domains), &cfg, |_, _, _| {}).unwrap();
        assert!(mixed.best_val_macro_f1 > 0.9, "{}", mixed.best_val_macro_f1);
        // Mixed labels cannot be fitted as closely as clean ones: the training loss stays higher.
        let last = |t: &Trained| *t.train_loss.last().unwrap();
        assert!(
            last(&mixed) > last(&plain),
            "{} vs {}",
            last(&mixed),
            last(&plain)
        );
        let again = train(&x, &y, &s, adversarial(&domains), &cfg, |_, _, _| {}).unwrap();
        assert_eq!(mixed.train_loss, again.train_loss, "same seed, same run");
        // With an adversary, its corpus loss is mixed too.
        cfg.adversary = 0.5;
        let adv = train(&x, &y, &s, adversarial(&domains), &cfg, |_, _, _| {}).unwrap();
        assert!(adv.best_val_macro_f1 > 0.9, "{}", adv.best_val_macro_f1);
    }

    #[test]
    fn learns_a_separable_problem_reproducibly() {
        let (x, y, s) = toy_problem();
        let cfg = toy_recipe_to_convergence();
        let a = train(&x, &y, &s, SideLabels::default(), &cfg, |_, _, _| {}).unwrap();
        assert!(
            a.train_loss.last().unwrap() < &a.train_loss[0],
            "loss must go down"
        );
        assert!(a.best_val_macro_f1 > 0.9, "{}", a.best_val_macro_f1);
        let b = train(&x, &y, &s, SideLabels::default(), &cfg, |_, _, _| {}).unwrap();
        assert_eq!(a.train_loss, b.train_loss, "same seed, same run");
    }
}
