//! One source: its pipeline (`uridecodebin → audioconvert → valenceclassify → fakesink`), read
//! from its bus on a thread of its own, restarted with back-off when it fails, ends or stalls,
//! without touching the other sources. All elements share the element's inference service.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use gst::glib;
use gst::prelude::*;

use crate::config::{Property, Source};
use crate::hub::{Hub, now_ms};
use crate::jsonl::Jsonl;
use crate::row::row_from_structure;

/// How a source is kept alive.
#[derive(Debug, Clone, Copy)]
pub struct Supervision {
    /// No audio for this long after it started or last arrived: restart the source.
    pub stall: Duration,
    /// No audio for this long: the source counts as down (`up 0`).
    pub down_after: Duration,
    /// First wait before a restart; doubles after each failure up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// A run that was up this long resets the back-off.
    pub healthy_after: Duration,
}

impl Default for Supervision {
    fn default() -> Self {
        Supervision {
            stall: Duration::from_secs(10),
            down_after: Duration::from_secs(3),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            healthy_after: Duration::from_secs(30),
        }
    }
}

/// Sets `props` on `element`, parsed against each property's type as `gst-launch-1.0` does; a
/// bad name, type or range is an error naming the config line.
pub fn apply_properties(element: &gst::Element, props: &[Property]) -> Result<()> {
    for p in props {
        let where_ = if p.line > 0 {
            format!("line {}: ", p.line)
        } else {
            String::new()
        };
        let Some(pspec) = element.find_property(&p.name) else {
            bail!("{where_}valenceclassify has no property {:?}", p.name);
        };
        if !pspec.flags().contains(glib::ParamFlags::WRITABLE) {
            bail!("{where_}property {:?} is read-only", p.name);
        }
        let value = glib::Value::deserialize_with_pspec(&p.value, &pspec).map_err(|_| {
            anyhow!(
                "{where_}{:?} is not a valid {} for property {:?}",
                p.value,
                pspec.value_type().name(),
                p.name
            )
        })?;
        check_range(&pspec, &value).map_err(|e| anyhow!("{where_}property {:?}: {e}", p.name))?;
        element.set_property_from_value(&p.name, &value);
    }
    Ok(())
}

fn check_range(pspec: &glib::ParamSpec, v: &glib::Value) -> Result<()> {
    macro_rules! range {
        ($spec:ty, $t:ty) => {
            if let Some(s) = pspec.downcast_ref::<$spec>() {
                let x: $t = v.get()?;
                if x < s.minimum() || x > s.maximum() {
                    bail!("{x} is outside {}..={}", s.minimum(), s.maximum());
                }
                return Ok(());
            }
        };
    }
    range!(glib::ParamSpecDouble, f64);
    range!(glib::ParamSpecFloat, f32);
    range!(glib::ParamSpecUInt64, u64);
    range!(glib::ParamSpecInt64, i64);
    range!(glib::ParamSpecUInt, u32);
    range!(glib::ParamSpecInt, i32);
    Ok(())
}

/// The valenceclassify element of a source, with its properties (checks the config too).
pub fn make_classifier(src: &Source) -> Result<gst::Element> {
    let e = gst::ElementFactory::make("valenceclassify")
        .property("attach-meta", false)
        .build()
        .context("the valenceclassify element is not available")?;
    apply_properties(&e, &src.properties).with_context(|| format!("source {:?}", src.name))?;
    // A model that is not there is a config error, not a source to restart forever.
    let model: String = e.property("model");
    if !valence_triton::is_remote(&model)
        && let Err(err) = valence_model::serving::registry::resolve_model(&model)
    {
        let line = src
            .properties
            .iter()
            .rev()
            .find(|p| p.name == "model" && p.line > 0)
            .map(|p| format!("line {}: ", p.line))
            .unwrap_or_default();
        bail!("{line}source {:?}: {err:#}", src.name);
    }
    Ok(e)
}

struct Run {
    pipeline: gst::Pipeline,
    classify: gst::Element,
    /// Milliseconds since the Unix epoch when audio last reached the classifier (0: not yet).
    last_audio_ms: Arc<AtomicU64>,
}

