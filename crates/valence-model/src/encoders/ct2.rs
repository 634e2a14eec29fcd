//! Import of CTranslate2 Whisper models (the faster-whisper `model.bin` format) into an HF-named
//! safetensors encoder directory. Only data is read: a small binary header per variable.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use crate::encoders::whisper::WhisperEncoderConfig;

/// One variable of a CTranslate2 model.
pub struct Ct2Variable {
    pub dims: Vec<usize>,
    pub dtype: DType,
    pub data: Vec<u8>,
}

pub struct Ct2Model {
    pub spec: String,
    pub revision: u32,
    pub variables: HashMap<String, Ct2Variable>,
}

struct Reader<R: Read> {
    inner: R,
}

impl<R: Read> Reader<R> {
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.inner
            .read_exact(&mut v)
            .context("model.bin ends early (truncated file?)")?;
        Ok(v)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u16()? as usize;
        let mut b = self.bytes(n)?;
        if b.last() == Some(&0) {
            b.pop();
        }
        String::from_utf8(b).context("model.bin holds a name that is not UTF-8")
    }
}

fn ct2_dtype(id: u8) -> Result<(DType, usize)> {
    // CTranslate2's DataType enum order.
    Ok(match id {
        0 => (DType::F32, 4),
        1 => (DType::U8, 1), // int8: only flags here; never a weight we use
        2 => (DType::I16, 2),
        3 => (DType::I32, 4),
        4 => (DType::F16, 2),
        5 => (DType::BF16, 2),
        other => bail!("unsupported CTranslate2 data type id {other}"),
    })
}

impl Ct2Model {
    /// Reads `model.bin`, or several parts concatenated in the order given.
    pub fn read(parts: &[&Path]) -> Result<Self> {
        let mut chain: Box<dyn Read> = Box::new(std::io::empty());
        for p in parts.iter().rev() {
            let f =
                std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
            chain = Box::new(std::io::BufReader::new(f).chain(chain));
        }
        let mut r = Reader { inner: chain };
        let version = r.u32()?;
        if !(5..=6).contains(&version) {
            bail!("unsupported CTranslate2 binary version {version} (5 or 6 expected)");
        }
        let spec = r.string()?;
        let revision = r.u32()?;
        let count = r.u32()? as usize;
        let mut variables = HashMap::with_capacity(count);
        for _ in 0..count {
            let name = r.string()?;
            let rank = r.u8()? as usize;
            let dims = (0..rank)
                .map(|_| r.u32().map(|d| d as usize))
                .collect::<Result<Vec<_>>>()?;
            let (dtype, size) = ct2_dtype(r.u8()?)?;
            let n_bytes = r.u32()? as usize;
            if dims.iter().product::<usize>() * size != n_bytes {
                bail!("variable {name}: {n_bytes} bytes do not match shape {dims:?}");
            }
            let data = r.bytes(n_bytes)?;
            variables.insert(name, Ct2Variable { dims, dtype, data });
        }
        Ok(Self {
            spec,
            revision,
            variables,
        })
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let v = self
            .variables
            .get(name)
            .with_context(|| format!("CTranslate2 model has no variable {name}"))?;
        Ok(Tensor::from_raw_buffer(
            &v.data,
            v.dtype,
            &v.dims,
            &Device::Cpu,
        )?)
    }

