//! The training commands behind `valence train`, `valence cv` and `valence adapt`: their
//! arguments (clap's `Args`, flattened by the CLI) and what they run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;

use crate::dataset::{self, Clip};
use crate::metrics;
use crate::training::{self as train, TrainConfig};
use valence_model::classifier::familiarity::FamiliaritySpec;
use valence_model::classifier::head::{
    Activation, HeadConfig, MlpHeadConfig, TransformerHeadConfig,
};
use valence_model::kernels::int8::Int8Kernel;
use valence_model::manifest::{
    Combine, EncoderKind, EncoderSpec, FeatureSource, FeatureSpec, HeadSpec, Manifest, Pooling,
    parse_quantization,
};
use valence_model::{LABELS, detect_encoder_kind};

/// Which head to train.
#[derive(Debug, Clone, Copy, clap::ValueEnum, serde::Serialize)]
pub enum HeadKind {
    /// Multinomial logistic regression (one linear layer).
    Linear,
    /// One hidden layer of 256.
    Mlp,
    /// The reference card's Transformer head (64-wide patches, d_model 256, 4 layers).
    Transformer,
}

/// Clips with their feature rows and label indices.
pub type Labelled = (Vec<Clip>, Vec<Vec<f32>>, Vec<usize>);

#[derive(Debug, Clone, clap::Args)]
pub struct FeatureArgs {
    /// Dataset manifest (path,corpus,language,speaker,gender,emotion,valence,duration_s).
    #[arg(long)]
    pub manifest: PathBuf,
    /// Folder the manifest's paths are relative to (default: the manifest's folder).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// HF-layout encoder directory (e.g. the imported Whisper base).
    #[arg(long)]
    pub encoder: PathBuf,
    /// Hidden states to pool (0 = input to the first layer), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "3,4,5")]
    pub layers: Vec<usize>,
    /// How several layers are joined.
    #[arg(long, value_enum, default_value = "mean")]
    pub combine: CombineArg,
    /// Mean over time, mean and standard deviation, or mean over the frames that carry sound.
    #[arg(long, value_enum, default_value = "mean")]
    pub pooling: PoolingArg,
    #[arg(long, value_enum, default_value = "mlp")]
    pub head: HeadKind,
    /// cv --per-window: leave out the windows the installed speech detector finds too little
    /// speech in (as the element does: Silero's threshold, the element's default min-speech).
    #[arg(long)]
    pub speech_gate: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 60)]
    pub max_epochs: usize,
    /// Learning rate (the card's 2e-4 unless given).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Hidden layer widths of the MLP head (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "256")]
    pub hidden: Vec<usize>,
    /// Dropout of the MLP and Transformer heads.
    #[arg(long, default_value_t = 0.2)]
    pub dropout: f32,
    /// Where pooled features are cached.
    #[arg(long)]
    pub feature_cache: Option<PathBuf>,
    /// Train this many heads with consecutive seeds and average their logits (MLP with one
    /// hidden layer or linear heads; the result is one wider MLP).
    #[arg(long, default_value_t = 1)]
    pub ensemble: usize,
    /// Run the encoder with 8-bit projection weights (`int8`; `q8_0` is its older name), as the
    /// model will run (written to the trained manifest's `encoder.quantize`).
    #[arg(long)]
    pub quantize: Option<String>,
    /// Also train on this many random augmented views of every clip (window-length crops with
    /// speed, noise, babble, telephone band, room sound and gain; see `augment.rs`).
    #[arg(long, default_value_t = 0)]
    pub views: usize,
    /// Window length of the views in seconds (the element's `window`).
    #[arg(long, default_value_t = 3.0)]
    pub view_window: f64,
    /// Chance that a view ends with an Opus round trip over RTP at 12-32 kbps (GStreamer's
    /// opusenc, rtpopuspay, rtpopusdepay, opusdec), as a media server's calls arrive.
    #[arg(long, default_value_t = 0.0)]
    pub view_opus: f64,
    /// Repeat the rows of smaller corpora so that every corpus weighs about the same.
    #[arg(long)]
    pub balance_corpora: bool,
    /// Weight of a corpus adversary behind a gradient-reversal layer (0: none): the head's
    /// hidden layer is trained to carry no corpus identity (MLP heads).
    #[arg(long, default_value_t = 0.0)]
    pub adversary: f64,
    /// What the adversary learns to tell apart: the corpus of a clip, or its speaker.
    #[arg(long, value_enum, default_value_t = AdversaryOn::Corpus)]
    pub adversary_on: AdversaryOn,
    /// Mixup between the rows of each batch (0: none): train on convex mixtures of two rows'
    /// features with the same mixture of their labels, the weight drawn from Beta(a, a) (the
    /// larger of w and 1 - w goes to the first row). Batches mix clips of different
    /// speakers and corpora.
    #[arg(long, default_value_t = 0.0)]
    pub mixup: f64,
    /// Weight of an auxiliary emotion classifier on the head's hidden layer (0: none): it also
    /// learns each clip's emotion category (the manifest's `emotion`: angry, sad, calm, ...),
    /// and is dropped after training.
    #[arg(long, default_value_t = 0.0)]
    pub aux_emotion: f64,
    /// Weight of a cost on the opposite valence (0: none): the probability a negative clip
    /// gives to positive, and a positive one to negative, is added to the loss (anger heard as
    /// joy costs more than anger heard as neutral).
    #[arg(long, default_value_t = 0.0)]
    pub polarity_cost: f64,
    /// Append prosodic statistics (pitch, loudness, voicing, rhythm, spectral tilt; see
    /// `valence_model::classifier::prosody`) to the pooled encoder states.
    #[arg(long)]
    pub prosody: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AdversaryOn {
    Corpus,
    Speaker,
}

