//! `valence bench`: candle against PyTorch on the same models and inputs, in one run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};

use gstvalence::model::registry;
use gstvalence::model::wav2vec2::Wav2Vec2Model;
use gstvalence::model::whisper::WhisperEncoder;

fn median<F: FnMut() -> Result<()>>(mut f: F, repeats: usize) -> Result<f64> {
    f()?; // warm-up
    let mut ts = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t0 = Instant::now();
        f()?;
        ts.push(t0.elapsed().as_secs_f64());
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[ts.len() / 2])
}

fn torch(python: &str, what: &str, path: &Path) -> Result<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/torch_reference.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(what)
        .arg(path)
        .output()
        .with_context(|| format!("cannot run {python} (a Python with torch and transformers)"))?;
    if !out.status.success() {
        bail!(
            "PyTorch reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.lines().last().unwrap_or(""))
        .context("PyTorch reference printed no JSON")
}

fn noise(n: usize) -> Vec<f32> {
    let mut r = gstvalence::model::synthetic::SeededNormal::new(1);
    (0..n).map(|_| r.sample() * 0.1).collect()
}

/// A mono 32-bit float WAV file (format tag 3).
fn write_wav_f32(path: &Path, samples: &[f32], rate: u32) -> Result<()> {
    let data_len = (samples.len() * 4) as u32;
    let mut b = Vec::with_capacity(44 + data_len as usize);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&3u16.to_le_bytes()); // IEEE float
    b.extend_from_slice(&1u16.to_le_bytes()); // mono
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate * 4).to_le_bytes());
    b.extend_from_slice(&4u16.to_le_bytes());
    b.extend_from_slice(&32u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        b.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(path, b)?;
    Ok(())
}

fn row(name: &str, audio_s: f64, candle: f64, torch: Option<f64>) {
    match torch {
        Some(t) => println!(
            "{name:<34} {audio_s:>4.0} s audio  candle {candle:>7.3} s ({:>6.1}x real time)  PyTorch {t:>7.3} s  candle/PyTorch {:>5.2}",
            audio_s / candle,
            candle / t
        ),
        None => println!(
            "{name:<34} {audio_s:>4.0} s audio  candle {candle:>7.3} s ({:>6.1}x real time)",
            audio_s / candle
        ),
    }
}

pub fn run(python: Option<&str>, what: &str, work: &Path) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    println!("candle threads: {threads}; PyTorch threads: $BENCH_THREADS (default 2)");
    if what == "all" || what == "whisper" {
        let enc_dir = registry::cache_dir().join("encoders/whisper-base");
        let mut enc = WhisperEncoder::load_dir(&enc_dir, DType::F32, &Device::Cpu)
            .context("the Whisper base encoder is needed (run `valence setup`)")?;
        let x = noise(48000);
        let t = median(|| enc.encode(&x).map(|_| ()), 20)?;
        let tr = match python {
            Some(p) => torch(p, "whisper", &enc_dir)?["3s"].as_f64(),
            None => None,
        };
        row("Whisper base encoder (3 s window)", 3.0, t, tr);
        enc.quantize(GgmlDType::Q8_0)?;
        let tq = median(|| enc.encode(&x).map(|_| ()), 20)?;
        row("  same, q8_0 projections", 3.0, tq, tr);
        // The whole default model per window (mel + encoder + pooling + head): what
        // `valence classify` pays for every hop.
        let dir = registry::resolve_model("default")?;
        let m = registry::shared_model(&dir, &Device::Cpu)?;
        let t_model = median(|| m.classify(&x).map(|_| ()), 20)?;
        let upto = m
            .manifest
            .features
            .layers
            .iter()
            .max()
            .copied()
            .unwrap_or(0);
        let tr_model = match python {
            Some(p) => torch(p, &format!("whisper-upto-{upto}"), &enc_dir)?["3s"].as_f64(),
            None => None,
        };
        row(
            &format!("default model (layers ..{upto}, 3 s window)"),
            3.0,
            t_model,
            tr_model,
        );
        println!(
            "default model, one 3 s window: {t_model:.4} s -> at 1 s hop {:.1}x real time",
            1.0 / t_model
        );
        // End to end, as `valence classify` runs: decodebin, resampling, windows, messages.
        std::fs::create_dir_all(work)?;
        let wav = work.join("bench-60s-48k.wav");
        write_wav_f32(&wav, &noise(60 * 48000), 48000)?;
        let opts = super::classify::Options {
            model: "default".into(),
            device: "cpu".into(),
            window_s: 3.0,
            hop_s: 1.0,
            silence_threshold: -60.0,
        };
        let mut windows = 0;
        let t0 = Instant::now();
        super::classify::classify_file(&wav, &opts, |_| windows += 1)?;
        let t = t0.elapsed().as_secs_f64();
        println!(
            "valence classify, 60 s of 48 kHz audio, 3 s window / 1 s hop: {windows} windows in {t:.2} s -> {:.1}x real time",
            60.0 / t
        );
    }
    if what == "all" || what == "xlsr" {
        std::fs::create_dir_all(work)?;
        let Some(p) = python else {
            bail!(
                "the xlsr benchmark needs --python (PyTorch makes the random 315M-parameter checkpoint)"
            );
        };
        // PyTorch saves its random model first; candle then loads those same weights.
        let tr = torch(p, "xlsr", work)?;
        let mut m = Wav2Vec2Model::load_dir(work, DType::F32, &Device::Cpu)?;
        println!("xlsr-53-sized Wav2Vec2: {} parameters", tr["params"]);
        for quantized in [false, true] {
            if quantized {
                m.quantize(GgmlDType::Q8_0)?;
            }
            for secs in [10usize, 3] {
                let x = noise(16000 * secs);
                let t = median(|| m.encode(&x).map(|_| ()), if secs == 10 { 3 } else { 5 })?;
                let name = if quantized {
                    format!("  same, q8_0 projections ({secs} s)")
                } else {
                    format!("xlsr-53-sized Wav2Vec2 ({secs} s)")
                };
                row(&name, secs as f64, t, tr[format!("{secs}s")].as_f64());
            }
        }
    }
    Ok(())
}

pub fn default_work_dir() -> PathBuf {
    registry::cache_dir().join("bench")
}