fn build(src: &Source) -> Result<Run> {
    let pipeline = gst::Pipeline::with_name(&format!("monitor-{}", src.name));
    let decode = gst::ElementFactory::make("uridecodebin")
        .property("uri", &src.uri)
        .build()
        .context("uridecodebin is missing (gstreamer1.0-plugins-base)")?;
    let convert = gst::ElementFactory::make("audioconvert").build()?;
    let classify = make_classifier(src)?;
    // In step with the clock, so that a file plays as a live source would.
    let sink = gst::ElementFactory::make("fakesink")
        .property("sync", true)
        .build()?;
    pipeline.add_many([&decode, &convert, &classify, &sink])?;
    gst::Element::link_many([&convert, &classify, &sink])?;
    let convert_weak = convert.downgrade();
    decode.connect_pad_added(move |_, pad| {
        let Some(convert) = convert_weak.upgrade() else {
            return;
        };
        let is_audio = pad
            .current_caps()
            .or_else(|| Some(pad.query_caps(None)))
            .and_then(|c| c.structure(0).map(|s| s.name().starts_with("audio/")))
            .unwrap_or(false);
        if let Some(sinkpad) = convert.static_pad("sink")
            && is_audio
            && !sinkpad.is_linked()
        {
            let _ = pad.link(&sinkpad);
        }
    });
    let last_audio_ms = Arc::new(AtomicU64::new(0));
    let last = last_audio_ms.clone();
    classify
        .static_pad("sink")
        .context("valenceclassify has no sink pad")?
        .add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            last.store(now_ms(), Ordering::Relaxed);
            gst::PadProbeReturn::Ok
        });
    Ok(Run {
        pipeline,
        classify,
        last_audio_ms,
    })
}

/// Why a run ended.
enum Ended {
    Stopped,
    Failed(String),
}

/// Supervises source `i` until `stop` is set: runs, restarts with back-off, reports to `hub`.
pub fn supervise(
    i: usize,
    src: Source,
    hub: Arc<Hub>,
    sup: Supervision,
    mut jsonl: Option<Jsonl>,
    stop: Arc<AtomicBool>,
) {
    let mut backoff = sup.backoff;
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        if !first {
            hub.restarted(i);
        }
        first = false;
        hub.status(i, false, "starting", None);
        let started = Instant::now();
        let (ended, was_up_for) = match build(&src) {
            Ok(run) => {
                let r = play(i, &src, &run, &hub, &sup, jsonl.as_mut(), &stop);
                let _ = run.pipeline.set_state(gst::State::Null);
                r
            }
            Err(e) => (Ended::Failed(format!("{e:#}")), Duration::ZERO),
        };
        if let Some(j) = jsonl.as_mut() {
            j.flush();
        }
        match ended {
            Ended::Stopped => break,
            Ended::Failed(why) => {
                if was_up_for >= sup.healthy_after {
                    backoff = sup.backoff;
                }
                eprintln!(
                    "valence monitor: {}: {why}; restarting in {:.0} s (ran {:.0} s)",
                    src.name,
                    backoff.as_secs_f64(),
                    started.elapsed().as_secs_f64()
                );
                hub.status(i, false, "restarting", Some(why));
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(sup.max_backoff);
            }
        }
    }
    hub.status(i, false, "stopped", None);
}

fn error_text(e: &gst::message::Error) -> String {
    format!(
        "{}{}",
        e.error(),
        e.debug().map(|d| format!(" ({d})")).unwrap_or_default()
    )
}