/// Each clip's corpus as a number (corpora in name order).
pub fn corpus_domains(clips: &[Clip]) -> Vec<usize> {
    dataset::numbered(clips.iter().map(|c| c.corpus.as_str()))
}

/// Each clip's speaker as a number (speakers in name order).
pub fn speaker_domains(clips: &[Clip]) -> Vec<usize> {
    dataset::numbered(clips.iter().map(|c| c.speaker.as_str()))
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CombineArg {
    Mean,
    Concat,
}
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PoolingArg {
    Mean,
    MeanStd,
    /// Mean over the frames that carry sound (see the model's `voiced_mean`).
    VoicedMean,
}

impl FeatureArgs {
    /// The adversary's label of every clip.
    pub fn adversary_domains(&self, clips: &[Clip]) -> Vec<usize> {
        match self.adversary_on {
            AdversaryOn::Corpus => corpus_domains(clips),
            AdversaryOn::Speaker => speaker_domains(clips),
        }
    }

    pub fn spec(&self) -> FeatureSpec {
        FeatureSpec {
            source: FeatureSource::HiddenStates,
            layers: self.layers.clone(),
            combine: match self.combine {
                CombineArg::Mean => Combine::Mean,
                CombineArg::Concat => Combine::Concat,
            },
            pooling: match self.pooling {
                PoolingArg::Mean => Pooling::Mean,
                PoolingArg::MeanStd => Pooling::MeanStd,
                PoolingArg::VoicedMean => Pooling::VoicedMean,
            },
            prosody: self.prosody,
        }
    }

    /// Where the clips' paths start.
    fn clip_root(&self) -> PathBuf {
        dataset::clip_root(&self.manifest, self.root.as_deref())
    }

    /// The feature cache directory.
    fn cache_dir(&self) -> PathBuf {
        self.feature_cache
            .clone()
            .unwrap_or_else(dataset::default_feature_cache)
    }

    /// The 8-bit kernel `--quantize` asks for (none: f32).
    fn quantize_kernel(&self) -> Result<Option<Int8Kernel>> {
        self.quantize
            .as_deref()
            .map(quantization_kernel)
            .transpose()
    }

    /// Clips, their feature rows, labels.
    pub fn load(&self) -> Result<Labelled> {
        let clips = dataset::read_manifest(&self.manifest)?;
        let (root, cache) = (self.clip_root(), self.cache_dir());
        let table = dataset::features(
            &clips,
            &root,
            &self.encoder,
            self.quantize_kernel()?,
            &cache,
            &Device::Cpu,
        )?;
        let mut x = table.select(&self.spec())?;
        if self.prosody {
            let p = dataset::prosody_features(&clips, &root, &cache)?;
            for (row, extra) in x.iter_mut().zip(p) {
                row.extend(extra);
            }
        }
        let y = clips.iter().map(|c| c.label().unwrap_or(0)).collect();
        Ok((clips, x, y))
    }

    /// Features of `clips` (as [`Self::load`] read them) after an Opus/RTP round trip at `kbps`.
    pub fn load_coded(&self, clips: &[Clip], kbps: u32) -> Result<Vec<Vec<f32>>> {
        let spec = self.spec();
        if spec.prosody {
            bail!("coded clips carry no prosodic features yet (--prosody with --test-opus)");
        }
        let table = dataset::coded_features(
            clips,
            &self.clip_root(),
            &self.encoder,
            self.quantize_kernel()?,
            kbps,
            &self.cache_dir(),
            &Device::Cpu,
        )?;
        table.select(&spec)
    }

    /// `--view-opus`, checked: a chance, and only with views.
    pub fn view_opus(&self) -> Result<f64> {
        if !(0.0..=1.0).contains(&self.view_opus) {
            bail!("--view-opus {} is a chance, in [0, 1]", self.view_opus);
        }
        if self.views == 0 && self.view_opus > 0.0 {
            bail!("--view-opus applies to augmented views: add --views N");
        }
        Ok(self.view_opus)
    }

    /// The augmented views of `clips` as extra training rows (none unless `--views`).
    pub fn load_views(&self, clips: &[Clip]) -> Result<train::ExtraRows> {
        let opus = self.view_opus()?;
        if self.views == 0 {
            return Ok(train::ExtraRows::default());
        }
        let spec = self.spec();
        if spec.source != FeatureSource::HiddenStates {
            bail!("augmented views pool hidden states only");
        }
        if spec.prosody {
            bail!("augmented views carry no prosodic features yet (--prosody with --views)");
        }
        let table = dataset::view_features(
            clips,
            &self.clip_root(),
            &self.encoder,
            self.quantize_kernel()?,
            dataset::ViewSpec {
                per_clip: self.views,
                window_s: self.view_window,
                upto: spec.layers.iter().max().copied().unwrap_or(0),
                seed: self.seed ^ 0xa06,
                opus,
            },
            &self.cache_dir(),
            &Device::Cpu,
        )?;
        Ok(train::ExtraRows {
            x: table.select(&spec)?,
            clip: (0..clips.len() * self.views)
                .map(|r| r / self.views)
                .collect(),
        })
    }

    /// The element's windows of every clip (3 s at a 1 s hop, silent ones left out), pooled as
    /// the clips are, each tied to its clip: what `--per-window` scores.
    pub fn load_windows(&self, clips: &[Clip]) -> Result<train::ExtraRows> {
        let spec = self.spec();
        if spec.source != FeatureSource::HiddenStates {
            bail!("element windows pool hidden states only");
        }
        let (table, clip) = dataset::window_features(
            clips,
            &self.clip_root(),
            &self.encoder,
            self.quantize_kernel()?,
            spec.layers.iter().max().copied().unwrap_or(0),
            &self.cache_dir(),
            &Device::Cpu,
        )?;
        let mut rows = train::ExtraRows {
            x: table.select(&spec)?,
            clip,
        };
        if self.speech_gate {
            rows = self.gate_windows(clips, rows)?;
        }
        Ok(rows)
    }

    /// Drops the window rows the speech detector would report as `no-speech`; the windows are
    /// cut again (in the order [`dataset::window_features`] cut them) to know their shares.
    fn gate_windows(&self, clips: &[Clip], rows: train::ExtraRows) -> Result<train::ExtraRows> {
        use valence_model::speech;
        let path = speech::default_detector_path();
        let detector = speech::shared_detector(&path)
            .with_context(|| "--speech-gate needs the detector `valence setup` installs")?;
        let mut keep = Vec::with_capacity(rows.clip.len());
        let root = self.clip_root();
        for (i, c) in clips.iter().enumerate() {
            let samples = crate::decode::decode_to_16k_mono(&root.join(&c.path))?;
            for (_, share) in dataset::element_windows_with_speech(
                &samples,
                dataset::WINDOW_SILENCE_DBFS,
                Some(&detector),
                speech::DEFAULT_THRESHOLD,
            ) {
                keep.push((i, share.is_none_or(|s| s >= speech::DEFAULT_MIN_SPEECH)));
            }
        }
        if keep.len() != rows.clip.len() || keep.iter().zip(&rows.clip).any(|(k, c)| k.0 != *c) {
            bail!("the cached window features do not match the clips' windows");
        }
        let (x, clip) = rows
            .x
            .into_iter()
            .zip(rows.clip)
            .zip(&keep)
            .filter(|(_, k)| k.1)
            .map(|(r, _)| r)
            .unzip();
        eprintln!(
            "speech gate: {} of {} windows kept",
            keep.iter().filter(|k| k.1).count(),
            keep.len()
        );
        Ok(train::ExtraRows { x, clip })
    }

    /// Row expansion for training: corpus balancing when asked for. Row ids below
    /// `clips.len()` are clips, the rest extra rows of `extra`.
    pub fn expander<'a>(
        &self,
        clips: &'a [Clip],
        extra: &'a train::ExtraRows,
    ) -> impl Fn(&[usize]) -> Vec<usize> + 'a {
        let balance = self.balance_corpora;
        move |rows: &[usize]| {
            if !balance {
                return rows.to_vec();
            }
            let corpus = |r: usize| clips[extra.clip_of(r, clips.len())].corpus.clone();
            train::balance_groups(rows, corpus, 4)
        }
    }

    pub fn train_config(&self, input_dim: usize) -> TrainConfig {
        let head = match self.head {
            HeadKind::Linear => HeadConfig::Mlp(MlpHeadConfig {
                input_dim,
                hidden: vec![],
                dropout: 0.0,
                head_activation: Activation::Relu,
                num_classes: 3,
            }),
            HeadKind::Mlp => HeadConfig::Mlp(MlpHeadConfig {
                input_dim,
                hidden: self.hidden.clone(),
                dropout: self.dropout,
                head_activation: Activation::Relu,
                num_classes: 3,
            }),
            HeadKind::Transformer => HeadConfig::Transformer(TransformerHeadConfig {
                input_dim,
                patch_size: 64,
                d_model: 256,
                nhead: 8,
                num_layers: 4,
                dim_feedforward: 1024,
                dropout: self.dropout,
                norm_first: false,
                activation: Activation::Relu,
                final_norm: false,
                hidden: vec![128],
                head_activation: Activation::Relu,
                num_classes: 3,
            }),
        };
        let mut cfg = TrainConfig::card_recipe(head);
        cfg.seed = self.seed;
        cfg.max_epochs = self.max_epochs;
        cfg.lr = self.lr;
        cfg.adversary = self.adversary;
        cfg.mixup = self.mixup;
        cfg.aux_emotion = self.aux_emotion;
        cfg.polarity_cost = self.polarity_cost;
        cfg
    }
}

