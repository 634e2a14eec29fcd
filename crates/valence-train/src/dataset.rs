//! Labelled clips (`manifest.csv`) and their pooled encoder features, cached on disk so that
//! training and model selection take seconds once the encoder has run over the data.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use valence_model::serving::runtime::Int8Kernel;

use valence_model::manifest::{Combine, FeatureSource, FeatureSpec, Pooling};
use valence_model::{Encoder, LABELS};

/// One row of `manifest.csv`: `path,corpus,language,speaker,gender,emotion,valence,duration_s`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Clip {
    pub path: String,
    pub corpus: String,
    pub language: String,
    pub speaker: String,
    #[serde(default)]
    pub gender: String,
    #[serde(default)]
    pub emotion: String,
    pub valence: String,
    #[serde(default)]
    pub duration_s: f64,
}

/// Each clip's emotion category (the manifest's `emotion`) as a number, categories in name order.
pub fn emotion_labels(clips: &[Clip]) -> Vec<usize> {
    numbered(clips.iter().map(|c| c.emotion.as_str()))
}

/// Each name as its index among the distinct names in sorted order.
pub fn numbered<'a>(names: impl Iterator<Item = &'a str> + Clone) -> Vec<usize> {
    let sorted: Vec<&str> = names
        .clone()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    names
        .map(|n| sorted.binary_search(&n).unwrap_or(0))
        .collect()
}

impl Clip {
    /// Index into [`LABELS`], or None for `unmapped` (and anything else unknown).
    pub fn label(&self) -> Option<usize> {
        LABELS.iter().position(|l| *l == self.valence)
    }
}

/// The folder a manifest's clip paths are relative to: `root` when given, else the manifest's
/// own folder.
pub fn clip_root(manifest: &Path, root: Option<&Path>) -> PathBuf {
    root.map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Reads a manifest, keeping only rows with a valence label (`unmapped` rows are skipped).
pub fn read_manifest(path: &Path) -> Result<Vec<Clip>> {
    let mut r =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, row) in r.deserialize::<Clip>().enumerate() {
        let clip = row.with_context(|| format!("{}: row {}", path.display(), i + 2))?;
        if clip.label().is_some() {
            out.push(clip);
        }
    }
    if out.is_empty() {
        bail!(
            "{}: no rows with a negative/neutral/positive valence",
            path.display()
        );
    }
    Ok(out)
}

/// Mean and standard deviation over time of every hidden state, per clip.
pub struct FeatureTable {
    /// [clips, layers + 1, width]
    pub mean: Tensor,
    pub std: Tensor,
    /// [clips, width]: the model output, mean over time.
    pub last_mean: Tensor,
    /// [clips, layers + 1, width]: mean over the voiced frames (`voiced_mean` pooling).
    pub voiced_mean: Tensor,
}

