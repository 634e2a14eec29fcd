//! The element in gst_check::Harness and in real pipelines, with a small random-weight model
//! made by the project's own code (real formats, real loading and inference paths).

use std::path::PathBuf;
use std::sync::{Mutex, Once};

use gst::prelude::*;
use gst_check::Harness;

static INIT: Once = Once::new();
static MODEL: Mutex<Option<PathBuf>> = Mutex::new(None);

fn init() {
    INIT.call_once(|| {
        gst::init().unwrap();
        gstvalence::plugin_register_static().unwrap();
    });
}

/// A tiny random model, made once per test process.
fn model_dir() -> PathBuf {
    let mut m = MODEL.lock().unwrap();
    if let Some(p) = m.as_ref() {
        return p.clone();
    }
    let dir = std::env::temp_dir().join(format!("valence-element-model-{}", std::process::id()));
    valence_model::synthetic::write_tiny_model(&dir, 11).unwrap();
    *m = Some(dir.clone());
    dir
}

fn harness(caps: &str, props: &[(&str, glib::Value)]) -> (Harness, gst::Bus) {
    harness_with_model(&model_dir(), caps, props)
}

fn harness_with_model(
    model: &std::path::Path,
    caps: &str,
    props: &[(&str, glib::Value)],
) -> (Harness, gst::Bus) {
    init();
    let el = gst::ElementFactory::make("valenceclassify")
        .property("model", model.to_string_lossy().as_ref())
        .property("device", "cpu")
        .build()
        .unwrap();
    for (k, v) in props {
        el.set_property_from_value(k, v);
    }
    let bus = gst::Bus::new();
    el.set_bus(Some(&bus));
    let mut h = Harness::with_element(&el, Some("sink"), Some("src"));
    h.set_live(false); // the harness pretends to be live unless told otherwise
    h.set_src_caps_str(caps);
    (h, bus)
}

use gst::glib;

/// A voiced test signal (harmonics with an envelope), interleaved.
fn signal(rate: u32, channels: usize, secs: f64, offset: usize) -> Vec<f32> {
    let n = (rate as f64 * secs).round() as usize;
    let mut out = Vec::with_capacity(n * channels);
    for i in offset..offset + n {
        let t = i as f32 / rate as f32;
        let env = 0.5 + 0.5 * (2.0 * std::f32::consts::PI * 2.0 * t).sin().powi(2);
        let v = (1..6)
            .map(|k| (2.0 * std::f32::consts::PI * 150.0 * k as f32 * t).sin() / k as f32)
            .sum::<f32>()
            * 0.2
            * env;
        for c in 0..channels {
            out.push(v * (1.0 - 0.1 * c as f32));
        }
    }
    out
}

fn f32_buffer(samples: &[f32], pts_ns: Option<u64>, dur_ns: u64) -> gst::Buffer {
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    let mut b = gst::Buffer::from_mut_slice(bytes);
    {
        let b = b.get_mut().unwrap();
        b.set_pts(pts_ns.map(gst::ClockTime::from_nseconds));
        b.set_duration(gst::ClockTime::from_nseconds(dur_ns));
    }
    b
}

/// Pushes `secs` of audio in 100 ms buffers starting at `start_ns`; returns bytes pushed.
fn push_audio(h: &mut Harness, rate: u32, channels: usize, secs: f64, start_ns: u64) -> Vec<u8> {
    let per = (rate / 10) as usize;
    let total = (rate as f64 * secs).round() as usize;
    let mut pushed = Vec::new();
    let mut i = 0;
    while i < total {
        let n = per.min(total - i);
        let s = signal(rate, channels, n as f64 / rate as f64, i);
        let pts = start_ns + (i as u64 * 1_000_000_000 / rate as u64);
        let buf = f32_buffer(&s, Some(pts), n as u64 * 1_000_000_000 / rate as u64);
        pushed.extend(buf.map_readable().unwrap().iter());
        assert_eq!(h.push(buf), Ok(gst::FlowSuccess::Ok));
        i += n;
    }
    pushed
}

fn valence_messages(bus: &gst::Bus) -> Vec<gst::Structure> {
    let mut out = Vec::new();
    while let Some(m) = bus.pop() {
        if let gst::MessageView::Element(e) = m.view()
            && let Some(s) = e.structure()
            && s.name() == "valence"
        {
            out.push(s.to_owned());
        }
    }
    out
}

fn ts(s: &gst::Structure) -> (u64, u64) {
    (
        s.get::<u64>("timestamp").unwrap(),
        s.get::<u64>("duration").unwrap(),
    )
}

fn drain_output(h: &mut Harness) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(b) = h.try_pull() {
        out.extend(b.map_readable().unwrap().iter());
    }
    out
}

#[test]
fn ten_seconds_stereo_44k_gives_eight_windows_with_exact_timestamps() {
    let (mut h, bus) = harness(
        "audio/x-raw,format=F32LE,rate=44100,channels=2,layout=interleaved",
        &[],
    );
    push_audio(&mut h, 44100, 2, 10.0, 0);
    assert!(h.push_event(gst::event::Eos::new()));
    let msgs = valence_messages(&bus);
    let times: Vec<(u64, u64)> = msgs.iter().map(ts).collect();
    let expected: Vec<(u64, u64)> = (0..8).map(|i| (i * 1_000_000_000, 3_000_000_000)).collect();
    assert_eq!(times, expected);
    let s = &msgs[0];
    let names: Vec<&str> = s.fields().map(|f| f.as_str()).collect();
    assert_eq!(
        names,
        [
            "timestamp",
            "stream-time",
            "running-time",
            "duration",
            "label",
            "confidence",
            "negative",
            "neutral",
            "positive",
            "model"
        ]
    );
    for s in &msgs {
        let p: f64 = ["negative", "neutral", "positive"]
            .iter()
            .map(|k| s.get::<f64>(*k).unwrap())
            .sum();
        assert!((p - 1.0).abs() < 1e-5, "probabilities sum to {p}");
        let label: String = s.get("label").unwrap();
        assert!(["negative", "neutral", "positive"].contains(&label.as_str()));
        assert_eq!(
            s.get::<u64>("running-time").unwrap(),
            s.get::<u64>("timestamp").unwrap()
        );
    }
    let el = h.element().unwrap();
    assert_eq!(el.property::<u64>("windows-classified"), 8);
    assert!(el.property::<u64>("average-inference-time") > 0);
}

