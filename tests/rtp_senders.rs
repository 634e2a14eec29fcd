//! Real RTP senders that are not GStreamer: ffmpeg sends speech as RTP/Opus and RTP/PCMU over
//! loopback into the README's receivers (`udpsrc ! rtpjitterbuffer ! depay ! decoder !
//! audioconvert ! audioresample ! valenceclassify`). Their timestamps drift from the sample
//! count (an Opus stream's advance 17.5-19.5 ms per 20 ms of audio); every window must still
//! come out. `scripts/deps.sh` installs ffmpeg; where it or the decoders are missing the tests
//! say so and skip. `VALENCE_RTP_SECONDS` sets the length of the speech sent (default 20).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use gst::prelude::*;

static INIT: Once = Once::new();

fn init() {
    INIT.call_once(|| {
        gst::init().unwrap();
        gstvalence::plugin_register_static().unwrap();
    });
}

fn tool(name: &str) -> bool {
    Command::new(name)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn seconds() -> u64 {
    std::env::var("VALENCE_RTP_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// A speech file of `secs` seconds (espeak-ng's voice, looped by ffmpeg), or None when a tool
/// is missing.
fn speech(dir: &Path, secs: u64) -> Option<PathBuf> {
    let voice = dir.join("voice.wav");
    let text = "The weather was lovely this morning, and we walked along the river for an hour. \
                Then the train was late again, and nobody told us why. I am so glad you came.";
    let ok = Command::new("espeak-ng")
        .args(["-w", voice.to_str()?, text])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return None;
    }
    let out = dir.join("speech.wav");
    let ok = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-stream_loop",
            "-1",
            "-i",
        ])
        .arg(&voice)
        .args(["-t", &secs.to_string()])
        .arg(&out)
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(out)
}

/// The ffmpeg sender, killed when dropped: also when the test fails midway.
struct Sender(std::process::Child);

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

/// Runs ffmpeg (`codec` args) into a receiver whose depayloading part is `depay`; returns the
/// windows posted.
fn windows_over_rtp(codec: &[&str], caps: &str, depay: &str, secs: u64) -> Option<usize> {
    init();
    for el in ["udpsrc", "rtpjitterbuffer", "audioresample"]
        .into_iter()
        .chain(
            depay
                .split(" ! ")
                .filter_map(|e| e.split_whitespace().next()),
        )
    {
        if gst::ElementFactory::find(el).is_none() {
            eprintln!("SKIP: GStreamer element {el} is missing");
            return None;
        }
    }
    if !tool("ffmpeg") {
        eprintln!("SKIP: ffmpeg is missing (scripts/deps.sh installs it)");
        return None;
    }
    let dir = tempdir();
    let Some(speech) = speech(&dir, secs) else {
        eprintln!("SKIP: espeak-ng or ffmpeg could not make the speech file");
        return None;
    };
    let model = dir.join("model");
    valence_model::synthetic::write_tiny_model(&model, 31).unwrap();
    let port = free_udp_port();
    let receiver = gst::parse::launch(&format!(
        "udpsrc address=127.0.0.1 port={port} caps=\"{caps}\" ! rtpjitterbuffer latency=50 ! \
         {depay} ! audioconvert ! audioresample ! valenceclassify model={} device=cpu ! \
         fakesink sync=true",
        model.display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    receiver.set_state(gst::State::Playing).unwrap();
    let mut sender = Sender(
        Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-re", "-i"])
            .arg(&speech)
            .args(codec)
            .args(["-f", "rtp", &format!("rtp://127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .spawn()
            .expect("ffmpeg starts"),
    );
    let bus = receiver.bus().unwrap();
    let mut windows = 0;
    let mut eos_sent = false;
    let deadline = Instant::now() + Duration::from_secs(secs + 60);
    let mut sender_done: Option<Instant> = None;
    while Instant::now() < deadline {
        if sender_done.is_none() && sender.0.try_wait().unwrap().is_some() {
            sender_done = Some(Instant::now());
        }
        // The jitter buffer's latency and the last packets: then end the stream.
        if !eos_sent && sender_done.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
            receiver.send_event(gst::event::Eos::new());
            eos_sent = true;
        }
        let Some(m) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
            continue;
        };
        match m.view() {
            gst::MessageView::Element(e)
                if e.structure().is_some_and(|s| s.name() == "valence") =>
            {
                windows += 1
            }
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(e) => panic!("{} {:?}", e.error(), e.debug()),
            _ => {}
        }
    }
    drop(sender);
    receiver.set_state(gst::State::Null).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    Some(windows)
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "valence-rtp-{}-{}",
        std::process::id(),
        std::thread::current()
            .name()
            .unwrap_or("t")
            .replace("::", "-")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Full 3 s windows at a 1 s hop in `secs` of audio (the last ends with the audio).
fn expected(secs: u64) -> usize {
    secs.saturating_sub(2) as usize
}

fn check(name: &str, got: Option<usize>, secs: u64) {
    let Some(got) = got else { return };
    let want = expected(secs);
    eprintln!("{name}: {got} windows posted of ~{want} expected");
    assert!(
        got * 10 >= want * 9,
        "{name}: {got} windows of ~{want} expected"
    );
}

#[test]
fn ffmpeg_rtp_opus_sender_gives_the_windows() {
    let secs = seconds();
    let got = windows_over_rtp(
        &["-c:a", "libopus", "-b:a", "24k", "-payload_type", "97"],
        "application/x-rtp,media=audio,clock-rate=48000,encoding-name=OPUS,payload=97",
        "rtpopusdepay ! opusdec",
        secs,
    );
    check("RTP/Opus", got, secs);
}

#[test]
fn ffmpeg_rtp_pcmu_sender_gives_the_windows() {
    let secs = seconds();
    let got = windows_over_rtp(
        &[
            "-c:a",
            "pcm_mulaw",
            "-ar",
            "8000",
            "-ac",
            "1",
            "-payload_type",
            "0",
        ],
        "application/x-rtp,media=audio,clock-rate=8000,encoding-name=PCMU,payload=0",
        "rtppcmudepay ! mulawdec",
        secs,
    );
    check("RTP/PCMU", got, secs);
}
