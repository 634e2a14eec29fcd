//! Seeded stream fuzzing: `appsrc ! valenceclassify ! appsink`, live and not, fed hostile
//! streams: NaN/Inf/huge/denormal samples, empty and odd-sized buffers, missing, backwards and
//! jumping PTS, timestamps that drift from the sample count (up to 8 % fast or slow) with
//! jitter (up to ±15 ms), DISCONT flags, GAP events, caps changes (format, rate, channels), flush storms
//! from another thread, EOS in the middle of a window. Every case must reach EOS without a
//! panic or a hang, and without a flush every byte of audio must come out unchanged.
//!
//! CI runs `VALENCE_STREAM_FUZZ_CASES` cases (default 60, under a minute); many more are a
//! command: `VALENCE_STREAM_FUZZ_CASES=5000 cargo test --release --test stream_fuzz`. A failure
//! names its seed; `VALENCE_STREAM_FUZZ_SEED=N` reruns from that seed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use gst::prelude::*;
use valence_model::rng::SeededNormal;

static INIT: Once = Once::new();

fn model_dir() -> PathBuf {
    static DIR: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut d = DIR.lock().unwrap();
    d.get_or_insert_with(|| {
        let dir = std::env::temp_dir().join(format!("valence-stream-fuzz-{}", std::process::id()));
        valence_model::synthetic::write_tiny_model(&dir, 13).unwrap();
        dir
    })
    .clone()
}

struct Rng(SeededNormal);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        ((self.0.uniform() * n as f64) as usize).min(n.saturating_sub(1))
    }
    fn chance(&mut self, p: f64) -> bool {
        self.0.uniform() < p
    }
}

#[derive(Debug, Clone, Copy)]
struct Format {
    s16: bool,
    rate: u32,
    channels: usize,
}

impl Format {
    fn random(rng: &mut Rng) -> Self {
        Self {
            s16: rng.chance(0.4),
            rate: [8000, 11025, 16000, 22050, 44100, 48000, 96000][rng.below(7)],
            channels: 1 + rng.below(3),
        }
    }
    fn caps(&self) -> gst::Caps {
        gst_audio::AudioCapsBuilder::new_interleaved()
            .format(if self.s16 {
                gst_audio::AudioFormat::S16le
            } else {
                gst_audio::AudioFormat::F32le
            })
            .rate(self.rate as i32)
            .channels(self.channels as i32)
            // More than two channels need positions to be valid caps at all.
            .fallback_channel_mask()
            .build()
    }
    fn bpf(&self) -> usize {
        self.channels * if self.s16 { 2 } else { 4 }
    }
}

/// Samples of one buffer: mostly speech-like, sometimes hostile values.
fn samples(rng: &mut Rng, n: usize, offset: usize) -> Vec<f32> {
    let kind = rng.below(10);
    (0..n)
        .map(|i| {
            let t = (offset + i) as f32 / 16000.0;
            let v = (t * 2.0 * std::f32::consts::PI * 180.0).sin() * 0.3;
            match kind {
                0 => f32::NAN,
                1 => {
                    if i % 2 == 0 {
                        f32::INFINITY
                    } else {
                        f32::NEG_INFINITY
                    }
                }
                2 => {
                    if i % 3 == 0 {
                        3.0e38
                    } else {
                        -1.0e38
                    }
                }
                3 => 1.0e-40 * (i % 5) as f32, // denormals
                4 => 0.0,
                5 if i % 17 == 0 => f32::NAN,
                _ => v,
            }
        })
        .collect()
}