impl FeatureTable {
    pub fn len(&self) -> usize {
        self.mean.dim(0).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of features as the manifest's feature spec would pool them.
    pub fn select(&self, spec: &FeatureSpec) -> Result<Vec<Vec<f32>>> {
        let per_layer = |l: usize| -> Result<Tensor> {
            let m = self.mean.narrow(1, l, 1)?.squeeze(1)?;
            Ok(match spec.pooling {
                Pooling::Mean => m,
                Pooling::MeanStd => Tensor::cat(&[m, self.std.narrow(1, l, 1)?.squeeze(1)?], 1)?,
                Pooling::VoicedMean => self.voiced_mean.narrow(1, l, 1)?.squeeze(1)?,
            })
        };
        let t = match spec.source {
            FeatureSource::LastHiddenState => {
                if spec.pooling != Pooling::Mean {
                    bail!("last_hidden_state features are cached as a mean only");
                }
                self.last_mean.clone()
            }
            FeatureSource::HiddenStates => {
                let layers = spec
                    .layers
                    .iter()
                    .map(|&l| per_layer(l))
                    .collect::<Result<Vec<_>>>()?;
                match spec.combine {
                    Combine::Mean => Tensor::stack(&layers, 0)?.mean(0)?,
                    Combine::Concat => Tensor::cat(&layers, 1)?,
                }
            }
        };
        Ok(t.to_vec2::<f32>()?)
    }
}

/// Feeds the clips' root and paths to a cache key.
fn hash_clip_paths(h: &mut Sha256, root: &Path, clips: &[Clip]) {
    h.update(root.to_string_lossy().as_bytes());
    for c in clips {
        h.update(c.path.as_bytes());
        h.update(b"\n");
    }
}

fn cache_key(
    encoder_dir: &Path,
    quantize: Option<Int8Kernel>,
    clips: &[Clip],
    root: &Path,
) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"valence-features-v1");
    if quantize.is_some() {
        // Only quantized runs add to the key, so f32 caches made earlier stay valid. Every
        // 8-bit kernel gives the same features (kernels::int8), so the kernel is not part of it;
        // the format's block size and weight bits are.
        h.update(
            format!(
                "quantize=int8-k{}-w{}+conv2",
                valence_model::kernels::int8::K_BLOCK,
                valence_model::kernels::int8::WEIGHT_BITS
            )
            .as_bytes(),
        );
    }
    let weights = valence_model::find_weights_file(encoder_dir)?;
    let meta = std::fs::metadata(&weights)?;
    h.update(std::fs::read(encoder_dir.join("config.json"))?);
    h.update(meta.len().to_le_bytes());
    // The weights' first MiB: cheap, and enough to tell encoders apart.
    let mut f = std::fs::File::open(&weights)?;
    let mut head = vec![0u8; 1 << 20];
    let n = std::io::Read::read(&mut f, &mut head)?;
    h.update(&head[..n]);
    hash_clip_paths(&mut h, root, clips);
    Ok(format!("{:x}", h.finalize())[..20].to_string())
}

/// Runs the encoder over every clip (on its real length) and caches the pooled states in
/// `cache_dir`; a second call with the same encoder and clips reads the cache. `quantize`
/// re-stores the encoder's projections as in a manifest's `encoder.quantize` (CPU only).
pub fn features(
    clips: &[Clip],
    root: &Path,
    encoder_dir: &Path,
    quantize: Option<Int8Kernel>,
    cache_dir: &Path,
    device: &Device,
) -> Result<FeatureTable> {
    features_through(clips, root, encoder_dir, quantize, None, cache_dir, device)
}

/// [`features`] of the clips after an Opus/RTP round trip at `opus_kbps`
/// ([`crate::codec::opus_round_trip`]): what the model hears of them over a VoIP call.
pub fn coded_features(
    clips: &[Clip],
    root: &Path,
    encoder_dir: &Path,
    quantize: Option<Int8Kernel>,
    opus_kbps: u32,
    cache_dir: &Path,
    device: &Device,
) -> Result<FeatureTable> {
    features_through(
        clips,
        root,
        encoder_dir,
        quantize,
        Some(opus_kbps),
        cache_dir,
        device,
    )
}

