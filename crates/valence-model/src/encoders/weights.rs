//! Reading checkpoint files into named tensors, and a `VarBuilder` backend that records which
//! names a model asked for, so loaders can report keys nobody used.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

/// Reads every tensor of a checkpoint onto the CPU.
///
/// `.safetensors` is memory-mapped; `.bin`/`.pt`/`.pth` (PyTorch zip pickles) are read through
/// candle's pickle reader, which interprets data opcodes only and never runs code from the file.
pub fn read_checkpoint(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        bail!("weights file {} does not exist", path.display());
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tensors = match ext {
        "safetensors" => candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("{} is not a readable safetensors file", path.display()))?,
        "bin" | "pt" | "pth" => candle_core::pickle::read_all(path)
            .with_context(|| format!("{} is not a readable PyTorch checkpoint", path.display()))?
            .into_iter()
            .collect(),
        _ => bail!(
            "{}: unknown weights format (expected .safetensors, .bin, .pt or .pth)",
            path.display()
        ),
    };
    if tensors.is_empty() {
        bail!("{} holds no tensors", path.display());
    }
    Ok(tensors)
}

/// Named tensors plus the set of names a model has read so far.
pub struct TensorStore {
    tensors: HashMap<String, Tensor>,
    used: Mutex<HashSet<String>>,
    origin: PathBuf,
}

impl TensorStore {
    pub fn new(tensors: HashMap<String, Tensor>, origin: impl Into<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            tensors,
            used: Mutex::new(HashSet::new()),
            origin: origin.into(),
        })
    }

    pub fn origin(&self) -> &Path {
        &self.origin
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// A `VarBuilder` reading from this store (tensors are converted to `dtype` and moved to
    /// `device` on access).
    pub fn var_builder(self: &Arc<Self>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(TrackedBackend(self.clone())),
            dtype,
            device.clone(),
        )
    }

    /// Fails when the checkpoint holds tensors the model never read, except those matching one of
    /// `ignored` (a name prefix, or a name containing the pattern when it starts with '*').
    pub fn check_all_used(&self, ignored: &[&str]) -> Result<()> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut unknown: Vec<&String> = self
            .tensors
            .keys()
            .filter(|k| !used.contains(*k))
            .filter(|k| {
                !ignored.iter().any(|pat| match pat.strip_prefix('*') {
                    Some(inner) => k.contains(inner),
                    None => k.starts_with(pat),
                })
            })
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort();
        let shown: Vec<&str> = unknown.iter().take(8).map(|s| s.as_str()).collect();
        bail!(
            "{}: {} unknown tensor name(s) the model does not use: {}{}",
            self.origin.display(),
            unknown.len(),
            shown.join(", "),
            if unknown.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        )
    }
}

struct TrackedBackend(Arc<TensorStore>);

impl TrackedBackend {
    fn fetch(&self, name: &str) -> candle_core::Result<&Tensor> {
        let t = self.0.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: tensor `{name}` is missing",
                self.0.origin.display()
            ))
        })?;
        self.0
            .used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        Ok(t)
    }
}

impl SimpleBackend for TrackedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.fetch(name)?;
        if t.shape() != &s {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{name}` has shape {:?}, the config needs {:?}",
                self.0.origin.display(),
                t.dims(),
                s.dims()
            )));
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.tensors.contains_key(name)
    }
}

/// Renames tensors: strips `prefix` where present and maps PyTorch's parametrized weight norm
/// (`parametrizations.weight.original0/1`) onto the classic `weight_g`/`weight_v` names.
pub fn normalize_names(tensors: HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tensors
        .into_iter()
        .map(|(k, v)| {
            let k = k.strip_prefix(prefix).map(str::to_string).unwrap_or(k);
            let k = k
                .replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v");
            (k, v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_reported_and_ignored_patterns_pass() -> Result<()> {
        let mut m = HashMap::new();
        m.insert(
            "a.weight".to_string(),
            Tensor::zeros(2, DType::F32, &Device::Cpu)?,
        );
        m.insert(
            "quantizer.codevectors".to_string(),
            Tensor::zeros(2, DType::F32, &Device::Cpu)?,
        );
        m.insert(
            "stray".to_string(),
            Tensor::zeros(2, DType::F32, &Device::Cpu)?,
        );
        let store = TensorStore::new(m, "test.safetensors");
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        vb.pp("a").get(2, "weight")?;
        let err = store
            .check_all_used(&["quantizer."])
            .unwrap_err()
            .to_string();
        assert!(err.contains("stray"), "{err}");
        assert!(!err.contains("quantizer"), "{err}");
        assert!(vb.get(3, "a.weight").is_err(), "shape mismatch must fail");
        Ok(())
    }

    #[test]
    fn names_are_normalized() {
        let mut m = HashMap::new();
        let t = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        m.insert(
            "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0".to_string(),
            t.clone(),
        );
        m.insert("encoder.layer_norm.weight".to_string(), t);
        let n = normalize_names(m, "wav2vec2.");
        assert!(n.contains_key("encoder.pos_conv_embed.conv.weight_g"));
        assert!(n.contains_key("encoder.layer_norm.weight"));
    }
}
