//! The speech detector on real audio: Silero VAD in candle against Silero's own ONNX model in
//! ONNX Runtime, streamed chunk by chunk with the state carried (speech probabilities within
//! 1e-4), and the element gating a real pipeline of speech, then music, then speech.
//!
//! Needs `valence setup` (the detector in the cache and its wheel), `VALENCE_TEST_PYTHON` (a
//! Python with onnxruntime; `scripts/test.sh` makes one) for the parity test, and
//! `../shared/data` for the real clips; each test says what it skips without them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixtures, read_wav_i16, shared_data};
use gst::prelude::*;
use valence_model::speech::{self, SpeechStream};

fn detector_file() -> Option<PathBuf> {
    let p = speech::default_detector_path();
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("SKIPPED: the speech detector is not installed (run `valence setup`)");
        None
    }
}

fn wheel() -> Option<PathBuf> {
    let p = valence_model::serving::registry::cache_dir()
        .join("wheels/silero_vad-6.2.3-py3-none-any.whl");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("SKIPPED: the silero-vad wheel is not in the cache (run `valence setup`)");
        None
    }
}

fn onnx_probabilities(python: &str, wheel: &Path, samples: &[f32]) -> Vec<f32> {
    let dir = std::env::temp_dir().join(format!("valence-silero-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, dst) = (dir.join("in.f32"), dir.join("out.f32"));
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    std::fs::write(&src, bytes).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/silero_onnx.py");
    let status = Command::new(python)
        .arg(&script)
        .arg(wheel)
        .arg(&src)
        .arg(&dst)
        .status()
        .expect("python runs");
    assert!(status.success(), "{} failed", script.display());
    let out = std::fs::read(&dst).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn silero_in_candle_matches_onnx_runtime_streamed() {
    let (Some(file), Some(wheel)) = (detector_file(), wheel()) else {
        return;
    };
    let Ok(python) = std::env::var("VALENCE_TEST_PYTHON") else {
        eprintln!("SKIPPED: VALENCE_TEST_PYTHON (a Python with onnxruntime) is not set");
        return;
    };
    let detector = speech::shared_detector(&file).unwrap();
    let mut clips = vec![(
        "speech-like fixture".to_string(),
        read_wav_i16(&fixtures().join("speechlike.wav")),
    )];
    if let Some(data) = shared_data() {
        for c in [
            "nonspeech/music_001.flac",
            "nonspeech/noise_001.flac",
            "ravdess/Actor_01/03-01-05-01-01-01-01.flac",
            "emodb/03/03a01Fa.flac",
        ] {
            let p = data.join(c);
            if p.is_file() {
                let audio = valence_train::decode::decode_to_16k_mono(&p).unwrap();
                clips.push((c.to_string(), audio));
            }
        }
    }
    let mut speech_frames = 0;
    for (name, audio) in clips {
        let want = onnx_probabilities(&python, &wheel, &audio);
        // Pushed in odd pieces, as buffers arrive.
        let stream = SpeechStream::new(detector.clone());
        for piece in audio.chunks(1234) {
            stream.push(piece);
        }
        let got = stream.probabilities();
        assert_eq!(got.len(), want.len(), "{name}");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{name}: {} frames, largest difference {worst:.2e}",
            got.len()
        );
        assert!(worst <= 1e-4, "{name}: {worst}");
        speech_frames += want.iter().filter(|&&p| p >= 0.5).count();
    }
    assert!(
        speech_frames > 0,
        "the clips hold speech the reference hears"
    );
}

fn write_wav(path: &Path, samples: &[f32]) {
    let data: Vec<u8> = samples
        .iter()
        .flat_map(|s| ((s.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes())
        .collect();
    let mut b = Vec::with_capacity(44 + data.len());
    b.extend(b"RIFF");
    b.extend((36 + data.len() as u32).to_le_bytes());
    b.extend(b"WAVEfmt ");
    b.extend(16u32.to_le_bytes());
    b.extend(1u16.to_le_bytes()); // PCM
    b.extend(1u16.to_le_bytes()); // mono
    b.extend(16_000u32.to_le_bytes());
    b.extend(32_000u32.to_le_bytes());
    b.extend(2u16.to_le_bytes());
    b.extend(16u16.to_le_bytes());
    b.extend(b"data");
    b.extend((data.len() as u32).to_le_bytes());
    b.extend(data);
    std::fs::write(path, b).unwrap();
}

/// Speech (EmoDB sentences), then 10 s of orchestral music, then speech again, through
/// `filesrc ! decodebin ! audioconvert ! audioresample ! valenceclassify` with the default
/// model: the windows inside the music say `no-speech`, those inside the speech a valence.
#[test]
fn speech_then_music_then_speech_through_a_real_pipeline() {
    let (Some(_), Some(data)) = (detector_file(), shared_data()) else {
        return;
    };
    let model = valence_model::serving::registry::cache_dir().join("models/default");
    if !model.join("valence.json").is_file() {
        eprintln!("SKIPPED: the default model is not installed (run `valence setup`)");
        return;
    }
    let clips = valence_train::dataset::read_manifest(&data.join("manifest.csv")).unwrap();
    let emodb: Vec<_> = clips.iter().filter(|c| c.corpus == "emodb").collect();
    let speech = |from: usize| -> Vec<f32> {
        let mut out = Vec::new();
        for c in emodb.iter().skip(from) {
            out.extend(valence_train::decode::decode_to_16k_mono(&data.join(&c.path)).unwrap());
            if out.len() >= 8 * 16_000 {
                break;
            }
        }
        out
    };
    let (a, b) = (speech(0), speech(40));
    let music =
        valence_train::decode::decode_to_16k_mono(&data.join("nonspeech/music_001.flac")).unwrap();
    let spans = [
        (0.0, a.len() as f64 / 16e3),
        (a.len() as f64 / 16e3, (a.len() + music.len()) as f64 / 16e3),
        (
            (a.len() + music.len()) as f64 / 16e3,
            (a.len() + music.len() + b.len()) as f64 / 16e3,
        ),
    ];
    let dir = std::env::temp_dir().join(format!("valence-speech-music-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let wav = dir.join("speech-music-speech.wav");
    write_wav(&wav, &[a, music, b].concat());

    gst::init().unwrap();
    gstvalence::plugin_register_static().unwrap();
    let pipeline = gst::parse::launch(&format!(
        "filesrc location={} ! decodebin ! audioconvert ! audioresample ! \
         valenceclassify model={} device=cpu ! fakesink",
        wav.display(),
        model.display()
    ))
    .unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let mut windows = Vec::new();
    for msg in bus.iter_timed(gst::ClockTime::from_seconds(120)) {
        match msg.view() {
            gst::MessageView::Element(e) => {
                if let Some(s) = e.structure().filter(|s| s.name() == "valence") {
                    let t = s.get::<u64>("timestamp").unwrap() as f64 / 1e9;
                    let d = s.get::<u64>("duration").unwrap() as f64 / 1e9;
                    let label = s.get::<String>("label").unwrap();
                    let speech = s.get::<f64>("speech").unwrap();
                    assert_eq!(s.has_field("negative"), label != "no-speech", "{s}");
                    windows.push((t, t + d, label, speech));
                }
            }
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(e) => panic!("{} {:?}", e.error(), e.debug()),
            _ => {}
        }
    }
    pipeline.set_state(gst::State::Null).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let inside = |(s, e): (f64, f64)| {
        windows
            .iter()
            .filter(move |w| w.0 >= s - 1e-6 && w.1 <= e + 1e-6)
            .collect::<Vec<_>>()
    };
    let music_windows = inside(spans[1]);
    let speech_windows: Vec<_> = inside(spans[0])
        .into_iter()
        .chain(inside(spans[2]))
        .collect();
    eprintln!(
        "music windows: {:?}\nspeech windows: {:?}",
        music_windows
            .iter()
            .map(|w| (&w.2, w.3))
            .collect::<Vec<_>>(),
        speech_windows
            .iter()
            .map(|w| (&w.2, w.3))
            .collect::<Vec<_>>()
    );
    assert!(music_windows.len() >= 7, "{windows:?}");
    assert!(speech_windows.len() >= 10, "{windows:?}");
    assert!(
        music_windows.iter().all(|w| w.2 == "no-speech"),
        "music gets no valence"
    );
    assert!(
        speech_windows
            .iter()
            .all(|w| ["negative", "neutral", "positive"].contains(&w.2.as_str())),
        "speech gets a valence"
    );
}
