//! Where models live, and one loaded copy per (model directory, device) for the whole process,
//! so that many elements (16 pipelines in one media server) share one set of weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use anyhow::{Result, bail};
use candle_core::Device;
use once_cell::sync::Lazy;

use super::{ValenceModel, device_name};

/// Name of the model that `valence setup` installs and the element uses by default.
pub const DEFAULT_MODEL: &str = "default";

/// `$VALENCE_CACHE_DIR`, else `$XDG_CACHE_HOME/valence`, else `~/.cache/valence`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VALENCE_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("valence");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("valence")
}

/// Turns a `model` property value into a model directory: an existing path, or the name of a
/// model installed under `cache_dir()/models/` (`default` unless given).
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let spec = spec.trim();
    let spec = if spec.is_empty() { DEFAULT_MODEL } else { spec };
    let as_path = Path::new(spec);
    if as_path.is_dir() {
        return Ok(as_path.to_path_buf());
    }
    let looks_like_path = spec.contains('/') || spec.starts_with('.');
    let installed = cache_dir().join("models").join(spec);
    if !looks_like_path && installed.is_dir() {
        return Ok(installed);
    }
    if spec == DEFAULT_MODEL {
        bail!(
            "the default model is not installed at {} (run `valence setup`, see README.md)",
            installed.display()
        );
    }
    if looks_like_path {
        bail!("model directory {spec} does not exist");
    }
    bail!(
        "no model named `{spec}`: neither a directory nor installed at {}",
        installed.display()
    )
}

type Key = (PathBuf, String);

static MODELS: Lazy<Mutex<HashMap<Key, Weak<ValenceModel>>>> = Lazy::new(Default::default);
static LOADS: Lazy<Mutex<HashMap<PathBuf, usize>>> = Lazy::new(Default::default);

/// The process-wide copy of a model, loading it on first use. The lock is held while loading
/// so that concurrent first users wait for one load instead of starting their own.
pub fn shared_model(dir: &Path, device: &Device) -> Result<Arc<ValenceModel>> {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let key = (canonical.clone(), device_name(device));
    let mut models = MODELS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = models.get(&key).and_then(Weak::upgrade) {
        return Ok(m);
    }
    let model = Arc::new(ValenceModel::load(&canonical, device)?);
    *LOADS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(canonical.clone())
        .or_default() += 1;
    models.retain(|_, w| w.strong_count() > 0);
    models.insert(key, Arc::downgrade(&model));
    Ok(model)
}

/// How many times the model in `dir` has been loaded from disk in this process (any device).
pub fn load_count(dir: &Path) -> usize {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    LOADS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&canonical)
        .copied()
        .unwrap_or(0)
}