/// The 8-bit kernel for a `--quantize` value: the features of every kernel are identical, so
/// training takes this CPU's fastest (scalar loops where there is no AVX2: slow, but the same
/// features the model will see).
fn quantization_kernel(q: &str) -> Result<valence_model::serving::runtime::Int8Kernel> {
    parse_quantization(q)?;
    Ok(valence_model::serving::runtime::int8_kernel())
}

/// Prints an evaluation: macro-F1, accuracy, the confusion matrix, per corpus.
pub fn print_eval(title: &str, e: &train::Evaluation) {
    eprintln!(
        "{title}: accuracy {:.3}  macro-F1 {:.3}  weighted-F1 {:.3}  (n = {})",
        e.report.accuracy, e.report.macro_f1, e.report.weighted_f1, e.report.n
    );
    for (i, c) in e.report.per_class.iter().enumerate() {
        eprintln!(
            "  {:<9} precision {:.3} recall {:.3} f1 {:.3} support {}",
            LABELS[i], c.precision, c.recall, c.f1, c.support
        );
    }
    eprintln!(
        "  confusion (rows = actual; negative, neutral, positive): {:?}",
        e.report.confusion
    );
    for (g, f) in &e.per_language {
        eprintln!(
            "  language {g}: accuracy {:.3} macro-F1 {:.3} n {}",
            f.accuracy, f.macro_f1, f.n
        );
    }
}