#[test]
fn audio_leaves_byte_identical_in_s16_and_f32() {
    // F32
    let (mut h, _bus) = harness(
        "audio/x-raw,format=F32LE,rate=48000,channels=1,layout=interleaved",
        &[],
    );
    let pushed = push_audio(&mut h, 48000, 1, 4.0, 0);
    h.push_event(gst::event::Eos::new());
    let out = drain_output(&mut h);
    assert!(
        pushed == out,
        "F32 output differs ({} vs {} bytes)",
        pushed.len(),
        out.len()
    );
    // S16, 8 kHz, 6 channels
    let (mut h, bus) = harness(
        "audio/x-raw,format=S16LE,rate=8000,channels=6,channel-mask=(bitmask)0x3f,layout=interleaved",
        &[],
    );
    let mut pushed: Vec<u8> = Vec::new();
    for k in 0..40u64 {
        let s: Vec<u8> = signal(8000, 6, 0.1, (k * 800) as usize)
            .iter()
            .flat_map(|v| ((v * 32767.0) as i16).to_le_bytes())
            .collect();
        pushed.extend(&s);
        let mut b = gst::Buffer::from_mut_slice(s);
        b.get_mut()
            .unwrap()
            .set_pts(gst::ClockTime::from_mseconds(k * 100));
        h.push(b).unwrap();
    }
    h.push_event(gst::event::Eos::new());
    let out = drain_output(&mut h);
    assert!(
        pushed == out,
        "S16 output differs ({} vs {} bytes)",
        pushed.len(),
        out.len()
    );
    assert_eq!(
        valence_messages(&bus).len(),
        2,
        "4 s of S16 gives windows at 0 and 1 s"
    );
}

#[test]
fn eos_classifies_a_tail_of_at_least_one_second_before_eos_goes_on() {
    let (mut h, bus) = harness(
        "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved",
        &[],
    );
    push_audio(&mut h, 16000, 1, 2.5, 0);
    assert!(valence_messages(&bus).is_empty());
    h.push_event(gst::event::Eos::new());
    // The message is on the bus by the time EOS comes out of the element.
    let mut saw_eos = false;
    while let Some(e) = h.try_pull_event() {
        saw_eos |= e.type_() == gst::EventType::Eos;
    }
    assert!(saw_eos);
    let msgs = valence_messages(&bus);
    assert_eq!(
        msgs.iter().map(ts).collect::<Vec<_>>(),
        vec![(0, 2_500_000_000)]
    );

    let (mut h, bus) = harness(
        "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved",
        &[],
    );
    push_audio(&mut h, 16000, 1, 3.5, 0);
    h.push_event(gst::event::Eos::new());
    assert_eq!(
        valence_messages(&bus).iter().map(ts).collect::<Vec<_>>(),
        vec![(0, 3_000_000_000)],
        "a tail under 1 s after a window is not classified"
    );

    // A stream too short for any window has what there is classified: never silence.
    let (mut h, bus) = harness(
        "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved",
        &[],
    );
    push_audio(&mut h, 16000, 1, 0.9, 0);
    h.push_event(gst::event::Eos::new());
    let msgs = valence_messages(&bus);
    assert_eq!(
        msgs.iter().map(ts).collect::<Vec<_>>(),
        vec![(0, 900_000_000)]
    );
    assert_ne!(msgs[0].get::<String>("label").unwrap(), "silence");
}

/// `min-confidence`: classified windows below it are `uncertain`, their probabilities kept.
#[test]
fn windows_below_min_confidence_are_uncertain() {
    for (min, uncertain) in [(1.0f64, true), (0.0, false)] {
        let (mut h, bus) = harness(
            "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved",
            &[("min-confidence", min.to_value())],
        );
        push_audio(&mut h, 16000, 1, 4.0, 0);
        h.push_event(gst::event::Eos::new());
        let msgs = valence_messages(&bus);
        assert_eq!(msgs.len(), 2);
        for m in msgs {
            let label = m.get::<String>("label").unwrap();
            assert_eq!(label == "uncertain", uncertain, "{m}");
            let p: f64 = ["negative", "neutral", "positive"]
                .iter()
                .map(|k| m.get::<f64>(*k).unwrap())
                .sum();
            assert!((p - 1.0).abs() < 1e-5, "probabilities kept: {m}");
            assert!(m.get::<f64>("confidence").unwrap() > 0.0);
        }
    }
}

#[test]
fn flush_forgets_audio_from_before() {
    let (mut h, bus) = harness(
        "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved",
        &[],
    );
    push_audio(&mut h, 16000, 1, 2.0, 0);
    h.push_event(gst::event::FlushStart::new());
    h.push_event(gst::event::FlushStop::new(true));
    h.push_event(gst::event::Segment::new(&gst::FormattedSegment::<
        gst::ClockTime,
    >::new()));
    push_audio(&mut h, 16000, 1, 3.0, 0);
    let msgs = valence_messages(&bus);
    // Without the reset, 2 s + 3 s would have made windows at 0, 1 and 2 s.
    assert_eq!(
        msgs.iter().map(ts).collect::<Vec<_>>(),
        vec![(0, 3_000_000_000)]
    );
}

