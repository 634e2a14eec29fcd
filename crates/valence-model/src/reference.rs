//! The reference model of the public model card: mean-pooled hidden states of
//! `facebook/wav2vec2-large-xlsr-53` fed to the card's Transformer head after its
//! StandardScaler. Loaded from plain directories or a Hugging Face hub cache, offline.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::manifest::{EncoderKind, EncoderSpec, FeatureSpec, HeadSpec, Manifest};

/// `ROOT/models--ORG--NAME/snapshots/REV`, REV from `refs/main` when present, else the only
/// (or newest) snapshot.
pub fn hf_snapshot(cache_root: &Path, repo_id: &str) -> Result<PathBuf> {
    let repo_dir = cache_root.join(format!("models--{}", repo_id.replace('/', "--")));
    if !repo_dir.is_dir() {
        bail!(
            "{repo_id} is not in the HF cache {} (expected {})",
            cache_root.display(),
            repo_dir.display()
        );
    }
    let snapshots = repo_dir.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo_dir.join("refs").join("main")) {
        let p = snapshots.join(rev.trim());
        if p.is_dir() {
            return Ok(p);
        }
    }
    let mut entries: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
        .with_context(|| format!("{} has no snapshots", repo_dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| {
            (
                e.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH),
                e.path(),
            )
        })
        .collect();
    entries.sort();
    entries
        .pop()
        .map(|(_, p)| p)
        .with_context(|| format!("{} has no snapshots", repo_dir.display()))
}

/// Labels from the card's config (`labels`, `class_names` or `id2label`), else ours.
fn card_labels(cfg: &serde_json::Value) -> Vec<String> {
    if let Some(a) = cfg
        .get("labels")
        .or_else(|| cfg.get("class_names"))
        .and_then(|v| v.as_array())
    {
        let l: Vec<String> = a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_lowercase))
            .collect();
        if !l.is_empty() {
            return l;
        }
    }
    if let Some(m) = cfg.get("id2label").and_then(|v| v.as_object()) {
        let mut pairs: Vec<(usize, String)> = m
            .iter()
            .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_lowercase())))
            .collect();
        pairs.sort();
        if !pairs.is_empty() {
            return pairs.into_iter().map(|p| p.1).collect();
        }
    }
    super::LABELS.iter().map(|s| s.to_string()).collect()
}

/// Writes a model directory whose manifest points at the card and encoder directories.
pub fn write_reference_model(card: &Path, encoder: &Path, out: &Path) -> Result<()> {
    let cfg_path = card.join("config.json");
    let cfg: serde_json::Value = serde_json::from_str(
        &crate::files::read_metadata_string(&cfg_path)
            .with_context(|| format!("cannot read {}", cfg_path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", cfg_path.display()))?;
    // Which states feed the head: the card's config may name a layer; the model output
    // (last_hidden_state) otherwise.
    let features = match cfg
        .get("hidden_layer")
        .or_else(|| cfg.get("feature_layer"))
        .and_then(|v| v.as_u64())
    {
        Some(l) => FeatureSpec {
            layers: vec![l as usize],
            ..FeatureSpec::last_hidden_state()
        }
        .with_source_hidden(),
        None => FeatureSpec::last_hidden_state(),
    };
    let abs = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    Manifest {
        format_version: 1,
        name: "reference-xlsr53-card".into(),
        labels: card_labels(&cfg),
        sample_rate: 16000,
        encoder: EncoderSpec {
            kind: EncoderKind::Wav2vec2,
            path: abs(encoder).to_string_lossy().into(),
            quantize: None,
            adapted: None,
        },
        features,
        scaler: None,
        head: HeadSpec::Card {
            card: abs(card).to_string_lossy().into(),
        },
        dtype: "f32".into(),
        familiarity: None,
        speech_detector: None,
        notes: Some(
            serde_json::json!({"source": "reference model card (xlsr-53 + Transformer head)"}),
        ),
    }
    .write(out)
}

impl FeatureSpec {
    fn with_source_hidden(mut self) -> Self {
        self.source = super::FeatureSource::HiddenStates;
        self
    }
}