    /// The Whisper encoder with HF names (`model.encoder.*`), fused QKV split in q, k, v order
    /// (CTranslate2 stores a zero k bias; Whisper's k projection has none, so it is dropped).
    pub fn whisper_encoder(&self) -> Result<(WhisperEncoderConfig, HashMap<String, Tensor>)> {
        if self.spec != "WhisperSpec" {
            bail!("not a Whisper model: spec is {}", self.spec);
        }
        let mut out = HashMap::new();
        let mut put = |hf: &str, t: Tensor| {
            out.insert(format!("model.encoder.{hf}"), t);
        };
        for c in ["conv1", "conv2"] {
            put(
                &format!("{c}.weight"),
                self.tensor(&format!("encoder/{c}/weight"))?,
            );
            put(
                &format!("{c}.bias"),
                self.tensor(&format!("encoder/{c}/bias"))?,
            );
        }
        let positions = self.tensor("encoder/position_encodings/encodings")?;
        let (max_pos, d) = positions.dims2()?;
        put("embed_positions.weight", positions);
        put(
            "layer_norm.weight",
            self.tensor("encoder/layer_norm/gamma")?,
        );
        put("layer_norm.bias", self.tensor("encoder/layer_norm/beta")?);
        let n_layers = (0..)
            .take_while(|i| {
                self.variables
                    .contains_key(&format!("encoder/layer_{i}/ffn/linear_0/weight"))
            })
            .count();
        if n_layers == 0 {
            bail!("the CTranslate2 model holds no encoder layers (a truncated package?)");
        }
        let mut ffn = 0;
        for i in 0..n_layers {
            let p = format!("encoder/layer_{i}");
            let l = format!("layers.{i}");
            let qkv_w = self.tensor(&format!("{p}/self_attention/linear_0/weight"))?;
            let qkv_b = self.tensor(&format!("{p}/self_attention/linear_0/bias"))?;
            if qkv_w.dims() != [3 * d, d] {
                bail!("{p}: fused QKV weight has shape {:?}", qkv_w.dims());
            }
            for (j, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                put(
                    &format!("{l}.self_attn.{name}.weight"),
                    qkv_w.narrow(0, j * d, d)?,
                );
                if *name != "k_proj" {
                    put(
                        &format!("{l}.self_attn.{name}.bias"),
                        qkv_b.narrow(0, j * d, d)?,
                    );
                }
            }
            let pairs = [
                ("self_attention/linear_1", "self_attn.out_proj"),
                ("ffn/linear_0", "fc1"),
                ("ffn/linear_1", "fc2"),
            ];
            for (ct, hf) in pairs {
                put(
                    &format!("{l}.{hf}.weight"),
                    self.tensor(&format!("{p}/{ct}/weight"))?,
                );
                put(
                    &format!("{l}.{hf}.bias"),
                    self.tensor(&format!("{p}/{ct}/bias"))?,
                );
            }
            for (ct, hf) in [
                ("self_attention/layer_norm", "self_attn_layer_norm"),
                ("ffn/layer_norm", "final_layer_norm"),
            ] {
                put(
                    &format!("{l}.{hf}.weight"),
                    self.tensor(&format!("{p}/{ct}/gamma"))?,
                );
                put(
                    &format!("{l}.{hf}.bias"),
                    self.tensor(&format!("{p}/{ct}/beta"))?,
                );
            }
            ffn = self.variables[&format!("{p}/ffn/linear_0/weight")].dims[0];
        }
        let heads = match self.variables.get("encoder/num_heads") {
            Some(v) if v.data.len() >= 2 => i16::from_le_bytes([v.data[0], v.data[1]]) as usize,
            _ => d / 64, // Whisper's head width is 64 in every size
        };
        let mels = self.variables["encoder/conv1/weight"].dims[1];
        let config = WhisperEncoderConfig {
            num_mel_bins: mels,
            d_model: d,
            encoder_layers: n_layers,
            encoder_attention_heads: heads,
            encoder_ffn_dim: ffn,
            max_source_positions: max_pos,
            activation_function: "gelu".into(),
        };
        Ok((config, out))
    }
}

/// Writes an HF-style Whisper encoder directory: `config.json`, `model.safetensors`,
/// `preprocessor_config.json`.
pub fn write_whisper_encoder_dir(
    dir: &Path,
    config: &WhisperEncoderConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cfg = serde_json::to_value(config)?;
    cfg["model_type"] = "whisper".into();
    cfg["architectures"] = serde_json::json!(["WhisperEncoder"]);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let pre = serde_json::json!({
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": config.num_mel_bins,
        "sampling_rate": 16000,
        "hop_length": 160,
        "n_fft": 400,
        "padding_value": 0.0,
        "note": "valence computes features on the real audio length, never padded to 30 s"
    });
    std::fs::write(
        dir.join("preprocessor_config.json"),
        serde_json::to_string_pretty(&pre)?,
    )?;
    let tmp = dir.join("model.safetensors.partial");
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::rename(&tmp, dir.join("model.safetensors"))?;
    Ok(())
}
