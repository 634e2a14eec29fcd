//! `valence bench --what monitor`: N live streams through `valence monitor` (file sources played
//! against the clock, one pipeline each, one shared service) while a client asks `/metrics` and
//! `/api/streams` 10 times a second; beside the same N streams through the element alone
//! (`--what live`'s pipelines, in a child process) in the same run.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gst::prelude::*;

use crate::streams;

/// `seconds` of the live benchmark's signal (48 kHz mono pink noise) as a WAV file.
fn write_noise(path: &Path, seconds: f64) -> Result<()> {
    let buffers = (seconds * 48_000.0 / 960.0).ceil() as u64;
    let desc = format!(
        "audiotestsrc wave=pink-noise volume=0.3 samplesperbuffer=960 num-buffers={buffers} \
         ! audio/x-raw,format=S16LE,rate=48000,channels=1 ! wavenc ! filesink location=\"{}\"",
        path.display()
    );
    let p = gst::parse::launch(&desc)?;
    p.set_state(gst::State::Playing)?;
    let bus = p.bus().context("no bus")?;
    let msg = bus.timed_pop_filtered(
        gst::ClockTime::from_seconds(120),
        &[gst::MessageType::Eos, gst::MessageType::Error],
    );
    let _ = p.set_state(gst::State::Null);
    match msg {
        Some(m) if m.type_() == gst::MessageType::Eos => Ok(()),
        m => bail!("cannot write the benchmark's audio: {m:?}"),
    }
}

/// Milliseconds of each request, sorted.
fn http_load(base: &str, until: Instant) -> (Vec<f64>, usize) {
    let agent = ureq::Agent::new_with_defaults();
    let mut times = Vec::new();
    let mut failed = 0;
    let mut next = Instant::now();
    let mut k = 0usize;
    while Instant::now() < until {
        let path = if k.is_multiple_of(2) {
            "/metrics"
        } else {
            "/api/streams"
        };
        k += 1;
        let t = Instant::now();
        match agent
            .get(&format!("{base}{path}"))
            .call()
            .and_then(|mut r| r.body_mut().read_to_string())
        {
            Ok(_) => times.push(t.elapsed().as_secs_f64() * 1e3),
            Err(_) => failed += 1,
        }
        next += Duration::from_millis(100);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    times.sort_by(f64::total_cmp);
    (times, failed)
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub fn run(model: &str, device: &str, counts: &[usize], seconds: f64) -> Result<()> {
    let dir = valence_model::serving::registry::resolve_model(model)?;
    let model = dir.to_string_lossy().to_string();
    let work = std::env::temp_dir().join(format!("valence-monitor-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let wav = work.join("noise.wav");
    // Longer than the run: no source reaches its end (a loop restarts the windows).
    write_noise(&wav, seconds + 30.0)?;
    println!(
        "live streams through valence monitor (files against the clock, 48 kHz mono pink noise, \
         min-speech=0 so every window reaches the model) beside the element alone, model {} on \
         {device}, {seconds} s per run, CPU: {}",
        dir.display(),
        valence_model::serving::runtime::CpuFeatures::detect().describe()
    );
    let element_sharing = 2; // one service, batch-size=8: the element's defaults
    for &n in counts {
        let alone = streams::run_child(&model, device, true, n, element_sharing, seconds)?;
        println!(
            "N={n:3} element alone                classified {:6} skipped {:5} ({:5.1} %) cpu {:.2} cores, RSS {:.0} MB",
            alone.classified,
            alone.skipped,
            100.0 * alone.skipped_share(),
            alone.cpu_cores,
            alone.rss_mb
        );
        let mut text = format!(
            "listen = \"127.0.0.1:0\"\n[element]\nmodel = {model:?}\ndevice = {device:?}\nmin-speech = 0.0\n"
        );
        for i in 0..n {
            text += &format!(
                "[[source]]\nname = \"s{i}\"\nuri = {:?}\n",
                wav.to_string_lossy()
            );
        }
        text += "[[alert]]\nname = \"neg\"\nclass = \"negative\"\nabove = 0.7\nover = 10\n";
        let cfg = valence_monitor::Config::parse(&text)?;
        let monitor = valence_monitor::Monitor::start(&cfg, Default::default())?;
        let base = format!("http://{}", monitor.addr);
        // Every source playing before the clock starts.
        let t_up = Instant::now();
        while !monitor.hub.streams().iter().all(|s| s.up) {
            if t_up.elapsed() > Duration::from_secs(120) {
                bail!("the sources did not all start in 120 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let count = |m: &valence_monitor::Monitor| {
            m.hub.streams().iter().fold((0u64, 0u64), |acc, s| {
                let c: u64 = s.windows.values().sum();
                (acc.0 + c, acc.1 + s.skipped)
            })
        };
        let c0 = count(&monitor);
        let cpu0 = streams::cpu_seconds();
        let t0 = Instant::now();
        let (times, failed) = http_load(&base, t0 + Duration::from_secs_f64(seconds));
        let wall = t0.elapsed().as_secs_f64();
        let cpu = streams::cpu_seconds() - cpu0;
        let c1 = count(&monitor);
        let restarts: u64 = monitor.hub.streams().iter().map(|s| s.restarts).sum();
        let rss = streams::rss_mb();
        monitor.stop();
        let (classified, skipped) = (c1.0 - c0.0, c1.1 - c0.1);
        println!(
            "N={n:3} valence monitor              classified {classified:6} skipped {skipped:5} ({:5.1} %) cpu {:.2} cores ({:.2}x the element alone), RSS {rss:.0} MB, {restarts} restarts",
            100.0 * skipped as f64 / (classified + skipped).max(1) as f64,
            cpu / wall,
            (cpu / wall) / alone.cpu_cores,
        );
        println!(
            "      HTTP /metrics + /api/streams at 10/s: {} answered, {failed} failed, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            times.len(),
            pct(&times, 0.5),
            pct(&times, 0.99),
            times.last().copied().unwrap_or(f64::NAN)
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