fn encode(s: &[f32], fmt: Format) -> Vec<u8> {
    if fmt.s16 {
        s.iter()
            .flat_map(|v| ((v.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes())
            .collect()
    } else {
        s.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

/// What a case did, for the failure report.
struct Outcome {
    reached_eos: bool,
    error: Option<String>,
    bytes_in: usize,
    bytes_out: usize,
    flushed: bool,
}

fn run_case(seed: u64, live: bool) -> Outcome {
    let mut rng = Rng(SeededNormal::new(seed));
    let pipeline = gst::Pipeline::new();
    let mut fmt = Format::random(&mut rng);
    let src = gst_app::AppSrc::builder()
        .caps(&fmt.caps())
        .format(gst::Format::Time)
        .is_live(live)
        .build();
    let window_ns = [500_000_000u64, 1_000_000_000, 3_000_000_000][rng.below(3)];
    let el = gst::ElementFactory::make("valenceclassify")
        .property("model", model_dir().to_string_lossy().as_ref())
        .property("device", "cpu")
        .property("window", window_ns)
        .property("hop", window_ns / (1 + rng.below(3) as u64))
        .build()
        .unwrap();
    let sink = gst_app::AppSink::builder().sync(false).build();
    pipeline
        .add_many([src.upcast_ref(), &el, sink.upcast_ref()])
        .unwrap();
    gst::Element::link_many([src.upcast_ref(), &el, sink.upcast_ref()]).unwrap();
    let bytes_out = Arc::new(Mutex::new(0usize));
    let counter = bytes_out.clone();
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                if let Some(b) = sample.buffer() {
                    *counter.lock().unwrap() += b.size();
                }
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    pipeline.set_state(gst::State::Playing).unwrap();

    let mut bytes_in = 0;
    let mut flushed = false;
    let mut pts_ns: u64 = 0;
    let mut offset = 0;
    let steps = 10 + rng.below(50);
    let storm_case = rng.chance(0.3);
    // Timestamps of a sender whose clock runs fast or slow, with jitter: (drift, jitter ns).
    let drift = [1.0, 1.0, 0.92, 1.08, 0.97][rng.below(5)];
    let jitter_ns = [0u64, 5_000_000, 15_000_000][rng.below(3)];
    let mut drifted_ns: f64 = 0.0;
    std::thread::scope(|scope| {
        for _ in 0..steps {
            match rng.below(20) {
                // A caps change: format, rate and/or channels.
                0 => {
                    fmt = Format::random(&mut rng);
                    src.set_caps(Some(&fmt.caps()));
                }
                // A GAP event in the stream.
                1 => {
                    let gap = gst::event::Gap::builder(gst::ClockTime::from_nseconds(pts_ns))
                        .duration(gst::ClockTime::from_mseconds(300))
                        .build();
                    let _ = src.send_event(gap);
                    pts_ns += 300_000_000;
                }
                // A flush storm from another thread, while buffers keep coming.
                2 if storm_case => {
                    // Sent to the element's sink pad: appsrc itself can deadlock on flushes
                    // sent to it while its task waits for data (basesrc's locks), which is not
                    // what this fuzzes. appsrc stops pushing after the element answers
                    // FLUSHING, so such a case only has to stop cleanly.
                    flushed = true;
                    let pad = el.static_pad("sink").unwrap();
                    let storms = 1 + rng.below(4);
                    scope.spawn(move || {
                        for _ in 0..storms {
                            pad.send_event(gst::event::FlushStart::new());
                            std::thread::sleep(Duration::from_millis(2));
                            pad.send_event(gst::event::FlushStop::new(false));
                        }
                    });
                }
                _ => {
                    let frames = match rng.below(6) {
                        0 => 0,
                        1 => 1 + rng.below(7),
                        _ => rng.below(fmt.rate as usize / 2),
                    };
                    let s = samples(&mut rng, frames * fmt.channels, offset);
                    offset += frames;
                    let mut data = encode(&s, fmt);
                    if rng.chance(0.05) {
                        // A few stray bytes: not a whole frame.
                        data.extend((0..1 + rng.below(fmt.bpf() - 1)).map(|_| 0x7f));
                    }
                    bytes_in += data.len();
                    let dur = frames as u64 * 1_000_000_000 / fmt.rate as u64;
                    let mut buf = gst::Buffer::from_mut_slice(data);
                    {
                        let b = buf.get_mut().unwrap();
                        let jitter = rng.below(2 * jitter_ns as usize + 1) as u64;
                        let stamped = (pts_ns as f64 + drifted_ns) as u64 + jitter;
                        let stamped = stamped.saturating_sub(jitter_ns);
                        match rng.below(10) {
                            0 => {} // no PTS
                            1 => b.set_pts(gst::ClockTime::from_nseconds(
                                stamped.saturating_sub(2_000_000_000),
                            )),
                            2 => {
                                pts_ns += 5_000_000_000; // a jump forward
                                b.set_pts(gst::ClockTime::from_nseconds(pts_ns));
                            }
                            _ => b.set_pts(gst::ClockTime::from_nseconds(stamped)),
                        }
                        b.set_duration(gst::ClockTime::from_nseconds(dur));
                        if rng.chance(0.05) {
                            b.set_flags(gst::BufferFlags::DISCONT);
                        }
                    }
                    pts_ns += dur;
                    drifted_ns += dur as f64 * (drift - 1.0);
                    let _ = src.push_buffer(buf);
                }
            }
        }
    });
    // EOS wherever the stream is, mid-window included.
    let _ = src.end_of_stream();
    let bus = pipeline.bus().unwrap();
    let mut outcome = Outcome {
        reached_eos: false,
        error: None,
        bytes_in,
        bytes_out: 0,
        flushed,
    };
    // A flush makes appsrc stop when its push meets FLUSHING (appsrc's business); then the
    // element must still pass an EOS sent straight to it after the storm.
    let wait = gst::ClockTime::from_seconds(if flushed { 1 } else { 60 });
    let mut ended = bus.timed_pop_filtered(wait, &[gst::MessageType::Eos, gst::MessageType::Error]);
    if ended.is_none() && flushed {
        el.static_pad("sink")
            .unwrap()
            .send_event(gst::event::Eos::new());
        ended = bus.timed_pop_filtered(
            gst::ClockTime::from_seconds(60),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        );
    }
    if let Some(m) = ended {
        match m.view() {
            gst::MessageView::Eos(_) => outcome.reached_eos = true,
            gst::MessageView::Error(e) => {
                outcome.error = Some(format!("{} ({:?})", e.error(), e.debug()))
            }
            _ => {}
        }
    }
    // Panics inside the element would also show as errors posted before EOS.
    while let Some(m) = bus.pop_filtered(&[gst::MessageType::Error, gst::MessageType::Warning]) {
        let text = match m.view() {
            gst::MessageView::Error(e) => format!("{} {:?}", e.error(), e.debug()),
            gst::MessageView::Warning(w) => format!("{} {:?}", w.error(), w.debug()),
            _ => String::new(),
        };
        if text.to_lowercase().contains("panic") {
            outcome.error = Some(text);
        }
    }
    pipeline.set_state(gst::State::Null).unwrap();
    outcome.bytes_out = *bytes_out.lock().unwrap();
    outcome
}

#[test]
fn hostile_streams_end_cleanly() {
    INIT.call_once(|| {
        gst::init().unwrap();
        gstvalence::plugin_register_static().unwrap();
    });
    let cases: u64 = std::env::var("VALENCE_STREAM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let first: u64 = std::env::var("VALENCE_STREAM_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut failures = Vec::new();
    for seed in first..first + cases {
        let live = seed % 3 == 0;
        // A hang is a failure with a name, not a CI job that runs out of time.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if done_rx.recv_timeout(Duration::from_secs(120)).is_err() {
                eprintln!("stream fuzz seed {seed} (live {live}) hung for 120 s");
                std::process::abort();
            }
        });
        let o = run_case(seed, live);
        let _ = done_tx.send(());
        let _ = watchdog.join();
        let panicked = o
            .error
            .as_deref()
            .is_some_and(|e| e.to_lowercase().contains("panic"));
        let lost_audio = !o.flushed && o.reached_eos && o.bytes_out != o.bytes_in;
        let hung = !o.reached_eos && o.error.is_none();
        if panicked || lost_audio || hung || (!o.flushed && o.error.is_some()) {
            failures.push(format!(
                "seed {seed} (live {live}): eos {}, error {:?}, bytes in {} out {}, flushed {}",
                o.reached_eos, o.error, o.bytes_in, o.bytes_out, o.flushed
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} streams failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
