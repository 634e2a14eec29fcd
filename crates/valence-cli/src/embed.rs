//! `valence embed`: every hidden state of an encoder for one file, as safetensors.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use valence_model::{Encoder, ValenceModel, manifest::MANIFEST_FILE};

pub fn run(model: &Path, input: &Path, output: &Path, device: &Device) -> Result<()> {
    let samples = valence_train::decode::decode_to_16k_mono(input)?;
    let mut tensors = HashMap::new();
    let out = if model.join(MANIFEST_FILE).is_file() {
        let m = ValenceModel::load(model, device)?;
        let out = m.encoder.encode(&samples)?;
        let pooled = m.pooled_features(&out, &samples)?;
        tensors.insert(
            "pooled".to_string(),
            pooled.squeeze(0)?.to_device(&Device::Cpu)?,
        );
        out
    } else {
        Encoder::load_dir(model, None, DType::F32, device)
            .with_context(|| {
                format!(
                    "{} is neither a valence model nor an HF encoder",
                    model.display()
                )
            })?
            .encode(&samples)?
    };
    let hs: Vec<Tensor> = out
        .hidden_states
        .iter()
        .map(|t| t.squeeze(0)?.to_dtype(DType::F32)?.to_device(&Device::Cpu))
        .collect::<candle_core::Result<_>>()?;
    tensors.insert("hidden_states".to_string(), Tensor::stack(&hs, 0)?);
    tensors.insert(
        "last_hidden_state".to_string(),
        out.last_hidden_state
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?,
    );
    candle_core::safetensors::save(&tensors, output)?;
    eprintln!(
        "{}: {} hidden states of {:?} written to {}",
        input.display(),
        hs.len(),
        hs[0].dims(),
        output.display()
    );
    Ok(())
}
