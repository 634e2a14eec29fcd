//! `valence bench --what live|files`: many streams through valenceclassify in one process, as a
//! media server runs them, with the element's batching on and off in the same run.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gst::prelude::*;

/// How the streams' elements reach the model.
#[derive(Debug, Clone, Copy)]
pub struct Sharing {
    pub name: &'static str,
    pub batch_size: u32,
    /// The element's `batch-timeout` in milliseconds (how long a batch waits to fill).
    pub batch_timeout_ms: u64,
    /// One service for all elements; otherwise one per element (a thread each, batch 1: what
    /// the element did before the shared service).
    pub shared: bool,
}

pub const SHARINGS: [Sharing; 3] = [
    Sharing {
        name: "own thread per element, batch 1 (before)",
        batch_size: 1,
        batch_timeout_ms: 0,
        shared: false,
    },
    Sharing {
        name: "one service, batch-size=1",
        batch_size: 1,
        batch_timeout_ms: 0,
        shared: true,
    },
    Sharing {
        name: "one service, batch-size=8",
        batch_size: 8,
        batch_timeout_ms: 0,
        shared: true,
    },
];

/// On a GPU, where a batch of 64 costs little more than one window, the question is how large
/// batches should be and whether waiting for them pays.
pub const GPU_SHARINGS: [Sharing; 3] = [
    Sharing {
        name: "one service, batch-size=8 (default)",
        batch_size: 8,
        batch_timeout_ms: 0,
        shared: true,
    },
    Sharing {
        name: "one service, batch-size=64",
        batch_size: 64,
        batch_timeout_ms: 0,
        shared: true,
    },
    Sharing {
        name: "one service, batch-size=64, 10 ms wait",
        batch_size: 64,
        batch_timeout_ms: 10,
        shared: true,
    },
];

/// The configurations compared on `device`.
pub fn sharings_for(device: &str) -> &'static [Sharing] {
    if device == "cpu" {
        &SHARINGS
    } else {
        &GPU_SHARINGS
    }
}

/// What one run of N streams gave.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Figures {
    pub classified: u64,
    pub skipped: u64,
    pub wall_s: f64,
    /// CPU seconds used by the process per second of wall time.
    pub cpu_cores: f64,
    pub rss_mb: f64,
    pub mean_batch: f64,
    /// Seconds from a window's end (running time) to its message, live only.
    pub latency_p50: f64,
    pub latency_p99: f64,
}

impl Figures {
    pub fn skipped_share(&self) -> f64 {
        let all = self.classified + self.skipped;
        if all == 0 {
            0.0
        } else {
            self.skipped as f64 / all as f64
        }
    }
}

pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and reads nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Resident memory of this process now, in MB (`VmRSS`).
pub fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0; // non-live runs measure no latency
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

const HOP_S: f64 = 1.0;

/// Windows classified, skipped, and classified windows times their mean batch size, summed
/// over the pipelines' elements.
fn element_counts(pipelines: &[gst::Pipeline]) -> Result<(u64, u64, f64)> {
    let mut out = (0, 0, 0.0);
    for p in pipelines {
        let v = p.by_name("v").context("no element")?;
        let c = v.property::<u64>("windows-classified");
        out.0 += c;
        out.1 += v.property::<u64>("windows-skipped");
        out.2 += v.property::<f64>("average-batch-size") * c as f64;
    }
    Ok(out)
}