/// `valence cv`: grouped-by-speaker k-fold and leave-one-corpus-out figures.
/// Figures of one cross-validation scheme, from out-of-fold probabilities.
fn scheme_figures(
    title: &str,
    probs: &[Vec<f32>],
    clips: &[Clip],
    y: &[usize],
    temperature: f64,
) -> (train::Evaluation, serde_json::Value) {
    let pred: Vec<usize> = probs.iter().map(|p| valence_model::argmax(p).0).collect();
    let langs: Vec<String> = clips.iter().map(|c| c.language.clone()).collect();
    let corpora: Vec<String> = clips.iter().map(|c| c.corpus.clone()).collect();
    let e = train::evaluate(y, &pred, &langs, &corpora, 3);
    print_eval(title, &e);
    let (lo, hi) = metrics::bootstrap_macro_f1(y, &pred, 3, 1000, 7);
    let scaled: Vec<Vec<f32>> = probs
        .iter()
        .map(|p| metrics::with_temperature(p, temperature))
        .collect();
    let ece = metrics::expected_calibration_error(probs, y, 15);
    let ece_t = metrics::expected_calibration_error(&scaled, y, 15);
    // Per corpus: macro-F1 with its interval where the corpus has all three classes, else the
    // recall of the classes it has.
    let mut per_corpus = serde_json::Map::new();
    let mut three_class = Vec::new();
    for name in e.per_corpus.keys() {
        let idx: Vec<usize> = (0..clips.len())
            .filter(|&i| &clips[i].corpus == name)
            .collect();
        let a: Vec<usize> = idx.iter().map(|&i| y[i]).collect();
        let p: Vec<usize> = idx.iter().map(|&i| pred[i]).collect();
        let r = metrics::report(&a, &p, 3);
        let classes = r.per_class.iter().filter(|c| c.support > 0).count();
        let recall: BTreeMap<&str, f64> = LABELS
            .iter()
            .zip(&r.per_class)
            .filter(|(_, c)| c.support > 0)
            .map(|(l, c)| (*l, c.recall))
            .collect();
        let (lo, hi) = metrics::bootstrap_macro_f1(&a, &p, 3, 1000, 7);
        if classes == 3 {
            three_class.push(r.macro_f1);
        }
        eprintln!(
            "  {name:<10} n {:>5}  macro-F1 {:.3} [{lo:.3}, {hi:.3}]  recall {recall:?}{}",
            r.n,
            r.macro_f1,
            if classes == 3 {
                ""
            } else {
                "  (not all three classes: macro-F1 says little)"
            }
        );
        per_corpus.insert(
            name.clone(),
            serde_json::json!({"n": r.n, "macro_f1": r.macro_f1, "ci95": [lo, hi],
                               "three_classes": classes == 3, "recall": recall}),
        );
    }
    let mean3 = three_class.iter().sum::<f64>() / three_class.len().max(1) as f64;
    let min3 = three_class.iter().copied().fold(f64::MAX, f64::min);
    eprintln!(
        "{title}: macro-F1 {:.3} [{lo:.3}, {hi:.3}]; mean over three-class corpora {mean3:.3} \
         (lowest {min3:.3}); ECE {ece:.3}, at temperature {temperature:.2}: {ece_t:.3}",
        e.report.macro_f1
    );
    let v = serde_json::json!({
        "macro_f1": e.report.macro_f1, "ci95": [lo, hi], "accuracy": e.report.accuracy,
        "three_class_corpus_mean_macro_f1": mean3, "three_class_corpus_min_macro_f1": min3,
        "ece15": ece, "ece15_at_temperature": ece_t,
        "per_class": e.report.per_class, "confusion": e.report.confusion,
        "per_corpus": per_corpus, "per_language": e.per_language,
    });
    (e, v)
}

/// Feature standardisation per group of clips, fitted on each group's own clips (views take
/// their clip's group statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupNorm {
    Speaker,
    Corpus,
}

impl GroupNorm {
    pub fn chosen(speaker: bool, corpus: bool) -> Option<Self> {
        match (speaker, corpus) {
            (true, _) => Some(Self::Speaker),
            (_, true) => Some(Self::Corpus),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Speaker => "speaker",
            Self::Corpus => "corpus",
        }
    }
}