fn features_through(
    clips: &[Clip],
    root: &Path,
    encoder_dir: &Path,
    quantize: Option<Int8Kernel>,
    opus_kbps: Option<u32>,
    cache_dir: &Path,
    device: &Device,
) -> Result<FeatureTable> {
    let key = cache_key(encoder_dir, quantize, clips, root)?;
    let file = match opus_kbps {
        None => cache_dir.join(format!("{key}.safetensors")),
        Some(k) => cache_dir.join(format!("{key}-opus{k}kbps.safetensors")),
    };
    if file.is_file() {
        let t = candle_core::safetensors::load(&file, &Device::Cpu)?;
        let get = |k: &str| {
            t.get(k)
                .cloned()
                .with_context(|| format!("{} lacks {k}", file.display()))
        };
        // Caches made before `voiced_mean` existed lack it: encode again.
        if let Ok(voiced_mean) = get("voiced_mean") {
            let table = FeatureTable {
                mean: get("mean")?,
                std: get("std")?,
                last_mean: get("last_mean")?,
                voiced_mean,
            };
            if table.len() == clips.len() {
                return Ok(table);
            }
        }
    }
    let encoder = load_encoder(encoder_dir, quantize, device)?;
    let bar = indicatif::ProgressBar::new(clips.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("encoding {pos}/{len} clips [{bar:30}] {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut means, mut stds, mut lasts, mut voiced) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for c in clips {
        let path = root.join(&c.path);
        let mut samples = crate::decode::decode_to_16k_mono(&path)?;
        if let Some(k) = opus_kbps {
            samples = crate::codec::opus_round_trip(&samples, k)
                .with_context(|| format!("coding {}", path.display()))?;
        }
        let out = encoder
            .encode(&samples)
            .with_context(|| format!("encoding {}", path.display()))?;
        let (m, sd, v) = pool_states(&out.hidden_states, &samples)?;
        means.push(m);
        stds.push(sd);
        voiced.push(v);
        lasts.push(
            out.last_hidden_state
                .to_dtype(DType::F32)?
                .mean(1)?
                .squeeze(0)?
                .to_device(&Device::Cpu)?,
        );
        bar.inc(1);
    }
    bar.finish_and_clear();
    let table = FeatureTable {
        mean: Tensor::stack(&means, 0)?,
        std: Tensor::stack(&stds, 0)?,
        last_mean: Tensor::stack(&lasts, 0)?,
        voiced_mean: Tensor::stack(&voiced, 0)?,
    };
    save_cached(
        &file,
        [
            ("mean", table.mean.clone()),
            ("std", table.std.clone()),
            ("last_mean", table.last_mean.clone()),
            ("voiced_mean", table.voiced_mean.clone()),
        ],
    )?;
    Ok(table)
}

/// Every clip's prosodic statistics ([`valence_model::classifier::prosody`]), cached in `cache_dir`.
pub fn prosody_features(clips: &[Clip], root: &Path, cache_dir: &Path) -> Result<Vec<Vec<f32>>> {
    let dim = valence_model::classifier::prosody::DIM;
    let mut h = Sha256::new();
    h.update(b"valence-prosody-v1");
    hash_clip_paths(&mut h, root, clips);
    let file = cache_dir.join(format!(
        "prosody-{}.safetensors",
        &format!("{:x}", h.finalize())[..20]
    ));
    if let Ok(t) = candle_core::safetensors::load(&file, &Device::Cpu)
        && let Some(t) = t.get("prosody")
        && t.dims() == [clips.len(), dim]
    {
        return Ok(t.to_vec2::<f32>()?);
    }
    let bar = indicatif::ProgressBar::new(clips.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("prosody {pos}/{len} clips [{bar:30}] {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut rows = Vec::with_capacity(clips.len() * dim);
    for c in clips {
        let path = root.join(&c.path);
        let samples = crate::decode::decode_to_16k_mono(&path)?;
        rows.extend(valence_model::classifier::prosody::utterance_features(
            &samples,
        ));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let t = Tensor::from_vec(rows, (clips.len(), dim), &Device::Cpu)?;
    save_cached(&file, [("prosody", t.clone())])?;
    Ok(t.to_vec2::<f32>()?)
}

/// The windows the element would classify in a clip: 3 s every 1 s, then the tail when at least
/// 1 s of it was in no window, leaving out windows the element reports as silence (below
/// `silence_dbfs`). A clip shorter than 1 s gives none.
pub fn element_windows(samples: &[f32], silence_dbfs: f64) -> Vec<Vec<f32>> {
    element_windows_with_speech(samples, silence_dbfs, None, 0.0)
        .into_iter()
        .map(|(w, _)| w)
        .collect()
}

/// The element's windows of a clip as [`element_windows`] gives them, each with the share of
/// its frames `detector` calls speech at `threshold` (streamed over the clip as the element
/// runs it; None without a detector or for a window shorter than a frame).
pub fn element_windows_with_speech(
    samples: &[f32],
    silence_dbfs: f64,
    detector: Option<&std::sync::Arc<valence_model::speech::SileroVad>>,
    threshold: f32,
) -> Vec<(Vec<f32>, Option<f32>)> {
    const RATE: usize = 16_000;
    let mut w = valence_model::audio::Windower::new(3 * RATE, RATE);
    let mut windows = w.push(samples);
    windows.extend(w.finish(RATE));
    let stream = detector.map(|d| {
        let s = valence_model::speech::SpeechStream::new(d.clone());
        s.push(samples);
        s
    });
    windows
        .into_iter()
        .filter(|w| valence_model::audio::rms_dbfs(&w.samples) >= silence_dbfs)
        .map(|w| {
            let share = stream
                .as_ref()
                .and_then(|s| s.speech_share(w.start, w.samples.len(), threshold));
            (w.samples, share)
        })
        .collect()
}

/// Default location of cached features.
pub fn default_feature_cache() -> PathBuf {
    valence_model::serving::registry::cache_dir().join("features")
}

/// Mean, standard deviation and voiced mean over time of hidden states 0..=`upto` of each
/// buffer: three [n, upto + 1, width] tensors.
fn encode_pooled(
    encoder: &Encoder,
    upto: usize,
    buffers: impl ExactSizeIterator<Item = Result<Vec<f32>>>,
    what: &str,
) -> Result<(Tensor, Tensor, Tensor)> {
    let bar = indicatif::ProgressBar::new(buffers.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(&format!(
            "encoding {{pos}}/{{len}} {what} [{{bar:30}}] {{eta}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut means, mut stds, mut voiced) = (Vec::new(), Vec::new(), Vec::new());
    for samples in buffers {
        let samples = samples?;
        let out = encoder.encode_upto(&samples, Some(upto))?;
        let (m, sd, v) = pool_states(&out.hidden_states[..=upto], &samples)?;
        means.push(m);
        stds.push(sd);
        voiced.push(v);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((
        Tensor::stack(&means, 0)?,
        Tensor::stack(&stds, 0)?,
        Tensor::stack(&voiced, 0)?,
    ))
}

/// Mean, standard deviation and voiced mean over time of one clip's hidden states (each
/// [1, frames, width]), for `samples`: three [states, width] CPU tensors.
fn pool_states(states: &[Tensor], samples: &[f32]) -> Result<(Tensor, Tensor, Tensor)> {
    let hs = Tensor::cat(states, 0)?.to_dtype(DType::F32)?; // [L, T, D]
    let m = hs.mean_keepdim(1)?;
    let sd = hs.broadcast_sub(&m)?.sqr()?.mean(1)?.sqrt()?;
    let v = valence_model::manifest::voiced_mean(&hs, samples)?;
    Ok((
        m.squeeze(1)?.to_device(&Device::Cpu)?,
        sd.to_device(&Device::Cpu)?,
        v.to_device(&Device::Cpu)?,
    ))
}

/// How training views of the clips are made (see [`crate::augment`]).
#[derive(Debug, Clone, Copy)]
pub struct ViewSpec {
    /// Views per clip.
    pub per_clip: usize,
    /// Window length in seconds (the element's `window`).
    pub window_s: f64,
    /// Hidden states up to this one are pooled (the head's deepest layer).
    pub upto: usize,
    pub seed: u64,
    /// Chance that a view goes through an Opus/RTP round trip ([`crate::augment::Augmenter::opus`]).
    pub opus: f64,
}

/// View `v` of clip `c` (`audio[c]`), seeded by `spec.seed`, `c` and `v`: a window-length
/// augmented crop with babble from three clips of other speakers that `babble_from` allows.
pub fn augmented_view(
    clips: &[Clip],
    audio: &[Vec<f32>],
    c: usize,
    v: usize,
    spec: ViewSpec,
    babble_from: impl Fn(usize) -> bool,
) -> Result<Vec<f32>> {
    let aug = crate::augment::Augmenter {
        window: (spec.window_s * crate::augment::RATE) as usize,
        opus: spec.opus,
    };
    let n = clips.len();
    let mut rng =
        valence_model::rng::SeededNormal::new(spec.seed ^ ((c as u64) << 20) ^ (v as u64));
    let babble: Vec<&[f32]> = (0..64)
        .map(|_| (rng.uniform() * n as f64) as usize % n)
        .filter(|&o| clips[o].speaker != clips[c].speaker && babble_from(o))
        .take(3)
        .map(|o| audio[o].as_slice())
        .collect();
    Ok(aug.view(&audio[c], &babble, &mut rng)?.0)
}

/// Pooled features of `spec.per_clip` random augmented views of every clip (row `c *
/// per_clip + v` is view `v` of clip `c`), cached like [`features`]. `last_mean` holds hidden
/// state `upto` (the views are not run through the whole encoder).
pub fn view_features(
    clips: &[Clip],
    root: &Path,
    encoder_dir: &Path,
    quantize: Option<Int8Kernel>,
    spec: ViewSpec,
    cache_dir: &Path,
    device: &Device,
) -> Result<FeatureTable> {
    let key = cache_key(encoder_dir, quantize, clips, root)?;
    // Views without the codec keep the name they had before it existed (same samples).
    let codec = if spec.opus > 0.0 {
        format!("-opus{}", spec.opus)
    } else {
        String::new()
    };
    let file = cache_dir.join(format!(
        "{key}-views{}-w{}-upto{}-seed{}{codec}-aug1v.safetensors",
        spec.per_clip, spec.window_s, spec.upto, spec.seed
    ));
    if file.is_file() {
        let t = candle_core::safetensors::load(&file, &Device::Cpu)?;
        if let (Some(mean), Some(std), Some(voiced)) =
            (t.get("mean"), t.get("std"), t.get("voiced_mean"))
            && mean.dim(0)? == clips.len() * spec.per_clip
        {
            return table_from(mean.clone(), std.clone(), voiced.clone(), spec.upto);
        }
    }
    let encoder = load_encoder(encoder_dir, quantize, device)?;
    let audio = clips
        .iter()
        .map(|c| crate::decode::decode_to_16k_mono(&root.join(&c.path)))
        .collect::<Result<Vec<_>>>()?;
    let n = clips.len();
    let jobs = (0..n * spec.per_clip).map(|row| {
        let (c, v) = (row / spec.per_clip, row % spec.per_clip);
        augmented_view(clips, &audio, c, v, spec, |_| true)
    });
    let (mean, std, voiced) = encode_pooled(&encoder, spec.upto, jobs, "augmented views")?;
    save_cached(
        &file,
        [
            ("mean", mean.clone()),
            ("std", std.clone()),
            ("voiced_mean", voiced.clone()),
        ],
    )?;
    table_from(mean, std, voiced, spec.upto)
}

/// Pooled hidden states 0..=`upto` of every clip's element windows ([`element_windows`]: 3 s at
/// a 1 s hop, silent ones left out), and each window's clip. Clips under 1 s have none.
pub fn window_features(
    clips: &[Clip],
    root: &Path,
    encoder_dir: &Path,
    quantize: Option<Int8Kernel>,
    upto: usize,
    cache_dir: &Path,
    device: &Device,
) -> Result<(FeatureTable, Vec<usize>)> {
    let key = cache_key(encoder_dir, quantize, clips, root)?;
    let file = cache_dir.join(format!(
        "{key}-windows-3s-hop1s-above{}dB-upto{upto}.safetensors",
        -WINDOW_SILENCE_DBFS
    ));
    if file.is_file() {
        let t = candle_core::safetensors::load(&file, &Device::Cpu)?;
        if let (Some(mean), Some(std), Some(voiced), Some(clip)) = (
            t.get("mean"),
            t.get("std"),
            t.get("voiced_mean"),
            t.get("clip"),
        ) {
            let clip: Vec<usize> = clip
                .to_vec1::<u32>()?
                .into_iter()
                .map(|c| c as usize)
                .collect();
            if clip.iter().all(|&c| c < clips.len()) && clip.len() == mean.dim(0)? {
                return Ok((
                    table_from(mean.clone(), std.clone(), voiced.clone(), upto)?,
                    clip,
                ));
            }
        }
    }
    let encoder = load_encoder(encoder_dir, quantize, device)?;
    let mut windows = Vec::new();
    let mut clip_of = Vec::new();
    for (i, c) in clips.iter().enumerate() {
        let samples = crate::decode::decode_to_16k_mono(&root.join(&c.path))?;
        for w in element_windows(&samples, WINDOW_SILENCE_DBFS) {
            windows.push(w);
            clip_of.push(i);
        }
    }
    if windows.is_empty() {
        bail!("no clip is long enough for one element window (1 s)");
    }
    let (mean, std, voiced) = encode_pooled(
        &encoder,
        upto,
        windows.into_iter().map(Ok),
        "element windows",
    )?;
    let clip = Tensor::from_vec(
        clip_of.iter().map(|&c| c as u32).collect::<Vec<_>>(),
        clip_of.len(),
        &Device::Cpu,
    )?;
    save_cached(
        &file,
        [
            ("mean", mean.clone()),
            ("std", std.clone()),
            ("voiced_mean", voiced.clone()),
            ("clip", clip),
        ],
    )?;
    Ok((table_from(mean, std, voiced, upto)?, clip_of))
}

/// Windows quieter than this (dBFS RMS) are silence to the element's default `silence-threshold`
/// and get no classification.
pub const WINDOW_SILENCE_DBFS: f64 = -60.0;

/// The encoder in f32, its projections re-stored in 8 bits when `quantize` names a kernel
/// (CPU only; a no-op elsewhere), as a manifest's `encoder.quantize` runs it.
fn load_encoder(
    encoder_dir: &Path,
    quantize: Option<Int8Kernel>,
    device: &Device,
) -> Result<Encoder> {
    let mut encoder = Encoder::load_dir(encoder_dir, None, DType::F32, device)?;
    if let Some(q) = quantize {
        encoder.quantize(q)?;
    }
    Ok(encoder)
}

/// Writes cached tensors to `file` whole or not at all (a `.partial` file renamed into place),
/// so an interrupted run never leaves a cache that reads as complete.
fn save_cached<const N: usize>(file: &Path, tensors: [(&str, Tensor); N]) -> Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension("partial");
    let named: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| (name.to_string(), t))
        .collect();
    candle_core::safetensors::save(&named, &tmp)?;
    std::fs::rename(&tmp, file)?;
    Ok(())
}

fn table_from(mean: Tensor, std: Tensor, voiced_mean: Tensor, upto: usize) -> Result<FeatureTable> {
    let last_mean = mean.narrow(1, upto, 1)?.squeeze(1)?;
    Ok(FeatureTable {
        mean,
        std,
        last_mean,
        voiced_mean,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.05).sin() * 0.1).collect()
    }

    fn lengths(x: &[f32]) -> Vec<usize> {
        element_windows(x, -60.0).iter().map(|w| w.len()).collect()
    }

    #[test]
    fn element_windows_are_the_elements() {
        // 5 s: windows at 0, 1 and 2 s; nothing is left outside them.
        assert_eq!(lengths(&tone(80_000)), [48_000; 3]);
        // 6.5 s: four windows (0-3 ... 3-6 s) and no tail (0.5 s uncovered is under 1 s).
        assert_eq!(lengths(&tone(104_000)), [48_000; 4]);
        // 2 s: no full window; the whole clip is the tail.
        assert_eq!(lengths(&tone(32_000)), [32_000]);
        // Under 1 s: none, as the element classifies nothing there.
        assert!(lengths(&tone(12_000)).is_empty());
        // Silent windows are left out: 3 s of silence, then 3 s of sound.
        let x = [vec![0.0; 48_000], tone(48_000)].concat();
        let got = element_windows(&x, -60.0);
        assert_eq!(got.len(), 3, "windows at 1, 2 and 3 s hold sound");
        assert!(
            got.iter()
                .all(|w| valence_model::audio::rms_dbfs(w) > -60.0)
        );
    }
}
