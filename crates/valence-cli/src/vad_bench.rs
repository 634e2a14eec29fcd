//! `valence bench --what vad`: how the speech gate treats the shared data, and what it costs.
//!
//! Every clip of `DATA/manifest.csv` (speech) and `DATA/nonspeech/manifest.csv` (music and
//! everyday sound) is cut into the element's windows (3 s at a 1 s hop, silent ones left out)
//! and each window's speech share is computed as the element computes it. Printed: for each
//! candidate `min-speech`, the share of music and of everyday-sound windows reported as
//! `no-speech` and the share of speech windows still classified (all, and the worst corpus);
//! speech mixed with music at a few signal-to-noise ratios; how the frames `voiced_mean` pools
//! agree with the frames the detector calls speech; and the detector's CPU time per second of
//! audio beside the default model's per window, in the same run.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Device;

use valence_model::speech::SileroVad;
use valence_train::dataset::{self, WINDOW_SILENCE_DBFS};
use valence_train::decode::decode_to_16k_mono;

const CANDIDATES: [f32; 7] = [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5];

#[derive(serde::Deserialize)]
struct NonSpeech {
    path: String,
    kind: String,
}

/// One detector pass over a clip: the speech share of each of the element's windows (silent
/// ones left out), and its encoder frames (20 ms, Whisper's) counted by whether `voiced_mean`
/// pools them and whether the detector calls them speech: [both, voiced only, speech only,
/// neither].
fn windows_and_frames(
    audio: &[f32],
    detector: &std::sync::Arc<SileroVad>,
    threshold: f32,
) -> (Vec<f32>, [usize; 4]) {
    const ENC: usize = 320;
    let stream = valence_model::speech::SpeechStream::new(detector.clone());
    stream.push(audio);
    let probs = stream.probabilities();
    let mut w = valence_model::audio::Windower::new(48_000, 16_000);
    let mut windows = w.push(audio);
    windows.extend(w.finish(16_000));
    let (mut shares, mut counts) = (Vec::new(), [0usize; 4]);
    for w in windows {
        if valence_model::audio::rms_dbfs(&w.samples) < WINDOW_SILENCE_DBFS {
            continue;
        }
        shares.extend(stream.speech_share(w.start, w.samples.len(), threshold));
        let frames = w.samples.len() / ENC;
        let voiced = valence_model::manifest::voiced_frame_mask(&w.samples, frames);
        for (i, v) in voiced.iter().enumerate() {
            let centre = w.start as usize + i * ENC + ENC / 2;
            let Some(&p) = probs.get(centre / valence_model::speech::FRAME) else {
                continue;
            };
            counts[match (*v, p >= threshold) {
                (true, true) => 0,
                (true, false) => 1,
                (false, true) => 2,
                (false, false) => 3,
            }] += 1;
        }
    }
    (shares, counts)
}

fn pct(n: usize, of: usize) -> f64 {
    100.0 * n as f64 / of.max(1) as f64
}

/// One non-live stream of `audio` (16 kHz, 20 ms buffers) through `appsrc ! valenceclassify
/// ! fakesink`: the process's CPU ms per second of audio.
fn one_stream_cpu(model: &Path, audio: &[f32], vad: bool) -> Result<f64> {
    use gst::prelude::*;
    let desc = format!(
        "appsrc name=src format=time caps=audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved \
         ! valenceclassify model=\"{}\" vad={vad} min-speech=0 ! fakesink sync=false",
        model.display()
    );
    let p = gst::parse::launch(&desc)?
        .downcast::<gst::Pipeline>()
        .map_err(|_| anyhow::anyhow!("not a pipeline"))?;
    let src = p
        .by_name("src")
        .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
        .context("no appsrc")?;
    // The model loads before the clock starts.
    p.set_state(gst::State::Paused)?;
    let _ = p.state(gst::ClockTime::from_seconds(60));
    p.set_state(gst::State::Playing)?;
    let cpu0 = crate::streams::cpu_seconds();
    for (i, chunk) in audio.chunks(320).enumerate() {
        let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut buf = gst::Buffer::from_mut_slice(bytes);
        if let Some(b) = buf.get_mut() {
            b.set_pts(gst::ClockTime::from_useconds(i as u64 * 20_000));
            b.set_duration(gst::ClockTime::from_useconds(20_000));
        }
        src.push_buffer(buf)
            .map_err(|e| anyhow::anyhow!("push: {e:?}"))?;
    }
    src.end_of_stream()
        .map_err(|e| anyhow::anyhow!("eos: {e:?}"))?;
    let bus = p.bus().context("no bus")?;
    let msg = bus.timed_pop_filtered(
        gst::ClockTime::from_seconds(300),
        &[gst::MessageType::Eos, gst::MessageType::Error],
    );
    let cpu = crate::streams::cpu_seconds() - cpu0;
    let _ = p.set_state(gst::State::Null);
    match msg {
        Some(m) if m.type_() == gst::MessageType::Eos => {}
        m => bail!("the stream did not end: {m:?}"),
    }
    Ok(cpu * 1e3 / (audio.len() as f64 / 16_000.0))
}