pub fn cv(
    args: &FeatureArgs,
    folds: usize,
    group_norm: Option<GroupNorm>,
    test_opus: Option<u32>,
    per_window: bool,
    json: Option<&Path>,
    predictions: Option<&Path>,
) -> Result<()> {
    // Refused before any features are computed (views and coded clips take minutes).
    if test_opus.is_some() && group_norm.is_some() {
        bail!("--speaker-norm/--corpus-norm and --test-opus do not combine");
    }
    if per_window && group_norm.is_some() {
        bail!("--speaker-norm/--corpus-norm and --per-window do not combine");
    }
    if per_window && args.prosody {
        bail!("element windows carry no prosodic features yet (--prosody with --per-window)");
    }
    let (clips, x, y) = args.load()?;
    let coded = test_opus.map(|k| args.load_coded(&clips, k)).transpose()?;
    let windows = if per_window {
        args.load_windows(&clips)?
    } else {
        train::ExtraRows::default()
    };
    let mut extra = args.load_views(&clips)?;
    let speakers: Vec<String> = clips.iter().map(|c| c.speaker.clone()).collect();
    let corpora: Vec<String> = clips.iter().map(|c| c.corpus.clone()).collect();
    let x = match group_norm {
        Some(GroupNorm::Speaker) => {
            train::normalize_per_group_with_extra(&x, &mut extra, &speakers)
        }
        Some(GroupNorm::Corpus) => train::normalize_per_group_with_extra(&x, &mut extra, &corpora),
        None => x,
    };
    let cfg = args.train_config(x[0].len());
    let t0 = std::time::Instant::now();
    let expand = args.expander(&clips, &extra);
    let fold = train::speaker_folds(&speakers, folds, args.seed);
    let domains = args.adversary_domains(&clips);
    let emotions = dataset::emotion_labels(&clips);
    let rows = train::ClipRows {
        x: &x,
        y: &y,
        speakers: &speakers,
        domains: &domains,
        emotions: &emotions,
    };
    // Every fold's model predicts its held-out clips as recorded and, with --test-opus, coded.
    let versions: Vec<&[Vec<f32>]> = std::iter::once(x.as_slice())
        .chain(coded.as_deref())
        .collect();
    let held_out = train::HeldOut {
        versions: &versions,
        windows: &windows,
    };
    let mut grouped_all =
        train::out_of_fold_probs_on(rows, &fold, &extra, &expand, &cfg, args.ensemble, held_out)?;
    let grouped_windows = per_window.then(|| grouped_all.pop()).flatten();
    let grouped_p = grouped_all.remove(0);
    // Temperature fitted on the grouped-CV predictions (held-out speakers); LOCO then shows
    // how it transfers to corpora the fit never saw.
    let temperature = metrics::fit_temperature(&grouped_p, &y);
    let (grouped, grouped_v) = scheme_figures(
        &format!("grouped-by-speaker {folds}-fold CV"),
        &grouped_p,
        &clips,
        &y,
        temperature,
    );
    let corpus_ids: Vec<String> = corpora
        .iter()
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let loco_fold: Vec<usize> = corpora
        .iter()
        .map(|c| corpus_ids.iter().position(|x| x == c).unwrap_or(0))
        .collect();
    let mut loco_all = train::out_of_fold_probs_on(
        rows,
        &loco_fold,
        &extra,
        &expand,
        &cfg,
        args.ensemble,
        held_out,
    )?;
    let loco_windows = per_window.then(|| loco_all.pop()).flatten();
    let loco_p = loco_all.remove(0);
    let (loco, loco_v) = scheme_figures("leave-one-corpus-out", &loco_p, &clips, &y, temperature);
    let coded_v = match (test_opus, grouped_all.pop(), loco_all.pop()) {
        (Some(k), Some(g), Some(l)) => {
            let what = format!("through Opus/RTP at {k} kbps");
            let (_, gv) = scheme_figures(
                &format!("grouped CV, held-out clips {what}"),
                &g,
                &clips,
                &y,
                temperature,
            );
            let (_, lv) = scheme_figures(
                &format!("leave-one-corpus-out, held-out clips {what}"),
                &l,
                &clips,
                &y,
                temperature,
            );
            serde_json::json!({"kbps": k, "grouped_cv": gv, "leave_one_corpus_out": lv})
        }
        _ => serde_json::Value::Null,
    };
    let windows_v = match (grouped_windows, loco_windows) {
        (Some(g), Some(l)) => {
            let what = "each held-out clip as the element hears it (3 s windows at a 1 s hop, \
                        silent ones left out, probabilities averaged; clips under 1 s whole)";
            let (_, gv) =
                scheme_figures(&format!("grouped CV, {what}"), &g, &clips, &y, temperature);
            let (_, lv) = scheme_figures(
                &format!("leave-one-corpus-out, {what}"),
                &l,
                &clips,
                &y,
                temperature,
            );
            serde_json::json!({"windows": windows.x.len(), "grouped_cv": gv, "leave_one_corpus_out": lv})
        }
        _ => serde_json::Value::Null,
    };
    eprintln!(
        "temperature {temperature:.3} (fitted on grouped CV); {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    println!(
        "{}",
        serde_json::json!({
            "layers": args.layers, "combine": format!("{:?}", args.combine), "pooling": format!("{:?}", args.pooling),
            "head": args.head, "ensemble": args.ensemble, "group_norm": group_norm.map(GroupNorm::name),
            "views": args.views, "view_opus": args.view_opus, "balance_corpora": args.balance_corpora,
            "grouped_cv_macro_f1": grouped.report.macro_f1, "grouped_cv_accuracy": grouped.report.accuracy,
            "loco_three_class_mean_macro_f1": loco_v["three_class_corpus_mean_macro_f1"],
            "loco_three_class_min_macro_f1": loco_v["three_class_corpus_min_macro_f1"],
            "loco_pooled_macro_f1": loco.report.macro_f1,
            "temperature": temperature,
            "grouped_ece15": grouped_v["ece15_at_temperature"], "loco_ece15": loco_v["ece15_at_temperature"],
            "opus_test_grouped_macro_f1": coded_v["grouped_cv"]["macro_f1"],
            "opus_test_loco_three_class_mean_macro_f1": coded_v["leave_one_corpus_out"]["three_class_corpus_mean_macro_f1"],
            "per_window_grouped_macro_f1": windows_v["grouped_cv"]["macro_f1"],
            "per_window_loco_three_class_mean_macro_f1": windows_v["leave_one_corpus_out"]["three_class_corpus_mean_macro_f1"],
        })
    );
    if let Some(p) = predictions {
        // Each clip's distance from its fold's training corpora, for `valence calibrate
        // --familiarity` (features as the head reads them, before any group normalisation).
        let distances = match group_norm {
            None => Some([
                crate::familiarity::fold_distances(&x, &extra, &fold, &corpora)?,
                crate::familiarity::fold_distances(&x, &extra, &loco_fold, &corpora)?,
            ]),
            Some(_) => None,
        };
        write_predictions(p, &clips, &y, &grouped_p, &loco_p, distances.as_ref())?;
    }
    if let Some(p) = json {
        let v = serde_json::json!({
            "config": cfg,
            "features": args.spec(),
            "views": args.views, "view_window": args.view_window, "view_opus": args.view_opus,
            "balance_corpora": args.balance_corpora,
            "group_norm": group_norm.map(GroupNorm::name),
            "temperature": temperature,
            "grouped_cv": grouped_v,
            "leave_one_corpus_out": loco_v,
            "opus_test": coded_v,
            "per_window": windows_v,
        });
        std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

/// One row per clip: who and what it is, then its out-of-fold probabilities under grouped CV
/// and under leave-one-corpus-out, then (when given) its distance from the training corpora of
/// the fold that held it out under each scheme.
fn write_predictions(
    path: &Path,
    clips: &[Clip],
    y: &[usize],
    grouped: &[Vec<f32>],
    loco: &[Vec<f32>],
    distances: Option<&[Vec<f32>; 2]>,
) -> Result<()> {
    let mut w = csv::Writer::from_path(path)
        .with_context(|| format!("cannot write predictions to {}", path.display()))?;
    let mut header = vec!["path", "corpus", "language", "speaker", "valence"];
    let prob_cols: Vec<String> = ["grouped", "loco"]
        .iter()
        .flat_map(|s| LABELS.iter().map(move |l| format!("{s}_{l}")))
        .collect();
    header.extend(prob_cols.iter().map(String::as_str));
    if distances.is_some() {
        header.extend(["grouped_distance", "loco_distance"]);
    }
    w.write_record(&header)?;
    for (i, c) in clips.iter().enumerate() {
        let mut row = vec![
            c.path.clone(),
            c.corpus.clone(),
            c.language.clone(),
            c.speaker.clone(),
            LABELS[y[i]].to_string(),
        ];
        row.extend(grouped[i].iter().chain(&loco[i]).map(|p| format!("{p:.6}")));
        if let Some([g, l]) = distances {
            row.extend([format!("{:.5}", g[i]), format!("{:.5}", l[i])]);
        }
        w.write_record(&row)?;
    }
    w.flush()?;
    Ok(())
}

/// The centroid file `valence train` writes into a model directory.
pub const FAMILIARITY_FILE: &str = "familiarity.safetensors";

/// `valence train`: trains on every clip (validation speakers held out for early stopping)
/// and writes a model directory that uses `encoder_ref` as its encoder path.
/// `temperature` (from `valence cv`, fitted on held-out speakers) divides the head's logits.
pub fn train_model(
    args: &FeatureArgs,
    output: &Path,
    encoder_ref: Option<&str>,
    temperature: f64,
) -> Result<()> {
    let (clips, x, y) = args.load()?;
    let extra = args.load_views(&clips)?;
    let rows = args.expander(&clips, &extra)(&(0..clips.len() + extra.x.len()).collect::<Vec<_>>());
    let speakers: Vec<String> = clips.iter().map(|c| c.speaker.clone()).collect();
    let domains = args.adversary_domains(&clips);
    let emotions = dataset::emotion_labels(&clips);
    let rows = extra.gather(
        train::ClipRows {
            x: &x,
            y: &y,
            speakers: &speakers,
            domains: &domains,
            emotions: &emotions,
        },
        &rows,
    );
    eprintln!(
        "training on {} rows ({} clips, {} augmented views{})",
        rows.x.len(),
        clips.len(),
        extra.x.len(),
        if args.balance_corpora {
            ", corpora balanced"
        } else {
            ""
        }
    );
    let cfg = args.train_config(rows.x[0].len());
    let members = args.ensemble.max(1);
    let bar = indicatif::ProgressBar::new((cfg.max_epochs * members) as u64).with_style(
        indicatif::ProgressStyle::with_template("training {pos}/{len} epochs [{bar:30}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut trained = train::train_ensemble(
        &rows.x,
        &rows.y,
        &rows.speakers,
        rows.side(),
        &cfg,
        members,
        |m, e, loss, f1| {
            bar.set_position((m * cfg.max_epochs + e) as u64);
            bar.set_message(format!(
                "head {}/{members}: loss {loss:.4} val macro-F1 {f1:.3}",
                m + 1
            ));
        },
    )?;
    bar.finish_and_clear();
    eprintln!(
        "trained {} epochs, best epoch {} (validation macro-F1 {:.3}); loss {:.4} -> {:.4}",
        trained.epochs_run,
        trained.best_epoch,
        trained.best_val_macro_f1,
        trained.train_loss.first().copied().unwrap_or(0.0),
        trained.train_loss.last().copied().unwrap_or(0.0)
    );
    if temperature != 1.0 {
        train::apply_temperature(&mut trained, temperature)?;
        eprintln!("logits divided by temperature {temperature}");
    }
    std::fs::create_dir_all(output)?;
    std::fs::write(
        output.join("head_config.json"),
        serde_json::to_string_pretty(&trained.head_config)? + "\n",
    )?;
    candle_core::safetensors::save(&trained.tensors, output.join("head.safetensors"))?;
    trained
        .scaler
        .save_safetensors(&output.join("scaler.safetensors"))?;
    // The training corpora's centroids: `valence calibrate --familiarity --apply` fits the
    // temperature that follows the distance from them.
    let corpora: Vec<String> = clips.iter().map(|c| c.corpus.clone()).collect();
    crate::familiarity::centroids(&x, &trained.scaler, &corpora)?
        .save(&output.join(FAMILIARITY_FILE))?;
    let kind = detect_encoder_kind(&args.encoder)?;
    let encoder_path = match encoder_ref {
        Some(r) => r.to_string(),
        None => args
            .encoder
            .canonicalize()
            .unwrap_or(args.encoder.clone())
            .to_string_lossy()
            .into(),
    };
    let mut manifest = Manifest {
        format_version: 1,
        name: format!(
            "valence-{}-{}",
            match kind {
                EncoderKind::Whisper => "whisper",
                EncoderKind::Wav2vec2 => "wav2vec2",
            },
            format!("{:?}", args.head).to_lowercase()
        ),
        labels: LABELS.iter().map(|s| s.to_string()).collect(),
        sample_rate: 16000,
        encoder: EncoderSpec {
            kind,
            path: encoder_path,
            quantize: args.quantize.clone(),
            adapted: None,
        },
        features: args.spec(),
        scaler: Some("scaler.safetensors".into()),
        head: HeadSpec::Files {
            config: "head_config.json".into(),
            weights: "head.safetensors".into(),
        },
        dtype: "f32".into(),
        familiarity: Some(FamiliaritySpec {
            centroids: FAMILIARITY_FILE.into(),
            temperature: None,
        }),
        speech_detector: Some(valence_model::speech::DEFAULT_DETECTOR.into()),
        notes: Some(serde_json::json!({
            "trained_on": args.manifest.to_string_lossy(),
            "clips": clips.len(),
            "recipe": cfg,
            "views": args.views,
            "view_window": args.view_window,
            "view_opus": args.view_opus,
            "balance_corpora": args.balance_corpora,
            "ensemble": members,
            "epochs_run": trained.epochs_run,
            "best_epoch": trained.best_epoch,
            "validation_macro_f1": trained.best_val_macro_f1,
            "licence": "research and evaluation only: trained on corpora with non-commercial or unstated licences (see MODEL_CARD.md)",
        })),
    };
    // Only a non-default adversary target is recorded, so the shipped recipe still reproduces
    // the shipped files byte for byte.
    if args.adversary > 0.0
        && args.adversary_on == AdversaryOn::Speaker
        && let Some(notes) = manifest
            .notes
            .as_mut()
            .and_then(serde_json::Value::as_object_mut)
    {
        notes.insert("adversary_on".into(), "speaker".into());
    }
    manifest.write(output)?;
    eprintln!("model written to {}", output.display());
    Ok(())
}

/// What `valence adapt` holds out, trains and how.
#[derive(Debug, Clone, clap::Args)]
pub struct AdaptArgs {
    /// Hold out this corpus (leave-one-corpus-out for one corpus).
    #[arg(long, conflicts_with = "holdout_fold")]
    pub holdout_corpus: Option<String>,
    /// Hold out this fold of the grouped-by-speaker folds (`valence cv`'s folds, same seed).
    #[arg(long)]
    pub holdout_fold: Option<usize>,
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// What to train, each from the same start: `head` (the head alone), `lora` (adapters and
    /// head), `attention` (attention pooling of the layer and head), `lora+attention`.
    #[arg(long, value_delimiter = ',', default_value = "head,lora")]
    pub arms: Vec<String>,
    /// Adapter rank (LoRA on the query and value projections).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Adapter scale numerator (the update is alpha / rank x B A).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    #[arg(long, default_value_t = 6)]
    pub epochs: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

/// The head trainer's options that adapt's own training loop (`adapt::fit`) does not have, as
/// given: adapt refuses them rather than report arms that silently went without.
fn flags_adapt_ignores(args: &FeatureArgs) -> Vec<&'static str> {
    [
        (args.adversary > 0.0, "--adversary"),
        (args.mixup > 0.0, "--mixup"),
        (args.aux_emotion > 0.0, "--aux-emotion"),
        (args.polarity_cost > 0.0, "--polarity-cost"),
        (args.ensemble > 1, "--ensemble"),
        (args.balance_corpora, "--balance-corpora"),
    ]
    .into_iter()
    .filter_map(|(given, flag)| given.then_some(flag))
    .collect()
}

/// `valence adapt`: trains the head alone and the head with adapters on the last encoder layer
/// it reads, on the same clips, views, seeds and schedule, and compares them on held-out clips.
pub fn adapt(args: &FeatureArgs, adapt_args: &AdaptArgs, json: Option<&Path>) -> Result<()> {
    use crate::adapt::{AdaptedLayer, Window, fit, prepare};
    let spec = args.spec();
    if spec.pooling != Pooling::VoicedMean || spec.prosody {
        bail!("adapt pools with voiced-mean and no prosody (--pooling voiced-mean)");
    }
    if spec.layers.len() > 1 && spec.combine != Combine::Concat {
        bail!("adapt joins layers with --combine concat");
    }
    let unsupported = flags_adapt_ignores(args);
    if !unsupported.is_empty() {
        bail!(
            "adapt trains its arms without {}: leave {} out",
            unsupported.join(", "),
            if unsupported.len() == 1 { "it" } else { "them" }
        );
    }
    let top = *spec.layers.iter().max().context("no layers")?;
    if top == 0 {
        bail!("hidden state 0 comes from no layer: nothing to adapt");
    }
    let fixed: Vec<usize> = spec.layers.iter().copied().filter(|&l| l != top).collect();
    let clips = dataset::read_manifest(&args.manifest)?;
    let root = dataset::clip_root(&args.manifest, args.root.as_deref());
    let held: Vec<bool> = match (&adapt_args.holdout_corpus, adapt_args.holdout_fold) {
        (Some(c), _) => clips.iter().map(|x| &x.corpus == c).collect(),
        (None, Some(f)) => {
            let speakers: Vec<String> = clips.iter().map(|c| c.speaker.clone()).collect();
            train::speaker_folds(&speakers, adapt_args.folds, args.seed)
                .iter()
                .map(|&k| k == f)
                .collect()
        }
        _ => bail!("give --holdout-corpus NAME or --holdout-fold N"),
    };
    if !held.iter().any(|&h| h) || held.iter().all(|&h| h) {
        bail!("the holdout leaves no test or no training clips");
    }
    let mut encoder = valence_model::Encoder::load_dir(
        &args.encoder,
        None,
        candle_core::DType::F32,
        &Device::Cpu,
    )?;
    if let Some(q) = args.quantize.as_deref() {
        encoder.quantize(quantization_kernel(q)?)?;
    }
    let audio = clips
        .iter()
        .map(|c| crate::decode::decode_to_16k_mono(&root.join(&c.path)))
        .collect::<Result<Vec<_>>>()?;
    let views = dataset::ViewSpec {
        per_clip: args.views,
        window_s: args.view_window,
        upto: top,
        seed: args.seed ^ 0xa06,
        opus: args.view_opus()?,
    };
    // Windows: every clip whole, then the training clips' augmented views.
    let mut jobs: Vec<(usize, Option<usize>)> = (0..clips.len()).map(|c| (c, None)).collect();
    for c in (0..clips.len()).filter(|&c| !held[c]) {
        jobs.extend((0..args.views).map(|v| (c, Some(v))));
    }
    let bar = indicatif::ProgressBar::new(jobs.len() as u64);
    let n = clips.len();
    let windows: Vec<Window> = jobs
        .iter()
        .map(|&(c, view)| {
            let label = clips[c].label().unwrap_or(0);
            let samples = match view {
                None => audio[c].clone(),
                Some(v) => dataset::augmented_view(&clips, &audio, c, v, views, |o| !held[o])?,
            };
            bar.inc(1);
            prepare(&encoder, &samples, top - 1, &fixed, label)
                .with_context(|| format!("encoding {}", clips[c].path))
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();
    drop(audio);
    let train_idx: Vec<usize> = (0..windows.len()).filter(|&i| i >= n || !held[i]).collect();
    let test_idx: Vec<usize> = (0..n).filter(|&c| held[c]).collect();
    let y: Vec<usize> = test_idx.iter().map(|&c| windows[c].label).collect();
    let dim = windows[0].fixed.len() + windows[0].states.dim(1)?;
    let cfg = crate::adapt::AdaptConfig {
        head: args.train_config(dim).head,
        lr: args.lr,
        weight_decay: 0.01,
        label_smoothing: 0.1,
        batch_size: adapt_args.batch_size,
        epochs: adapt_args.epochs,
        clip_norm: 1.0,
        seed: args.seed,
    };
    let mut arms = serde_json::Map::new();
    for arm in &adapt_args.arms {
        let (rank, attention) = match arm.as_str() {
            "head" => (0, false),
            "lora" => (adapt_args.rank, false),
            "attention" => (0, true),
            "lora+attention" => (adapt_args.rank, true),
            other => bail!("unknown arm `{other}` (head, lora, attention, lora+attention)"),
        };
        let t0 = std::time::Instant::now();
        let mut layer = AdaptedLayer::load(
            &args.encoder,
            top - 1,
            rank,
            adapt_args.alpha,
            args.seed ^ 0x10a,
        )?;
        if attention {
            layer = layer.with_attention_pooling()?;
        }
        let fitted = fit(layer, &windows, &train_idx, &cfg, |e, l| {
            eprintln!(
                "{arm} epoch {e}: loss {l:.4} ({:.0} s)",
                t0.elapsed().as_secs_f64()
            )
        })?;
        let probs = fitted.predict(&windows, &test_idx)?;
        let pred: Vec<usize> = probs.iter().map(|p| valence_model::argmax(p).0).collect();
        let r = metrics::report(&y, &pred, 3);
        let (lo, hi) = metrics::bootstrap_macro_f1(&y, &pred, 3, 1000, 7);
        let ece = metrics::expected_calibration_error(&probs, &y, 15);
        let recall: Vec<f64> = r.per_class.iter().map(|c| c.recall).collect();
        eprintln!(
            "{arm}: held-out macro-F1 {:.3} [{lo:.3}, {hi:.3}], recall neg/neu/pos {:.2}/{:.2}/{:.2}, ECE {ece:.3} ({:.0} s)",
            r.macro_f1,
            recall[0],
            recall[1],
            recall[2],
            t0.elapsed().as_secs_f64()
        );
        arms.insert(
            arm.clone(),
            serde_json::json!({"rank": rank, "attention_pooling": attention, "macro_f1": r.macro_f1, "ci95": [lo, hi],
                "recall": recall, "ece15": ece, "train_loss": fitted.train_loss,
                "confusion": r.confusion, "seconds": t0.elapsed().as_secs_f64()}),
        );
    }
    let v = serde_json::json!({
        "holdout_corpus": adapt_args.holdout_corpus, "holdout_fold": adapt_args.holdout_fold,
        "folds": adapt_args.folds, "features": spec, "views": args.views,
        "view_opus": args.view_opus, "config": cfg,
        "alpha": adapt_args.alpha,
        "train_windows": train_idx.len(), "test_clips": test_idx.len(), "arms": arms,
    });
    println!("{v}");
    if let Some(p) = json {
        std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adversary_labels_number_corpora_or_speakers_in_name_order() {
        let clip = |corpus: &str, speaker: &str| Clip {
            path: String::new(),
            corpus: corpus.into(),
            language: String::new(),
            speaker: speaker.into(),
            gender: String::new(),
            emotion: String::new(),
            valence: "neutral".into(),
            duration_s: 1.0,
        };
        let clips = [
            clip("b", "b2"),
            clip("a", "a1"),
            clip("b", "b1"),
            clip("a", "a1"),
        ];
        assert_eq!(corpus_domains(&clips), [1, 0, 1, 0]);
        assert_eq!(speaker_domains(&clips), [2, 0, 1, 0]);
    }

    #[test]
    fn adapt_names_the_trainer_options_it_would_ignore() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            features: FeatureArgs,
        }
        let parse = |extra: &[&str]| {
            let base = ["valence", "--manifest", "m.csv", "--encoder", "enc"];
            <Cli as clap::Parser>::try_parse_from(base.iter().chain(extra)).unwrap()
        };
        assert!(flags_adapt_ignores(&parse(&["--views", "2", "--seed", "3"]).features).is_empty());
        let given = parse(&[
            "--aux-emotion",
            "0.5",
            "--adversary",
            "0.3",
            "--ensemble",
            "5",
        ]);
        assert_eq!(
            flags_adapt_ignores(&given.features),
            ["--adversary", "--aux-emotion", "--ensemble"]
        );
    }
}