/// Plays one run until it fails, ends (without `loop`), stalls or `stop` is set. Returns why,
/// and how long audio flowed.
fn play(
    i: usize,
    src: &Source,
    run: &Run,
    hub: &Hub,
    sup: &Supervision,
    mut jsonl: Option<&mut Jsonl>,
    stop: &AtomicBool,
) -> (Ended, Duration) {
    let Some(bus) = run.pipeline.bus() else {
        return (Ended::Failed("pipeline has no bus".into()), Duration::ZERO);
    };
    if run.pipeline.set_state(gst::State::Playing).is_err() {
        let why = bus
            .pop_filtered(&[gst::MessageType::Error])
            .and_then(|m| match m.view() {
                gst::MessageView::Error(e) => Some(error_text(e)),
                _ => None,
            })
            .unwrap_or_else(|| "the pipeline did not start".into());
        return (Ended::Failed(why), Duration::ZERO);
    }
    let started_ms = now_ms();
    let mut up_since: Option<Instant> = None;
    let mut next_check = Instant::now();
    let mut skipped_seen = 0u64;
    let mut stopping: Option<Instant> = None;
    loop {
        if stopping.is_none() && stop.load(Ordering::Relaxed) {
            // Let the element finish its windows, briefly.
            run.pipeline.send_event(gst::event::Eos::new());
            stopping = Some(Instant::now());
        }
        if stopping.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            return (Ended::Stopped, Duration::ZERO);
        }
        let up_for = up_since.map(|t| t.elapsed()).unwrap_or_default();
        if let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) {
            match msg.view() {
                gst::MessageView::Element(e) => {
                    if let Some(s) = e.structure()
                        && s.name() == "valence"
                        && let Ok(row) = row_from_structure(&src.name, s)
                    {
                        let latency = window_latency(&run.pipeline, s);
                        if let Some(j) = jsonl.as_deref_mut() {
                            j.write(&row);
                        }
                        for a in hub.window(i, row, latency) {
                            if let crate::hub::Event::Alert {
                                rule,
                                class,
                                state,
                                mean,
                                ..
                            } = a
                            {
                                eprintln!(
                                    "valence monitor: {}: alert {rule} {state} \
                                     ({class} at {mean:.2} over the last speech)",
                                    src.name
                                );
                            }
                        }
                    }
                }
                gst::MessageView::Eos(_) => {
                    if stopping.is_some() {
                        return (Ended::Stopped, up_for);
                    }
                    if src.looping {
                        let seek = run.pipeline.seek_simple(
                            gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT,
                            gst::ClockTime::ZERO,
                        );
                        if seek.is_ok() {
                            continue;
                        }
                        return (Ended::Failed("cannot seek back to loop".into()), up_for);
                    }
                    return (Ended::Failed("the source ended".into()), up_for);
                }
                gst::MessageView::Error(e) => {
                    return (Ended::Failed(error_text(e)), up_for);
                }
                _ => {}
            }
        }
        if Instant::now() >= next_check {
            next_check = Instant::now() + Duration::from_millis(500);
            let now = now_ms();
            let last = run.last_audio_ms.load(Ordering::Relaxed);
            let quiet_ms = now.saturating_sub(if last == 0 { started_ms } else { last });
            let up = last != 0 && quiet_ms < sup.down_after.as_millis() as u64;
            match (up, up_since) {
                (true, None) => up_since = Some(Instant::now()),
                (false, Some(_)) => up_since = None,
                _ => {}
            }
            hub.status(i, up, "playing", None);
            if stopping.is_none() && quiet_ms > sup.stall.as_millis() as u64 {
                return (
                    Ended::Failed(format!("no audio for {:.0} s", quiet_ms as f64 / 1e3)),
                    up_for,
                );
            }
            let skipped: u64 = run.classify.property("windows-skipped");
            let batch: f64 = run.classify.property("average-batch-size");
            let inference_ns: u64 = run.classify.property("average-inference-time");
            hub.element_figures(
                i,
                skipped.saturating_sub(skipped_seen),
                batch,
                inference_ns as f64 / 1e9,
            );
            skipped_seen = skipped_seen.max(skipped);
        }
    }
}

/// Seconds from a window's end to now, both in the pipeline's running time.
fn window_latency(pipeline: &gst::Pipeline, s: &gst::StructureRef) -> Option<f64> {
    let rt: u64 = s.get("running-time").ok()?;
    let dur: u64 = s.get("duration").ok()?;
    if rt == u64::MAX {
        return None;
    }
    let now = pipeline.current_running_time()?.nseconds();
    Some(now.saturating_sub(rt + dur) as f64 / 1e9)
}
