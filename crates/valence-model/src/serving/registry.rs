//! Where models live, and one loaded copy per (model directory, device) for the whole process,
//! so that many elements (16 pipelines in one media server) share one set of weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use anyhow::{Result, bail};
use candle_core::Device;
use once_cell::sync::Lazy;

use crate::serving::service::{Backend, BatchConfig, InferenceService};
use crate::{ValenceModel, device_name};

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

/// The newest modification time of the files directly in a model directory: a model whose files
/// changed on disk is loaded again rather than served from memory.
fn dir_stamp(dir: &Path) -> Option<std::time::SystemTime> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
        .max()
}

type Stamp = Option<std::time::SystemTime>;

/// One model's slot: a weak reference to the loaded copy (it lives as long as someone uses it)
/// and the files' stamp at load. Each slot has its own lock, held while that model loads, so
/// concurrent first users share one load and loading one model never stalls users of another.
#[derive(Default)]
struct Slot {
    model: Weak<ValenceModel>,
    stamp: Stamp,
}

static MODELS: Lazy<Mutex<HashMap<Key, Arc<Mutex<Slot>>>>> = Lazy::new(Default::default);
static LOADS: Lazy<Mutex<HashMap<PathBuf, usize>>> = Lazy::new(Default::default);
/// The model handed out last stays loaded after its last user is gone, so a pipeline that goes
/// NULL -> PLAYING -> NULL again and again (or a CLI that classifies file after file) does not
/// load and free the same weights every cycle.
static RECENT: Lazy<Mutex<Option<Arc<ValenceModel>>>> = Lazy::new(Default::default);

/// The canonical directory and the registry key of a model on a device.
fn model_key(dir: &Path, device: &Device) -> (PathBuf, Key) {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let key = (canonical.clone(), device_name(device));
    (canonical, key)
}

/// Whether `shared_model` would load `dir` from disk now (nobody holds a current copy).
pub fn needs_load(dir: &Path, device: &Device) -> bool {
    let (canonical, key) = model_key(dir, device);
    let slot = MODELS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .cloned();
    match slot {
        None => true,
        Some(slot) => {
            let slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.stamp != dir_stamp(&canonical) || slot.model.strong_count() == 0
        }
    }
}

/// The process-wide copy of a model, loading it on first use (see `Slot` for the locking).
pub fn shared_model(dir: &Path, device: &Device) -> Result<Arc<ValenceModel>> {
    let (canonical, key) = model_key(dir, device);
    let slot = {
        let mut models = MODELS.lock().unwrap_or_else(|e| e.into_inner());
        models.retain(|k, s| {
            *k == key
                || s.try_lock()
                    .map(|s| s.model.strong_count() > 0)
                    .unwrap_or(true)
        });
        models.entry(key).or_default().clone()
    };
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    let stamp = dir_stamp(&canonical);
    let model = match slot.model.upgrade().filter(|_| slot.stamp == stamp) {
        Some(m) => m,
        None => {
            let model = Arc::new(ValenceModel::load(&canonical, device)?);
            *LOADS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(canonical.clone())
                .or_default() += 1;
            *slot = Slot {
                model: Arc::downgrade(&model),
                stamp,
            };
            model
        }
    };
    drop(slot);
    // The previous recent model (if another) is freed here, outside the registry locks.
    let previous = RECENT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .replace(model.clone());
    drop(previous);
    Ok(model)
}

/// Services by (model directory, device, instance id), weakly: a service lives while an element
/// uses it.
type ServiceKey = (PathBuf, String, String);
static SERVICES: Lazy<Mutex<HashMap<ServiceKey, Weak<InferenceService>>>> =
    Lazy::new(Default::default);

/// The inference service for a model on a device, shared by every caller that gives the same
/// `instance` id (by default, "": all users of the model on that device). The first caller's
/// `config` starts it; later callers get the running service whatever they ask for (see
/// [`InferenceService::config`]).
pub fn shared_service(
    dir: &Path,
    device: &Device,
    instance: &str,
    config: BatchConfig,
) -> Result<Arc<InferenceService>> {
    let model = shared_model(dir, device)?;
    let key = (model.dir.clone(), device_name(device), instance.to_string());
    let mut services = SERVICES.lock().unwrap_or_else(|e| e.into_inner());
    services.retain(|_, s| s.strong_count() > 0);
    let backend: Arc<dyn Backend> = model;
    if let Some(s) = services.get(&key).and_then(|s| s.upgrade())
        && s.runs_on(&backend)
    {
        return Ok(s);
    }
    let service = InferenceService::start(backend, config)?;
    services.insert(key, Arc::downgrade(&service));
    Ok(service)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Repeated start/stop cycles reuse the loaded weights; changed files are loaded again.
    #[test]
    fn a_released_model_is_reused_until_its_files_change() {
        let dir = std::env::temp_dir().join(format!("valence-registry-{}", std::process::id()));
        crate::synthetic::write_tiny_model(&dir, 9).unwrap();
        for _ in 0..5 {
            let m = shared_model(&dir, &Device::Cpu).unwrap();
            drop(m); // the last element stops
        }
        assert_eq!(load_count(&dir), 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let manifest = dir.join("valence.json");
        std::fs::write(&manifest, std::fs::read(&manifest).unwrap()).unwrap();
        let _m = shared_model(&dir, &Device::Cpu).unwrap();
        assert_eq!(load_count(&dir), 2, "rewritten files must be loaded again");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