/// [`one_stream_cpu`] with and without the detector, alternating, medians of 5.
fn stream_cpu(model: &Path, audio: &[f32]) -> Result<(f64, f64)> {
    let (mut on, mut off) = (Vec::new(), Vec::new());
    one_stream_cpu(model, audio, true)?; // warm: the model, the service, the caches
    for _ in 0..5 {
        on.push(one_stream_cpu(model, audio, true)?);
        off.push(one_stream_cpu(model, audio, false)?);
    }
    on.sort_by(f64::total_cmp);
    off.sort_by(f64::total_cmp);
    Ok((on[2], off[2]))
}

/// Silero's ONNX model in ONNX Runtime, streamed as its own wrapper does
/// (`bench/silero_reference.py`): CPU ms per second of audio.
fn onnx_runtime_reference(python: &str) -> Result<f64> {
    let wheel = valence_model::serving::registry::cache_dir()
        .join("wheels/silero_vad-6.2.3-py3-none-any.whl");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/silero_reference.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(&wheel)
        .output()
        .with_context(|| format!("cannot run {python}"))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("the reference printed no figure")
}

pub fn run(data: &Path, model: &str, threshold: f32, python: Option<&str>) -> Result<()> {
    let dir = valence_model::serving::registry::resolve_model(model)?;
    let m = valence_model::serving::registry::shared_model(&dir, &Device::Cpu)?;
    let Some(detector) = m.speech_detector.clone() else {
        bail!("model {} names no speech detector", dir.display());
    };
    println!(
        "CPU features: {}; speech threshold {threshold}",
        valence_model::serving::runtime::CpuFeatures::detect().describe()
    );
    let ns_manifest = data.join("nonspeech/manifest.csv");
    let mut r = csv::Reader::from_path(&ns_manifest)
        .with_context(|| format!("cannot read {}", ns_manifest.display()))?;
    let mut by_kind: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut music = Vec::new();
    for row in r.deserialize::<NonSpeech>() {
        let row = row?;
        let audio = decode_to_16k_mono(&data.join(&row.path))?;
        by_kind
            .entry(row.kind.clone())
            .or_default()
            .extend(windows_and_frames(&audio, &detector, threshold).0);
        if row.kind == "music" {
            music.push(audio);
        }
    }
    let clips = dataset::read_manifest(&data.join("manifest.csv"))?;
    let mut by_corpus: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut agreement = [0usize; 4];
    let mut speech_audio = Vec::new();
    let bar = indicatif::ProgressBar::new(clips.len() as u64);
    for c in &clips {
        let audio = decode_to_16k_mono(&data.join(&c.path))?;
        let (shares, frames) = windows_and_frames(&audio, &detector, threshold);
        by_corpus
            .entry(c.corpus.clone())
            .or_default()
            .extend(shares);
        for (a, b) in agreement.iter_mut().zip(frames) {
            *a += b;
        }
        if speech_audio.len() < 16_000 * 120 {
            speech_audio.extend_from_slice(&audio);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let all_speech: Vec<f32> = by_corpus.values().flatten().copied().collect();

    println!(
        "\nwindows: {} speech ({} corpora), {}",
        all_speech.len(),
        by_corpus.len(),
        by_kind
            .iter()
            .map(|(k, v)| format!("{} {k}", v.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    print!("{:>10}", "min-speech");
    for k in by_kind.keys() {
        print!(" {:>16}", format!("{k}: no-speech"));
    }
    println!(" {:>18} {:>26}", "speech: classified", "lowest corpus");
    for &min in &CANDIDATES {
        print!("{min:>10.2}");
        for v in by_kind.values() {
            print!(
                " {:>15.1}%",
                pct(v.iter().filter(|&&s| s < min).count(), v.len())
            );
        }
        let kept = |v: &Vec<f32>| pct(v.iter().filter(|&&s| s >= min).count(), v.len());
        let (worst, w) =
            by_corpus
                .iter()
                .map(|(c, v)| (c, kept(v)))
                .fold(
                    (None, f64::MAX),
                    |a, (c, k)| if k < a.1 { (Some(c), k) } else { a },
                );
        println!(
            " {:>17.1}% {:>26}",
            kept(&all_speech),
            format!("{} {w:.1}%", worst.map(String::as_str).unwrap_or("-"))
        );
    }

    // Speech under music: the first two minutes of shared speech over music clips, looped.
    println!("\nspeech mixed with music (windows classified at each min-speech):");
    print!("{:>10}", "SNR");
    for &min in &CANDIDATES {
        print!(" {min:>6.2}");
    }
    println!();
    let bed: Vec<f32> = music.iter().flatten().copied().collect();
    let rms = |x: &[f32]| (x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32).sqrt();
    let level = rms(&speech_audio) / rms(&bed).max(1e-9);
    for snr_db in [20.0f32, 10.0, 0.0, -5.0] {
        let gain = level / 10f32.powf(snr_db / 20.0);
        let mixed: Vec<f32> = speech_audio
            .iter()
            .enumerate()
            .map(|(i, s)| s + gain * bed[i % bed.len()])
            .collect();
        let v = windows_and_frames(&mixed, &detector, threshold).0;
        print!("{:>7} dB", snr_db);
        for &min in &CANDIDATES {
            print!(
                " {:>5.1}%",
                pct(v.iter().filter(|&&s| s >= min).count(), v.len())
            );
        }
        println!();
    }

    let [both, voiced_only, speech_only, neither] = agreement;
    println!(
        "\nencoder frames of speech windows: {} pooled by voiced_mean, {} called speech; \
         {:.1} % of the pooled frames are speech, {:.1} % of the speech frames are pooled, \
         {:.1} % of frames agree",
        both + voiced_only,
        both + speech_only,
        pct(both, both + voiced_only),
        pct(both, both + speech_only),
        pct(both + neither, both + voiced_only + speech_only + neither)
    );

    // Cost: the detector over 60 s of speech in 1 s blocks (as a stream's windows come),
    // against the default model on one 3 s window, alternating, medians of 5.
    let minute = &speech_audio[..speech_audio.len().min(60 * 16_000)];
    let window = &speech_audio[..3 * 16_000];
    let (mut vad, mut model) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let s = valence_model::speech::SpeechStream::new(detector.clone());
        for block in minute.chunks(16_000) {
            s.push(block);
            s.speech_share(0, 0, threshold);
        }
        vad.push(t.elapsed().as_secs_f64() * 1e3 / (minute.len() as f64 / 16_000.0));
        let t = Instant::now();
        m.classify(window)?;
        model.push(t.elapsed().as_secs_f64() * 1e3);
    }
    vad.sort_by(f64::total_cmp);
    model.sort_by(f64::total_cmp);
    let (v, w) = (vad[2], model[2]);
    println!(
        "\ncost: detector {v:.2} ms per second of audio; default model {w:.1} ms per 3 s window; \
         at a 1 s hop the detector adds {:.1} % to a classified stream's model time",
        100.0 * v / w
    );
    let (on, off) = stream_cpu(&dir, minute)?;
    println!(
        "cost through the element: one stream of this minute of speech (16 kHz, 20 ms buffers, \
         every window to the model), process CPU per second of audio, alternating, medians of 5: \
         {on:.2} ms with the detector, {off:.2} ms without: the detector adds {:.1} % to the \
         stream's CPU time",
        100.0 * (on - off) / off
    );
    if let Some(py) = python {
        let r = onnx_runtime_reference(py)?;
        println!(
            "reference: Silero's ONNX model in ONNX Runtime, one thread, 512 samples per call as \
             its own wrapper streams: {r:.2} ms per second of audio; candle / ONNX Runtime {:.2}",
            v / r
        );
    }
    Ok(())
}
