//! valenceclassify as a client of a real NVIDIA Triton Inference Server: PyTriton's
//! `tritonserver` on loopback serving what `valence export triton` writes
//! (`scripts/triton_serve.py`). `VALENCE_TEST_PYTHON` names a Python with nvidia-pytriton and
//! onnxruntime (`bash scripts/triton-venv.sh` makes one; CI sets it); without it the test skips
//! with a message.
//!
//! One test runs the scenarios in order against servers it starts and kills itself: a wrong
//! model name, a file classified remotely and locally, 8 live streams through one server, the
//! server killed and restarted under a live stream, and killed under a non-live one.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{fixtures, shared_data};
use gst::prelude::*;
use valence_cli::export::{TritonBatching, export_triton};
use valence_cli::triton_serve::{LocalTriton, free_port};
use valence_model::manifest::{Combine, FeatureSource, Manifest, Pooling};
use valence_model::serving::registry;
use valence_triton::{Timeouts, TritonModel, TritonUrl};

fn python() -> Option<String> {
    match std::env::var("VALENCE_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            eprintln!(
                "SKIPPED: VALENCE_TEST_PYTHON is not set to a Python with nvidia-pytriton and \
                 onnxruntime (`bash scripts/triton-venv.sh` makes one; CI sets it)"
            );
            None
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("valence-triton-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The default model with f32 encoder weights (what the export runs), when installed; else a
/// small random model of the default model's layout.
fn f32_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    match registry::resolve_model(registry::DEFAULT_MODEL) {
        Ok(installed) => {
            std::fs::create_dir_all(&model).unwrap();
            for entry in std::fs::read_dir(&installed).unwrap() {
                let p = entry.unwrap().path();
                if p.is_file() {
                    std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
                }
            }
            let mut m = Manifest::read(&model).unwrap();
            m.encoder.quantize = None;
            m.write(&model).unwrap();
        }
        Err(_) => {
            eprintln!("the default model is not installed: using a small random model");
            valence_model::synthetic::write_tiny_model(&model, 60).unwrap();
            let mut m = Manifest::read(&model).unwrap();
            m.features.source = FeatureSource::HiddenStates;
            m.features.combine = Combine::Mean;
            m.features.pooling = Pooling::VoicedMean;
            m.write(&model).unwrap();
        }
    }
    model
}

/// Runs `desc` to EOS or error; the `valence` messages and the error, if any.
fn run_to_end(desc: &str) -> (Vec<gst::Structure>, Option<String>) {
    let pipeline = gst::parse::launch(desc)
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
    let bus = pipeline.bus().unwrap();
    let _ = pipeline.set_state(gst::State::Playing);
    let mut msgs = Vec::new();
    let mut error = None;
    for m in bus.iter_timed(gst::ClockTime::from_seconds(120)) {
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
    (msgs, error)
}

fn probabilities(msgs: &[gst::Structure]) -> Vec<Vec<f64>> {
    msgs.iter()
        .filter(|s| s.get::<String>("label").is_ok_and(|l| l != "silence"))
        .map(|s| {
            valence_model::LABELS
                .iter()
                .map(|l| s.get::<f64>(*l).unwrap())
                .collect()
        })
        .collect()
}

/// Sources for the file comparison: the first clip of each shared corpus, else the fixture.
fn file_sources() -> Vec<String> {
    match shared_data() {
        Some(data) => {
            let clips = valence_train::dataset::read_manifest(&data.join("manifest.csv")).unwrap();
            let mut corpora = std::collections::BTreeSet::new();
            clips
                .iter()
                .filter(|c| corpora.insert(c.corpus.clone()))
                .map(|c| {
                    format!(
                        "filesrc location={} ! decodebin ! audioconvert ! audioresample",
                        data.join(&c.path).display()
                    )
                })
                .collect()
        }
        None => vec![format!(
            "filesrc location={} ! wavparse ! audioconvert",
            fixtures().join("speechlike.wav").display()
        )],
    }
}

fn element_u64(e: &gst::Element, name: &str) -> u64 {
    e.property::<u64>(name)
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A live pipeline that runs until stopped: noise into the element, buffers counted at the sink,
/// warnings about the server and errors collected from the bus.
struct LivePipeline {
    pipeline: gst::Pipeline,
    element: gst::Element,
    buffers: Arc<AtomicUsize>,
}

impl LivePipeline {
    /// A live stream of noise; its windows reach the server (the speech gate is off).
    fn start(model: &str) -> Self {
        Self::start_gated(model, false)
    }

    fn start_gated(model: &str, vad: bool) -> Self {
        let desc = format!(
            "audiotestsrc is-live=true wave=pink-noise volume=0.3 ! \
             audio/x-raw,rate=16000,channels=1 ! valenceclassify name=v model={model} vad={vad} ! \
             appsink name=sink sync=true emit-signals=false"
        );
        let pipeline = gst::parse::launch(&desc)
            .unwrap()
            .downcast::<gst::Pipeline>()
            .unwrap();
        let sink = pipeline
            .by_name("sink")
            .unwrap()
            .downcast::<gst_app::AppSink>()
            .unwrap();
        let buffers = Arc::new(AtomicUsize::new(0));
        let b = buffers.clone();
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |s| {
                    s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    b.fetch_add(1, Ordering::Relaxed);
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
        let element = pipeline.by_name("v").unwrap();
        pipeline.set_state(gst::State::Playing).unwrap();
        Self {
            pipeline,
            element,
            buffers,
        }
    }

    /// Warnings about an unreachable server and errors posted so far.
    fn drain_bus(&self, unreachable_warnings: &mut usize, errors: &mut Vec<String>) {
        let bus = self.pipeline.bus().unwrap();
        while let Some(m) = bus.pop() {
            match m.view() {
                gst::MessageView::Warning(w) if w.error().to_string().contains("unreachable") => {
                    *unreachable_warnings += 1
                }
                gst::MessageView::Error(e) => errors.push(e.error().to_string()),
                _ => {}
            }
        }
    }
}

impl Drop for LivePipeline {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

#[test]
fn triton_server_end_to_end() {
    let Some(python) = python() else { return };
    gst::init().unwrap();
    gstvalence::plugin_register_static().unwrap();
    let dir = scratch("e2e");
    let model = f32_model(&dir);
    let repo = dir.join("repo");
    export_triton(
        &model,
        &repo,
        "valence",
        TritonBatching {
            max_batch_size: 64,
            max_queue_delay_us: 2000,
        },
    )
    .unwrap();
    let mut server = LocalTriton::start(&python, &repo, "valence", free_port().unwrap()).unwrap();
    let remote = server.url("valence");

    // A model the server does not have: the state change fails, naming the URL and the model.
    let (_, err) = run_to_end(&format!(
        "audiotestsrc num-buffers=10 ! valenceclassify model={} ! fakesink",
        server.url("no-such-model")
    ));
    let err = err.expect("a missing model must fail the start");
    assert!(
        err.contains("no-such-model") && err.contains(&format!("127.0.0.1:{}", server.grpc_port)),
        "{err}"
    );

    // A file remotely and locally: the same windows, probabilities within 1e-3.
    let sources = file_sources();
    let run = |m: &str| {
        let mut all = Vec::new();
        for source in &sources {
            let (msgs, err) = run_to_end(&format!(
                "{source} ! valenceclassify model={m} device=cpu vad=false ! fakesink"
            ));
            assert!(err.is_none(), "{m}: {err:?}");
            all.extend(probabilities(&msgs));
        }
        all
    };
    let local = run(&model.display().to_string());
    let remote_probs = run(&remote);
    assert!(!local.is_empty());
    assert_eq!(local.len(), remote_probs.len());
    let diff = local
        .iter()
        .flatten()
        .zip(remote_probs.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "file: {} windows, remote vs local max |difference| {diff:.2e}",
        local.len()
    );
    assert!(diff <= 1e-3, "{diff}");

    // 8 live streams share one connection; the server batches their windows.
    let url = TritonUrl::parse(&remote).unwrap();
    let stats_client = TritonModel::connect(&url, Timeouts::default()).unwrap();
    let before = stats_client.statistics().unwrap();
    let streams: Vec<LivePipeline> = (0..8).map(|_| LivePipeline::start(&remote)).collect();
    std::thread::sleep(Duration::from_secs(6));
    let mut classified = 0;
    for s in &streams {
        let n = element_u64(&s.element, "windows-classified");
        assert!(n >= 2, "a live stream classified {n} windows in 6 s");
        assert_eq!(element_u64(&s.element, "windows-failed"), 0);
        classified += n;
    }
    drop(streams);
    let after = stats_client.statistics().unwrap();
    assert!(after.inferences - before.inferences >= classified);
    eprintln!(
        "8 live streams: {classified} windows classified, mean server batch {:.2}",
        after.mean_batch_since(&before).unwrap_or(0.0)
    );

    // The speech gate runs before sending: with the detector `valence setup` installs, a
    // stream of noise gets `no-speech` windows and sends the server nothing.
    let detector = valence_model::speech::default_detector_path();
    if detector.is_file() {
        // Requests of the streams just dropped may still be completing.
        std::thread::sleep(Duration::from_secs(2));
        let before = stats_client.statistics().unwrap();
        let gated = LivePipeline::start_gated(&remote, true);
        std::thread::sleep(Duration::from_secs(5));
        let no_speech = element_u64(&gated.element, "windows-no-speech");
        assert!(
            no_speech >= 2,
            "{no_speech} windows without speech in 5 s of noise"
        );
        assert_eq!(element_u64(&gated.element, "windows-classified"), 0);
        drop(gated);
        let after = stats_client.statistics().unwrap();
        assert_eq!(after.inferences, before.inferences, "nothing was sent");
    } else {
        eprintln!("SKIPPED (gate before sending): no speech detector installed");
    }

    // Live: the server dies and comes back. Audio keeps flowing, failed windows are counted,
    // one warning is posted, and classification resumes.
    let live = LivePipeline::start(&remote);
    let (mut warnings, mut errors) = (0, Vec::new());
    wait_for("live windows", Duration::from_secs(20), || {
        element_u64(&live.element, "windows-classified") >= 2
    });
    server.kill();
    wait_for("failed windows", Duration::from_secs(30), || {
        element_u64(&live.element, "windows-failed") >= 2
    });
    let flowing = live.buffers.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        live.buffers.load(Ordering::Relaxed) > flowing,
        "audio must keep flowing while the server is down"
    );
    server.spawn().unwrap();
    let resumed_from = element_u64(&live.element, "windows-classified");
    wait_for("classification to resume", Duration::from_secs(30), || {
        element_u64(&live.element, "windows-classified") > resumed_from + 1
    });
    live.drain_bus(&mut warnings, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(warnings, 1, "one warning for one outage");
    eprintln!(
        "live outage: {} windows failed, {} skipped, then resumed",
        element_u64(&live.element, "windows-failed"),
        element_u64(&live.element, "windows-skipped")
    );
    drop(live);

    // Non-live: the server dies mid-stream; after the bounded retry the stream fails with an
    // error that says so.
    let pipeline = gst::parse::launch(&format!(
        "appsrc name=src format=time caps=audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved ! \
         valenceclassify model={remote} vad=false ! fakesink"
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let src = pipeline
        .by_name("src")
        .unwrap()
        .downcast::<gst_app::AppSrc>()
        .unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    server.kill();
    let mut rng = valence_model::rng::SeededNormal::new(5);
    for i in 0..10u64 {
        let samples: Vec<u8> = (0..8000)
            .flat_map(|_| (0.1 * rng.sample()).to_le_bytes())
            .collect();
        let mut buf = gst::Buffer::from_mut_slice(samples);
        buf.get_mut()
            .unwrap()
            .set_pts(gst::ClockTime::from_mseconds(500 * i));
        if src.push_buffer(buf).is_err() {
            break; // the element already failed
        }
    }
    let _ = src.end_of_stream();
    let bus = pipeline.bus().unwrap();
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(60),
            &[gst::MessageType::Error, gst::MessageType::Eos],
        )
        .expect("neither an error nor EOS");
    let text = match msg.view() {
        gst::MessageView::Error(e) => e.error().to_string(),
        other => panic!("a lost server must fail a non-live stream, got {other:?}"),
    };
    assert!(text.contains("model server lost"), "{text}");
    pipeline.set_state(gst::State::Null).unwrap();
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}