#[test]
fn stream_and_running_time_follow_the_segment() {
    let (mut h, bus) = harness(
        "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved",
        &[],
    );
    // A segment starting at 5 s (as after a seek), with stream time 100 s there.
    let mut seg = gst::FormattedSegment::<gst::ClockTime>::new();
    seg.set_start(gst::ClockTime::from_seconds(5));
    seg.set_time(gst::ClockTime::from_seconds(100));
    h.push_event(gst::event::Segment::new(&seg));
    push_audio(&mut h, 16000, 1, 4.0, 5_000_000_000);
    h.push_event(gst::event::Eos::new());
    let msgs = valence_messages(&bus);
    let got: Vec<(u64, u64, u64)> = msgs
        .iter()
        .map(|s| {
            (
                s.get::<u64>("timestamp").unwrap(),
                s.get::<u64>("stream-time").unwrap(),
                s.get::<u64>("running-time").unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (5_000_000_000, 100_000_000_000, 0),
            (6_000_000_000, 101_000_000_000, 1_000_000_000)
        ]
    );
}

#[test]
fn discont_restarts_windows_without_smearing_across_the_gap() {
    let (mut h, bus) = harness(
        "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved",
        &[],
    );
    push_audio(&mut h, 16000, 1, 2.0, 0);
    // 8 s later, flagged DISCONT.
    let mut b = f32_buffer(
        &signal(16000, 1, 2.0, 0),
        Some(10_000_000_000),
        2_000_000_000,
    );
    b.get_mut().unwrap().set_flags(gst::BufferFlags::DISCONT);
    h.push(b).unwrap();
    // A jump in timestamps without the flag is a discontinuity too.
    h.push(f32_buffer(
        &signal(16000, 1, 1.5, 0),
        Some(20_000_000_000),
        1_500_000_000,
    ))
    .unwrap();
    h.push_event(gst::event::Eos::new());
    let times: Vec<(u64, u64)> = valence_messages(&bus).iter().map(ts).collect();
    assert_eq!(
        times,
        vec![
            (0, 2_000_000_000),
            (10_000_000_000, 2_000_000_000),
            (20_000_000_000, 1_500_000_000)
        ]
    );
}

/// Pushes `secs` of 16 kHz mono audio in 20 ms buffers whose timestamps run `rate` times as
/// fast as the samples, with up to `jitter_ms` of jitter either way (a fixed pattern).
fn push_drifting(h: &mut Harness, secs: f64, rate: f64, jitter_ms: i64) {
    let per = 320;
    let total = (16000.0 * secs) as usize;
    let pattern = [0, 1, -1, 1, 0, -1, 1, 1, -1, -1];
    for (k, i) in (0..total).step_by(per).enumerate() {
        let ideal = i as f64 * 1e9 / 16000.0 * rate;
        let pts = (ideal as i64 + 100_000_000 + pattern[k % 10] * jitter_ms * 1_000_000) as u64;
        let b = f32_buffer(&signal(16000, 1, 0.02, i), Some(pts), 20_000_000);
        assert_eq!(h.push(b), Ok(gst::FlowSuccess::Ok));
    }
}

/// Senders whose clocks run 8 % fast or slow, with ±15 ms of jitter (RTP senders, jitter
/// buffers): every window comes out, at the times the stream's timestamps give.
#[test]
fn drifting_and_jittery_timestamps_give_every_window() {
    for rate in [1.08, 0.92] {
        let (mut h, bus) = harness(
            "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved",
            &[],
        );
        push_drifting(&mut h, 12.0, rate, 15);
        h.push_event(gst::event::Eos::new());
        let times: Vec<(u64, u64)> = valence_messages(&bus).iter().map(ts).collect();
        assert_eq!(times.len(), 10, "rate {rate}: {times:?}");
        for (i, (pts, dur)) in times.iter().enumerate() {
            assert_eq!(*dur, 3_000_000_000);
            let want = 100_000_000.0 + i as f64 * 1e9 * rate;
            assert!(
                (*pts as f64 - want).abs() <= 35_000_000.0,
                "rate {rate}: window {i} at {pts}, timestamps say {want}"
            );
        }
    }
}

/// A real 500 ms gap still restarts the windows where it began: at once with a DISCONT flag,
/// and after `discont-wait` without one (the held audio goes to the new windows).
#[test]
fn a_real_gap_restarts_windows_with_or_without_the_flag() {
    for flagged in [true, false] {
        let (mut h, bus) = harness(
            "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved",
            &[],
        );
        push_audio(&mut h, 16000, 1, 4.0, 0);
        let mut first = true;
        for k in 0..40u64 {
            let pts = 4_500_000_000 + k * 100_000_000;
            let mut b = f32_buffer(&signal(16000, 1, 0.1, 0), Some(pts), 100_000_000);
            if first && flagged {
                b.get_mut().unwrap().set_flags(gst::BufferFlags::DISCONT);
            }
            first = false;
            h.push(b).unwrap();
        }
        h.push_event(gst::event::Eos::new());
        let times: Vec<(u64, u64)> = valence_messages(&bus).iter().map(ts).collect();
        let after: Vec<u64> = times
            .iter()
            .map(|t| t.0)
            .filter(|&t| t >= 4_000_000_000)
            .collect();
        assert_eq!(after.first(), Some(&4_500_000_000), "{times:?}");
        assert!(
            times
                .iter()
                .all(|&(t, d)| t + d <= 4_000_000_000 || t >= 4_500_000_000),
            "no window spans the gap: {times:?}"
        );
        assert_eq!(
            after.len(),
            2,
            "4 s after the gap: windows at 4.5, 5.5 s: {times:?}"
        );
    }
}

/// The speech gate with a model that names a (random-weight) detector: every window carries
/// its `speech` share; at `min-speech=1` with an unreachable frame threshold every window is
/// `no-speech`, with no probabilities, counted and never sent to the model; at 0 every window
/// is classified; with `vad=false` no window is gated and none carries a share.
#[test]
fn the_speech_gate_labels_windows_no_speech_and_skips_the_model() {
    let dir = std::env::temp_dir().join(format!("valence-element-vad-{}", std::process::id()));
    valence_model::synthetic::write_tiny_model_with_detector(&dir, 17).unwrap();
    let run = |props: &[(&str, glib::Value)]| {
        let (mut h, bus) = harness_with_model(
            &dir,
            "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved",
            props,
        );
        let pushed = push_audio(&mut h, 16000, 1, 6.0, 0);
        h.push_event(gst::event::Eos::new());
        assert_eq!(drain_output(&mut h), pushed, "audio passes unchanged");
        let el = h.element().unwrap();
        let counts = (
            el.property::<u64>("windows-no-speech"),
            el.property::<u64>("windows-classified"),
        );
        (valence_messages(&bus), counts)
    };
    let (msgs, (no_speech, classified)) = run(&[
        ("min-speech", 1.0f64.to_value()),
        ("speech-threshold", 1.0f64.to_value()),
    ]);
    assert_eq!(msgs.len(), 4);
    assert_eq!((no_speech, classified), (4, 0));
    for m in &msgs {
        assert_eq!(m.get::<String>("label").unwrap(), "no-speech");
        assert_eq!(m.get::<f64>("speech").unwrap(), 0.0);
        assert_eq!(m.get::<f64>("confidence").unwrap(), 0.0);
        assert!(!m.has_field("negative"), "no probabilities: {m}");
    }
    let (msgs, (no_speech, classified)) = run(&[("min-speech", 0.0f64.to_value())]);
    assert_eq!((no_speech, classified), (0, 4));
    for m in &msgs {
        let share = m.get::<f64>("speech").unwrap();
        assert!((0.0..=1.0).contains(&share));
        assert!(m.has_field("negative"));
    }
    let (msgs, (no_speech, classified)) =
        run(&[("vad", false.to_value()), ("min-speech", 1.0f64.to_value())]);
    assert_eq!((no_speech, classified), (0, 4));
    assert!(msgs.iter().all(|m| !m.has_field("speech")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rate_and_channel_change_mid_stream_keeps_windows_going() {
    let (mut h, bus) = harness(
        "audio/x-raw,format=F32LE,rate=44100,channels=2,layout=interleaved",
        &[],
    );
    push_audio(&mut h, 44100, 2, 2.0, 0);
    h.set_src_caps_str("audio/x-raw,format=F32LE,rate=22050,channels=1,layout=interleaved");
    push_audio(&mut h, 22050, 1, 2.0, 2_000_000_000);
    h.push_event(gst::event::Eos::new());
    let times: Vec<(u64, u64)> = valence_messages(&bus).iter().map(ts).collect();
    assert_eq!(
        times,
        vec![(0, 3_000_000_000), (1_000_000_000, 3_000_000_000)]
    );
}

#[test]
fn silence_nan_empty_unstamped_and_huge_buffers_are_handled() {
    let (mut h, bus) = harness(
        "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved",
        &[],
    );
    // Digital silence is reported as such, not classified.
    h.push(f32_buffer(&vec![0.0; 48000], Some(0), 3_000_000_000))
        .unwrap();
    // NaN / Inf, an empty buffer, buffers without PTS (timestamps continue from sample counts).
    h.push(f32_buffer(&vec![f32::NAN; 16000], None, 1_000_000_000))
        .unwrap();
    h.push(f32_buffer(&[], None, 0)).unwrap();
    let mut inf = signal(16000, 1, 1.0, 0);
    inf[100] = f32::INFINITY;
    h.push(f32_buffer(&inf, None, 1_000_000_000)).unwrap();
    let msgs = valence_messages(&bus);
    assert_eq!(msgs[0].get::<String>("label").unwrap(), "silence");
    assert_eq!(msgs[0].get::<f64>("confidence").unwrap(), 0.0);
    assert_eq!(
        msgs.iter().map(ts).collect::<Vec<_>>()[..3],
        [
            (0, 3_000_000_000),
            (1_000_000_000, 3_000_000_000),
            (2_000_000_000, 3_000_000_000)
        ]
    );
    let el = h.element().unwrap();
    assert!(el.property::<u64>("windows-silent") >= 2);

    // A 10-minute buffer (8 kHz S16 mono) in one piece.
    let (mut h, bus) = harness(
        "audio/x-raw,format=S16LE,rate=8000,channels=1,layout=interleaved",
        &[
            ("window", 10_000_000_000u64.to_value()),
            ("hop", 10_000_000_000u64.to_value()),
        ],
    );
    let s: Vec<u8> = signal(8000, 1, 600.0, 0)
        .iter()
        .flat_map(|v| ((v * 32767.0) as i16).to_le_bytes())
        .collect();
    let mut b = gst::Buffer::from_mut_slice(s);
    b.get_mut().unwrap().set_pts(gst::ClockTime::ZERO);
    h.push(b).unwrap();
    h.push_event(gst::event::Eos::new());
    assert_eq!(valence_messages(&bus).len(), 60);
}

#[test]
fn live_stream_skips_whole_windows_when_inference_falls_behind() {
    let (mut h, bus) = harness(
        "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved",
        &[
            ("window", 500_000_000u64.to_value()),
            ("hop", 100_000_000u64.to_value()),
        ],
    );
    h.set_live(true);
    h.set_upstream_latency(gst::ClockTime::from_mseconds(20));
    // 60 s arriving at once: ~600 windows in one call, far faster than any model.
    h.push(f32_buffer(
        &signal(16000, 1, 60.0, 0),
        Some(0),
        60_000_000_000,
    ))
    .unwrap();
    let el = h.element().unwrap();
    let skipped = el.property::<u64>("windows-skipped");
    assert!(skipped > 0, "windows must be skipped, not queued");
    let mut qos = 0;
    let mut warned = false;
    while let Some(m) = bus.pop() {
        match m.view() {
            gst::MessageView::Qos(_) => qos += 1,
            gst::MessageView::Warning(w) => {
                // The reason itself, not GStreamer's generic text for a domain.
                assert!(
                    w.error().message().contains("slower than real time"),
                    "{w:?}"
                );
                warned = true;
            }
            _ => {}
        }
    }
    assert_eq!(qos as u64, skipped);
    assert!(warned);
    h.push_event(gst::event::Eos::new());
    let classified = el.property::<u64>("windows-classified");
    assert!(
        classified >= 1 && classified + skipped <= 596,
        "{classified} + {skipped}"
    );
    // The element holds no audio back, so it adds nothing to upstream's latency.
    assert_eq!(h.query_latency(), Some(gst::ClockTime::from_mseconds(20)));
}

fn run_pipeline(desc: &str) -> (Vec<gst::Structure>, Vec<gst::Buffer>, Option<String>) {
    init();
    let pipeline = gst::parse::launch(desc)
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
    let sink = pipeline
        .by_name("sink")
        .and_then(|s| s.downcast::<gst_app::AppSink>().ok());
    let buffers = std::sync::Arc::new(Mutex::new(Vec::new()));
    if let Some(sink) = &sink {
        let b = buffers.clone();
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |s| {
                    let smp = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    b.lock().unwrap().push(smp.buffer_owned().unwrap());
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
    }
    let bus = pipeline.bus().unwrap();
    let mut msgs = Vec::new();
    let mut error = None;
    // A failed state change still leaves its error on the bus.
    let _ = pipeline.set_state(gst::State::Playing);
    for m in bus.iter_timed(gst::ClockTime::from_seconds(60)) {
        match m.view() {
            gst::MessageView::Element(e) => {
                if let Some(s) = e.structure().filter(|s| s.name() == "valence") {
                    msgs.push(s.to_owned());
                }
            }
            gst::MessageView::Error(e) => {
                error = Some(format!("{} {:?}", e.error(), e.debug()));
                break;
            }
            gst::MessageView::Eos(_) => break,
            _ => {}
        }
    }
    pipeline.set_state(gst::State::Null).unwrap();
    let b = buffers.lock().unwrap().clone();
    (msgs, b, error)
}

#[test]
fn meta_survives_audioconvert_and_is_readable_downstream() {
    let desc = format!(
        "audiotestsrc num-buffers=431 wave=sine freq=220 ! audio/x-raw,format=F32LE,rate=44100,channels=2 ! \
         valenceclassify model={} device=cpu ! audioconvert ! audio/x-raw,format=S16LE ! appsink name=sink sync=false",
        model_dir().display()
    );
    let (msgs, buffers, err) = run_pipeline(&desc);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(msgs.len(), 8);
    let metas: Vec<gst::Structure> = buffers
        .iter()
        .flat_map(|b| {
            b.iter_meta::<gst::Meta>()
                .filter_map(|m| {
                    m.try_as_custom_meta()
                        .filter(|c| c.has_name(gstvalence::META_NAME))
                        .map(|c| c.structure().to_owned())
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(metas.len(), 8, "one meta per window after audioconvert");
    for (m, s) in metas.iter().zip(&msgs) {
        assert_eq!(
            m.get::<u64>("timestamp").unwrap(),
            s.get::<u64>("timestamp").unwrap()
        );
        assert_eq!(
            m.get::<String>("label").unwrap(),
            s.get::<String>("label").unwrap()
        );
        assert_eq!(
            m.get::<f64>("positive").unwrap(),
            s.get::<f64>("positive").unwrap()
        );
    }
}

/// The README's Python recipe: PyGObject reads `ValenceMeta` from buffers
/// (`Gst.Buffer.get_custom_meta`) with Debian's `/usr/bin/python3` and `python3-gst-1.0`
/// (which `scripts/deps.sh` installs). The plugin is found through GST_PLUGIN_PATH: the
/// `libgstvalence.so` cargo built beside this test binary.
#[test]
fn python_reads_valence_meta() {
    let plugin_dir = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .to_path_buf();
    assert!(
        plugin_dir.join("libgstvalence.so").is_file(),
        "no libgstvalence.so in {}",
        plugin_dir.display()
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/read_meta.py");
    let out = std::process::Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(model_dir())
        .env("GST_PLUGIN_PATH", &plugin_dir)
        .output()
        .expect("run /usr/bin/python3 (Debian's python3 with python3-gst-1.0)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // 10 s of audio, 1 s windows every 1 s: ten metas, each "<pts> <label> <confidence>".
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 10, "{stdout}");
    for line in lines {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 3, "{line}");
        assert!(
            ["negative", "neutral", "positive"].contains(&f[1]),
            "{line}"
        );
        let c: f64 = f[2].parse().unwrap();
        assert!((1.0 / 3.0..=1.0).contains(&c), "{line}");
    }
}

#[test]
fn missing_and_corrupt_models_fail_the_state_change_with_a_clear_error() {
    let (_, _, err) = run_pipeline(
        "audiotestsrc num-buffers=10 ! valenceclassify model=/nonexistent/model device=cpu ! fakesink",
    );
    let err = err.expect("must fail");
    assert!(err.contains("/nonexistent/model"), "{err}");

    let broken = std::env::temp_dir().join(format!("valence-broken-{}", std::process::id()));
    valence_model::synthetic::write_tiny_model(&broken, 3).unwrap();
    std::fs::write(broken.join("head.safetensors"), b"\x00garbage").unwrap();
    let (_, _, err) = run_pipeline(&format!(
        "audiotestsrc num-buffers=10 ! valenceclassify model={} device=cpu ! fakesink",
        broken.display()
    ));
    let err = err.expect("must fail");
    assert!(err.contains("head.safetensors"), "{err}");
}

/// A Triton server that does not answer, or an address that is not one, fails the start with an
/// error naming the URL (the tests against a real server are in the CLI crate's `triton.rs`).
#[test]
fn unreachable_or_malformed_triton_models_fail_the_state_change() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // released: nothing listens there
    let url = format!("triton://127.0.0.1:{port}/valence");
    let started = std::time::Instant::now();
    let (msgs, _, err) = run_pipeline(&format!(
        "audiotestsrc num-buffers=10 ! valenceclassify model={url} ! fakesink"
    ));
    let err = err.expect("must fail");
    assert!(err.contains(&url) && err.contains("not reachable"), "{err}");
    assert!(msgs.is_empty());
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let (_, _, err) = run_pipeline(
        "audiotestsrc num-buffers=10 ! valenceclassify model=triton://127.0.0.1/valence ! fakesink",
    );
    let err = err.expect("must fail");
    assert!(err.contains("HOST:PORT"), "{err}");
}

#[test]
fn sixteen_pipelines_share_one_loaded_model() {
    init();
    let dir = std::env::temp_dir().join(format!("valence-shared-{}", std::process::id()));
    valence_model::synthetic::write_tiny_model(&dir, 5).unwrap();
    let before = valence_model::serving::registry::load_count(&dir);
    let pipelines: Vec<gst::Pipeline> = (0..16)
        .map(|i| {
            gst::parse::launch(&format!(
                "audiotestsrc num-buffers=160 samplesperbuffer=1600 freq={} ! audio/x-raw,rate=16000 ! \
                 valenceclassify model={} device=cpu ! fakesink",
                200 + 10 * i,
                dir.display()
            ))
            .unwrap()
            .downcast()
            .unwrap()
        })
        .collect();
    for p in &pipelines {
        p.set_state(gst::State::Playing).unwrap();
    }
    let mut windows = 0;
    for p in &pipelines {
        for m in p
            .bus()
            .unwrap()
            .iter_timed(gst::ClockTime::from_seconds(120))
        {
            match m.view() {
                gst::MessageView::Element(e)
                    if e.structure().is_some_and(|s| s.name() == "valence") =>
                {
                    windows += 1
                }
                gst::MessageView::Eos(_) => break,
                gst::MessageView::Error(e) => panic!("{}", e.error()),
                _ => {}
            }
        }
    }
    assert_eq!(
        valence_model::serving::registry::load_count(&dir) - before,
        1,
        "one load for 16 pipelines"
    );
    for p in &pipelines {
        p.set_state(gst::State::Null).unwrap();
    }
    assert_eq!(windows, 16 * 14, "16 s each: windows at 0..=13 s");
}

#[test]
fn rtp_stream_over_loopback_is_classified() {
    init();
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let receiver = gst::parse::launch(&format!(
        "udpsrc address=127.0.0.1 port={port} caps=\"application/x-rtp,media=audio,clock-rate=44100,encoding-name=L16,channels=2\" ! \
         rtpjitterbuffer latency=50 ! rtpL16depay ! audioconvert ! valenceclassify model={} device=cpu ! fakesink sync=true",
        model_dir().display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let sender = gst::parse::launch(&format!(
        "audiotestsrc is-live=true wave=sine freq=300 samplesperbuffer=441 num-buffers=600 ! \
         audio/x-raw,rate=44100,channels=2 ! audioconvert ! rtpL16pay ! udpsink host=127.0.0.1 port={port}"
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    receiver.set_state(gst::State::Playing).unwrap();
    sender.set_state(gst::State::Playing).unwrap();
    // 6 s of live audio: windows at 0, 1, 2, 3 s at least must come through.
    let mut windows = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let bus = receiver.bus().unwrap();
    while std::time::Instant::now() < deadline && windows.len() < 3 {
        if let Some(m) = bus.timed_pop(gst::ClockTime::from_mseconds(200)) {
            match m.view() {
                gst::MessageView::Element(e) => {
                    if let Some(s) = e.structure().filter(|s| s.name() == "valence") {
                        windows.push(s.get::<u64>("duration").unwrap());
                    }
                }
                gst::MessageView::Error(e) => panic!("{} {:?}", e.error(), e.debug()),
                _ => {}
            }
        }
    }
    sender.set_state(gst::State::Null).unwrap();
    receiver.set_state(gst::State::Null).unwrap();
    assert!(windows.len() >= 3, "got {} windows over RTP", windows.len());
    assert!(windows.iter().all(|&d| d == 3_000_000_000));
}

/// The deadlock probe: a bus sync handler sets properties from the streaming thread on every
/// `valence` message (posted while the element handles a buffer), and a second thread sets and
/// reads them all the while. 1,000+ messages, non-live; a hang fails the test after 120 s.
#[test]
fn sync_handler_and_a_second_thread_setting_properties_never_deadlock() {
    init();
    let pipeline = gst::parse::launch(&format!(
        "audiotestsrc num-buffers=1010 samplesperbuffer=1600 wave=pink-noise ! \
         audio/x-raw,rate=16000,channels=1 ! \
         valenceclassify name=v model={} device=cpu window=500000000 hop=100000000 ! fakesink",
        model_dir().display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let el = pipeline.by_name("v").unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let bus = pipeline.bus().unwrap();
    {
        let (el, seen) = (el.clone(), seen.clone());
        bus.set_sync_handler(move |_, m| {
            if let gst::MessageView::Element(e) = m.view()
                && e.structure().is_some_and(|s| s.name() == "valence")
            {
                let n = seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                el.set_property("post-messages", true);
                el.set_property("attach-meta", n % 2 == 0);
                el.set_property("silence-threshold", -70.0 - (n % 3) as f64);
                let _ = el.property::<u64>("windows-classified");
            }
            gst::BusSyncReply::Pass
        });
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (el, stop) = (el.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                el.set_property("attach-meta", i % 2 == 1);
                el.set_property("silence-threshold", -65.0);
                let _ = el.property::<bool>("post-messages");
                let _ = el.property::<u64>("average-inference-time");
                i += 1;
            }
        })
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    {
        let pipeline = pipeline.clone();
        std::thread::spawn(move || {
            pipeline.set_state(gst::State::Playing).unwrap();
            let end = bus.timed_pop_filtered(
                gst::ClockTime::NONE,
                &[gst::MessageType::Eos, gst::MessageType::Error],
            );
            let _ = done_tx.send(end.map(|m| format!("{:?}", m.view())));
        });
    }
    let end = done_rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the pipeline hung: a lock is held while posting or the two locks cross");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    prober.join().unwrap();
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(
        end.as_deref().is_some_and(|e| e.starts_with("Eos")),
        "{end:?}"
    );
    let n = seen.load(std::sync::atomic::Ordering::Relaxed);
    assert!(n >= 1000, "{n} messages");
}

/// Adjacent F32 samples of 1e38 at 48 kHz (through the resampler) used to end the stream
/// with a panic in rubato's FFT; now they are clamped for analysis and the audio passes as is.
#[test]
fn huge_finite_samples_are_analysed_without_a_panic() {
    let (mut h, bus) = harness(
        "audio/x-raw,format=F32LE,rate=48000,channels=1,layout=interleaved",
        &[],
    );
    let mut x = signal(48000, 1, 4.0, 0);
    for (i, v) in x.iter_mut().enumerate().skip(1000).take(4000) {
        *v = if i % 2 == 0 { 1e38 } else { -3e38 };
    }
    h.push(f32_buffer(&x, Some(0), 4_000_000_000)).unwrap();
    h.push_event(gst::event::Eos::new());
    let out = drain_output(&mut h);
    assert_eq!(out.len(), x.len() * 4, "audio passes unchanged");
    let mut errors = Vec::new();
    let mut windows = 0;
    while let Some(m) = bus.pop() {
        match m.view() {
            gst::MessageView::Error(e) => errors.push(format!("{e:?}")),
            gst::MessageView::Element(e)
                if e.structure().is_some_and(|s| s.name() == "valence") =>
            {
                windows += 1
            }
            _ => {}
        }
    }
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(windows, 2, "windows at 0 s and 1 s (3 s long) in 4 s");
}

/// Hostile model directories: metadata that is not a regular file, a head that would divide by
/// zero, a scaler with NaN. Each fails the state change with an error naming the problem,
/// at once (no giant read, no blocking open, no per-window panic).
#[test]
fn hostile_model_directories_fail_cleanly_at_start() {
    let base = std::env::temp_dir().join(format!("valence-hostile-{}", std::process::id()));
    let fresh = |name: &str| {
        let d = base.join(name);
        let _ = std::fs::remove_dir_all(&d);
        valence_model::synthetic::write_tiny_model(&d, 3).unwrap();
        d
    };
    let start = |dir: &std::path::Path| -> String {
        let t0 = std::time::Instant::now();
        let (_, _, err) = run_pipeline(&format!(
            "audiotestsrc num-buffers=10 ! valenceclassify model={} device=cpu ! fakesink",
            dir.display()
        ));
        assert!(t0.elapsed().as_secs() < 30, "took {:?}", t0.elapsed());
        err.unwrap_or_else(|| panic!("{} must fail", dir.display()))
    };

    let d = fresh("zero");
    std::fs::remove_file(d.join("valence.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", d.join("valence.json")).unwrap();
    let e = start(&d);
    assert!(e.contains("not a regular file"), "{e}");

    let d = fresh("fifo");
    std::fs::remove_file(d.join("head_config.json")).unwrap();
    let ok = std::process::Command::new("mkfifo")
        .arg(d.join("head_config.json"))
        .status()
        .unwrap();
    assert!(ok.success());
    let e = start(&d);
    assert!(e.contains("not a regular file"), "{e}");

    let d = fresh("nhead");
    let cfg_path = d.join("head_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    assert!(
        cfg.get("nhead").is_some(),
        "the tiny model's head has an nhead: {cfg}"
    );
    cfg["nhead"] = 0.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = start(&d);
    assert!(e.contains("nhead"), "{e}");

    let d = fresh("nan");
    let scaler =
        valence_model::classifier::scaler::StandardScaler::load(&d.join("scaler.safetensors"))
            .unwrap();
    let mut mean = scaler.mean.clone();
    mean[0] = f32::NAN;
    let t = std::collections::HashMap::from([
        (
            "mean".to_string(),
            candle_core::Tensor::new(mean.as_slice(), &candle_core::Device::Cpu).unwrap(),
        ),
        (
            "scale".to_string(),
            candle_core::Tensor::new(scaler.scale.as_slice(), &candle_core::Device::Cpu).unwrap(),
        ),
    ]);
    candle_core::safetensors::save(&t, d.join("scaler.safetensors")).unwrap();
    let e = start(&d);
    assert!(e.contains("must be finite"), "{e}");
    let _ = std::fs::remove_dir_all(&base);
}

/// Runs `streams` non-live harnesses at once on one inference service (`instance`), each on its
/// own thread with its own audio; returns each stream's probabilities and average batch size.
fn concurrent_streams(
    streams: usize,
    instance: &str,
    batch_size: u32,
) -> Vec<(Vec<[f64; 3]>, f64)> {
    let start = std::sync::Barrier::new(streams);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..streams)
            .map(|i| {
                let start = &start;
                s.spawn(move || {
                    let (mut h, bus) = harness(
                        "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved",
                        &[
                            ("model-instance-id", instance.to_value()),
                            ("batch-size", batch_size.to_value()),
                            ("batch-timeout", 500_000_000u64.to_value()),
                        ],
                    );
                    start.wait();
                    // Each stream hears different audio (another stretch of the signal).
                    let per = 1600;
                    for k in 0..50 {
                        let s = signal(16000, 1, 0.1, (i * 7919 + k * per) % 160_000);
                        let buf = f32_buffer(&s, Some(k as u64 * 100_000_000), 100_000_000);
                        assert_eq!(h.push(buf), Ok(gst::FlowSuccess::Ok));
                    }
                    assert!(h.push_event(gst::event::Eos::new()));
                    let probs = valence_messages(&bus)
                        .iter()
                        .map(|m| {
                            ["negative", "neutral", "positive"].map(|k| m.get::<f64>(k).unwrap())
                        })
                        .collect::<Vec<_>>();
                    let el = h.element().unwrap();
                    (probs, el.property::<f64>("average-batch-size"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Four streams batched together give what each gives alone (batch size 1), within 1e-5.
#[test]
fn batched_streams_give_the_same_results_as_batch_size_one() {
    let alone = concurrent_streams(4, "batch-test-alone", 1);
    let batched = concurrent_streams(4, "batch-test-batched", 4);
    for (i, ((a, a_batch), (b, b_batch))) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(a.len(), 3, "5 s at 3 s / 1 s make 3 windows");
        assert_eq!(a.len(), b.len());
        for (pa, pb) in a.iter().zip(b) {
            for (x, y) in pa.iter().zip(pb) {
                assert!(
                    (x - y).abs() <= 1e-5,
                    "stream {i}: {pa:?} alone, {pb:?} batched"
                );
            }
        }
        assert_eq!(*a_batch, 1.0);
        assert!(
            *b_batch > 1.0,
            "stream {i} ran in batches of {b_batch} on average"
        );
    }
    // Different streams heard different audio.
    assert_ne!(alone[0].0, alone[1].0);
}

/// A non-live element waiting for its window's batch (another element shares the service and
/// the batch timeout is long) returns at once on FLUSH_START, and stop() does not wait either.
#[test]
fn flush_start_and_stop_return_while_a_window_waits_for_its_batch() {
    let props = [
        ("model-instance-id", "slow-batch".to_value()),
        ("batch-size", 8u32.to_value()),
        ("batch-timeout", 10_000_000_000u64.to_value()),
    ];
    let caps = "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved";
    let (_other, _) = harness(caps, &props); // a second client: batches wait to fill
    let (mut h, bus) = harness(caps, &props);
    let el = h.element().unwrap();
    let t0 = std::time::Instant::now();
    let flow = std::thread::scope(|s| {
        let pusher = s.spawn(move || {
            // The 30th buffer completes the first window, which then waits for its batch.
            let mut last = Ok(gst::FlowSuccess::Ok);
            for k in 0..30 {
                let samples = signal(16000, 1, 0.1, k * 1600);
                last = h.push(f32_buffer(
                    &samples,
                    Some(k as u64 * 100_000_000),
                    100_000_000,
                ));
                if last.is_err() {
                    break;
                }
            }
            (last, h)
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        let sink = el.static_pad("sink").unwrap();
        assert!(sink.send_event(gst::event::FlushStart::new()));
        pusher.join().unwrap()
    });
    let (last, h) = flow;
    assert_eq!(last, Err(gst::FlowError::Flushing));
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(5),
        "FLUSH_START waited for the batch ({:?})",
        t0.elapsed()
    );
    assert!(valence_messages(&bus).is_empty());
    let t1 = std::time::Instant::now();
    drop(h); // stops the element
    assert!(t1.elapsed() < std::time::Duration::from_secs(5));
}

/// Loading a model from disk is announced with progress messages (start, then complete), and
/// a second element on the same model loads nothing and announces nothing.
#[test]
fn model_loading_posts_progress_messages() {
    init();
    let dir = std::env::temp_dir().join(format!("valence-progress-{}", std::process::id()));
    valence_model::synthetic::write_tiny_model(&dir, 23).unwrap();
    let progress = |bus: &gst::Bus| -> Vec<(gst::ProgressType, String)> {
        let mut out = Vec::new();
        while let Some(m) = bus.pop() {
            if let gst::MessageView::Progress(p) = m.view() {
                let (kind, code, _text) = p.get();
                out.push((kind, code.to_string()));
            }
        }
        out
    };
    let make = || {
        let el = gst::ElementFactory::make("valenceclassify")
            .property("model", dir.to_string_lossy().as_ref())
            .property("device", "cpu")
            .build()
            .unwrap();
        let bus = gst::Bus::new();
        el.set_bus(Some(&bus));
        el.set_state(gst::State::Paused).unwrap();
        (el, bus)
    };
    let (first, bus) = make();
    assert_eq!(
        progress(&bus),
        [
            (gst::ProgressType::Start, "load-model".to_string()),
            (gst::ProgressType::Complete, "load-model".to_string())
        ]
    );
    let (second, bus) = make();
    assert!(progress(&bus).is_empty(), "the loaded model is shared");
    for el in [first, second] {
        el.set_state(gst::State::Null).unwrap();
    }
    std::fs::remove_dir_all(&dir).ok();
}
