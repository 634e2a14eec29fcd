//! `valence bench --what triton`: N file and live streams through one Triton Inference Server,
//! beside the same streams classified in this process, in one run.
//!
//! With a local model (the default), the model is exported (`valence export triton`) and
//! served on loopback by PyTriton's `tritonserver` (`--python`: a Python with nvidia-pytriton
//! and onnxruntime, `scripts/triton-venv.sh`). With `--model triton://HOST:PORT/NAME` the
//! streams use that server and the local rows use the installed default model.
//!
//! On one machine the server and the pipelines share the CPU: the remote rows show what the
//! protocol and the server's batching cost and give, not what a GPU server adds.

use anyhow::{Context, Result};
use valence_cli::export::{TritonBatching, export_triton};
use valence_cli::triton_serve::{LocalTriton, free_port};
use valence_model::serving::registry;
use valence_triton::{ServerStatistics, Timeouts, TritonModel, TritonUrl, is_remote};

use crate::streams::{self, Figures};

/// The element's default batching (one shared service, batch 8, no wait).
const SHARING: usize = 2;

pub fn run(model: &str, python: Option<&str>, counts: &[usize], seconds: f64) -> Result<()> {
    let scratch = std::env::temp_dir().join(format!("valence-triton-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let (remote, local, _server) = if is_remote(model) {
        let local = registry::resolve_model(registry::DEFAULT_MODEL)?;
        (model.to_string(), local, None)
    } else {
        let local = registry::resolve_model(model)?;
        let python = python.context(
            "give --python: a Python with nvidia-pytriton and onnxruntime \
             (`bash scripts/triton-venv.sh` makes one and prints it), or --model triton://...",
        )?;
        let repo = scratch.join("repo");
        export_triton(
            &local,
            &repo,
            "valence",
            TritonBatching {
                max_batch_size: 64,
                max_queue_delay_us: 2000,
            },
        )?;
        let server = LocalTriton::start(python, &repo, "valence", free_port()?)?;
        (server.url("valence"), local, Some(server))
    };
    let url = TritonUrl::parse(&remote)?;
    let stats = TritonModel::connect(&url, Timeouts::default())?;
    let local_model = local.to_string_lossy().to_string();
    println!(
        "Triton: {remote}{}; local: {} (this process, CPU: {}); 48 kHz pink noise, 3 s window / 1 s hop, \
         element batch-size 8; {seconds} s per live run, {seconds} s of audio per file stream; \
         each row in a fresh process",
        if is_remote(model) {
            ""
        } else {
            " (PyTriton on loopback, ONNX Runtime on this machine's CPU)"
        },
        local.display(),
        valence_model::serving::runtime::CpuFeatures::detect().describe()
    );
    for live in [false, true] {
        println!(
            "{}",
            if live {
                "live streams (against the clock): windows/s, latency from a window's end to its message"
            } else {
                "file streams (as fast as they go): windows/s"
            }
        );
        for &n in counts {
            for (target, m) in [("triton", remote.as_str()), ("local", local_model.as_str())] {
                let before = stats.statistics().ok();
                let f = streams::run_child(m, "cpu", live, n, SHARING, seconds)
                    .with_context(|| format!("{n} {target} streams"))?;
                let server_batch = match (before, stats.statistics().ok()) {
                    (Some(b), Some(a)) if target == "triton" => server_mean_batch(&b, &a),
                    _ => String::from("-"),
                };
                print_row(n, target, live, &f, &server_batch);
            }
        }
    }
    drop(_server);
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

fn server_mean_batch(before: &ServerStatistics, after: &ServerStatistics) -> String {
    after
        .mean_batch_since(before)
        .map_or("-".into(), |b| format!("{b:.2}"))
}

fn print_row(n: usize, target: &str, live: bool, f: &Figures, server_batch: &str) {
    let rate = f.classified as f64 / f.wall_s.max(1e-9);
    let latency = if live {
        format!(
            ", latency p50 {:.3} s p99 {:.3} s, skipped {} ({:.1} %)",
            f.latency_p50,
            f.latency_p99,
            f.skipped,
            100.0 * f.skipped_share()
        )
    } else {
        String::new()
    };
    println!(
        "N={n:3} {target:7} {:6} windows in {:6.1} s: {rate:7.1} windows/s, element batch {:.2}, \
         server batch {server_batch}, client cpu {:.2} cores{latency}",
        f.classified, f.wall_s, f.mean_batch, f.cpu_cores
    );
}