/// Runs `n` pipelines `audiotestsrc (48 kHz) ! valenceclassify ! fakesink` in this process:
/// live ones for `seconds` against the clock, or non-live ones of `seconds` of audio each as
/// fast as they go. The source is noise, so `min-speech=0`: the speech detector runs over every
/// stream and every window still goes to the model, the worst case of a stream of speech.
pub fn run_streams(
    model: &str,
    device: &str,
    n: usize,
    sharing: Sharing,
    live: bool,
    seconds: f64,
) -> Result<Figures> {
    let buffers = (seconds * 48_000.0 / 960.0).round() as u64;
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let mut pipelines = Vec::with_capacity(n);
    for i in 0..n {
        let instance = if sharing.shared {
            "bench".to_string()
        } else {
            format!("bench-{i}")
        };
        let limit = if live {
            String::new()
        } else {
            format!("num-buffers={buffers}")
        };
        let desc = format!(
            "audiotestsrc is-live={live} wave=pink-noise volume=0.3 samplesperbuffer=960 {limit} \
             ! audio/x-raw,format=F32LE,rate=48000,channels=1 \
             ! valenceclassify name=v model=\"{model}\" device={device} min-speech=0 batch-size={} \
               batch-timeout={} model-instance-id={instance} ! fakesink sync={live}",
            sharing.batch_size,
            sharing.batch_timeout_ms * 1_000_000
        );
        let p = gst::parse::launch(&desc)
            .with_context(|| format!("cannot build {desc}"))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| anyhow::anyhow!("not a pipeline"))?;
        if live {
            let weak = p.downgrade();
            let lat = latencies.clone();
            p.bus().context("no bus")?.set_sync_handler(move |_, msg| {
                if let gst::MessageView::Element(e) = msg.view()
                    && let Some(s) = e.structure()
                    && s.name() == "valence"
                    && s.get::<String>("label").as_deref() != Ok("silence")
                    && let Some(p) = weak.upgrade()
                    && let (Some(clock), Some(base)) = (p.clock(), p.base_time())
                    && let (Ok(rt), Ok(d)) =
                        (s.get::<u64>("running-time"), s.get::<u64>("duration"))
                {
                    let now = clock.time().nseconds().saturating_sub(base.nseconds());
                    let late = now as f64 - (rt + d) as f64;
                    lat.lock().unwrap().push(late / 1e9);
                }
                gst::BusSyncReply::Drop
            });
        }
        pipelines.push(p);
    }
    // Load the model (and start the service) before the clock starts.
    for p in &pipelines {
        p.set_state(gst::State::Paused)
            .context("a pipeline did not start (is the model installed?)")?;
    }
    for p in &pipelines {
        let _ = p.state(gst::ClockTime::from_seconds(60));
    }
    // Live streams start spread evenly over one hop, as calls do that did not start together:
    // windows of different streams do not arrive at the same instant.
    for p in &pipelines {
        p.set_state(gst::State::Playing)?;
        if live {
            std::thread::sleep(Duration::from_secs_f64(HOP_S / n as f64));
        }
    }
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let counts0 = element_counts(&pipelines)?;
    if live {
        std::thread::sleep(Duration::from_secs_f64(seconds));
    } else {
        let deadline = Duration::from_secs_f64(seconds * 20.0 + 60.0);
        for p in &pipelines {
            let bus = p.bus().context("no bus")?;
            let left = deadline.saturating_sub(t0.elapsed());
            match bus.timed_pop_filtered(
                gst::ClockTime::from_nseconds(left.as_nanos() as u64),
                &[gst::MessageType::Eos, gst::MessageType::Error],
            ) {
                Some(m) if m.type_() == gst::MessageType::Eos => {}
                Some(m) => bail!("a stream failed: {m:?}"),
                None => bail!("streams did not finish in {left:?}"),
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let rss = rss_mb();
    let mut f = Figures {
        wall_s: wall,
        cpu_cores: cpu / wall,
        rss_mb: rss,
        ..Default::default()
    };
    let counts = element_counts(&pipelines)?;
    f.classified = counts.0 - counts0.0;
    f.skipped = counts.1 - counts0.1;
    f.mean_batch = if counts.0 > 0 {
        counts.2 / counts.0 as f64
    } else {
        0.0
    };
    for p in &pipelines {
        let _ = p.set_state(gst::State::Null);
    }
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap());
    lat.sort_by(f64::total_cmp);
    f.latency_p50 = percentile(&lat, 0.5);
    f.latency_p99 = percentile(&lat, 0.99);
    Ok(f)
}

/// One configuration in this process, printed as one JSON line for the parent (see [`run`]).
pub fn run_one(
    model: &str,
    device: &str,
    live: bool,
    n: usize,
    sharing: usize,
    seconds: f64,
) -> Result<()> {
    gst::init()?;
    gstvalence::plugin_register_static().context("cannot register the valence plugin")?;
    let cfg = *sharings_for(device)
        .get(sharing)
        .context("no such sharing")?;
    let f = run_streams(model, device, n, cfg, live, seconds)?;
    println!("{}", serde_json::to_string(&f)?);
    Ok(())
}

/// Runs one configuration ([`run_one`]) in a fresh child process of this binary.
pub fn run_child(
    model: &str,
    device: &str,
    live: bool,
    n: usize,
    sharing: usize,
    seconds: f64,
) -> Result<Figures> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "--what", if live { "live" } else { "files" }])
        .args([
            "--streams",
            &n.to_string(),
            "--seconds",
            &seconds.to_string(),
        ])
        .args(["--model", model, "--sharing", &sharing.to_string()])
        .args(["--device", device])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run a benchmark child process")?;
    if !out.status.success() {
        bail!("the child process failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .with_context(|| format!("child printed {text:?}"))
}

/// The live-capacity and file-throughput tables. Each row runs in a fresh child process (this
/// binary with `--sharing K`), so memory and CPU figures do not carry over from earlier rows:
/// an allocator keeps what a previous configuration freed.
pub fn run(model: &str, device: &str, live: bool, streams: &[usize], seconds: f64) -> Result<()> {
    let dir = valence_model::serving::registry::resolve_model(model)?;
    let model = dir.to_string_lossy().to_string();
    println!(
        "{} streams, 48 kHz mono pink noise, model {} on {device}, 3 s window / 1 s hop, {} s {}, \
         CPU: {}; each row in a fresh process",
        if live { "live" } else { "file (non-live)" },
        dir.display(),
        seconds,
        if live {
            "against the clock"
        } else {
            "of audio per stream"
        },
        valence_model::serving::runtime::CpuFeatures::detect().describe()
    );
    let sharings = sharings_for(device);
    let mut alone: Vec<Option<f64>> = vec![None; sharings.len()];
    for &n in streams {
        for (k, sharing) in sharings.iter().enumerate() {
            let f = run_child(&model, device, live, n, k, seconds)
                .with_context(|| format!("the run with {n} streams ({})", sharing.name))?;
            if live {
                println!(
                    "N={n:3} {:42} classified {:6} skipped {:6} ({:5.1} %) {} cpu {:.2} cores, RSS {:.0} MB, mean batch {:.2}, latency p50 {:.3} s p99 {:.3} s",
                    sharing.name,
                    f.classified,
                    f.skipped,
                    100.0 * f.skipped_share(),
                    if f.skipped == 0 { "holds" } else { "skips" },
                    f.cpu_cores,
                    f.rss_mb,
                    f.mean_batch,
                    f.latency_p50,
                    f.latency_p99
                );
            } else {
                let rate = f.classified as f64 / f.wall_s;
                let base = *alone[k].get_or_insert(rate);
                println!(
                    "N={n:3} {:42} {:6} windows in {:6.1} s: {:6.1} windows/s ({:.2}x one file alone), cpu {:.2} cores, RSS {:.0} MB, mean batch {:.2}",
                    sharing.name,
                    f.classified,
                    f.wall_s,
                    rate,
                    rate / base,
                    f.cpu_cores,
                    f.rss_mb,
                    f.mean_batch
                );
            }
        }
    }
    Ok(())
}
