//! Element implementation. Audio passes through in place; analysis happens on a 16 kHz mono
//! copy that is cut into windows and sent to the model's inference service
//! ([`valence_model::service`]), which batches the windows of every element sharing the model.
//!
//! Non-live streams: the streaming thread submits each buffer's finished windows and waits for
//! their results (holding no lock), so every window is classified, in order, and results ride on
//! the buffer that completed the window. Live streams: the streaming thread never waits; an
//! element keeps at most [`LIVE_MAX_IN_FLIGHT`] windows in the service, and a window that finds
//! them all busy is skipped, counted and reported with a QoS message. Results then ride on the
//! first buffer after they are ready. FLUSH_START and `stop()` cancel the element's queued
//! windows and return at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::base_transform::GenerateOutputSuccess;
use gst_base::subclass::prelude::*;
use once_cell::sync::Lazy;

use valence_model::audio::{self, StreamResampler, Window, Windower, samples_to_ns};
use valence_model::registry;
use valence_model::service::{Backend, BatchConfig, Client, Completed, InferenceService, Wait};

static CAT: Lazy<gst::DebugCategory> = Lazy::new(|| {
    gst::DebugCategory::new(
        "valenceclassify",
        gst::DebugColorFlags::empty(),
        Some("Speech valence classifier"),
    )
});

const DEFAULT_MODEL: &str = registry::DEFAULT_MODEL;
const DEFAULT_DEVICE: &str = "auto";
const DEFAULT_WINDOW: u64 = 3_000_000_000;
const DEFAULT_HOP: u64 = 1_000_000_000;
const DEFAULT_SILENCE_THRESHOLD: f64 = -60.0;
/// 0: automatic, see [`batch_size_for`].
const DEFAULT_BATCH_SIZE: u32 = 0;
/// No waiting by default: a lone stream keeps batch-1 latency, and windows that queue while a
/// batch runs still go together, which is when batches pay on a CPU (README, "Batching").
/// GPUs, where batches pay at any load, want a few milliseconds.
const DEFAULT_BATCH_TIMEOUT: u64 = 0;
/// The batch size `batch-size=0` means on a device: 8. On a GPU batches are what it is fast at;
/// on a CPU with the 8-bit kernels a batch of 4-8 windows costs less per window than single
/// ones, and with no batch timeout batches form only when windows queue anyway (measured in
/// README, "Batching": at 48 live streams 3.8 % skipped at 8 against 15.2 % at 1, equal below
/// saturation). The device stays a parameter so that a CPU default can differ again.
fn batch_size_for(setting: u32, _device_name: &str) -> usize {
    match setting {
        0 => 8,
        n => n as usize,
    }
}

/// A live element's windows in the service at most (one running, one queued per element, as a
/// worker thread with a one-slot queue had): a stream that outpaces inference skips windows
/// instead of building a queue.
const LIVE_MAX_IN_FLIGHT: usize = 2;
/// At EOS, audio not yet in any window is classified when there is at least this much.
const MIN_TAIL_NS: u64 = 1_000_000_000;
/// Timestamp jumps larger than this (between the expected and the actual PTS) restart windows.
const DISCONT_TOLERANCE_NS: u64 = 40_000_000;

#[derive(Debug, Clone)]
struct Settings {
    model: String,
    device: String,
    window: u64,
    hop: u64,
    post_messages: bool,
    attach_meta: bool,
    silence_threshold: f64,
    batch_size: u32,
    batch_timeout: u64,
    model_instance_id: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.into(),
            device: DEFAULT_DEVICE.into(),
            window: DEFAULT_WINDOW,
            hop: DEFAULT_HOP,
            post_messages: true,
            attach_meta: true,
            silence_threshold: DEFAULT_SILENCE_THRESHOLD,
            batch_size: DEFAULT_BATCH_SIZE,
            batch_timeout: DEFAULT_BATCH_TIMEOUT,
            model_instance_id: String::new(),
        }
    }
}

#[derive(Default)]
struct Stats {
    classified: AtomicU64,
    skipped: AtomicU64,
    silent: AtomicU64,
    /// Windows sent for inference that came back without a result.
    failed: AtomicU64,
    inference_ns: AtomicU64,
    /// Sum over classified windows of the size of the batch each ran in.
    batched_windows: AtomicU64,
}

/// How results leave the element, read from the settings once per buffer.
#[derive(Debug, Clone, Copy)]
struct Output {
    post_messages: bool,
    attach_meta: bool,
}

/// One window's outcome, ready to post and attach.
#[derive(Debug, Clone)]
struct WindowResult {
    pts: gst::ClockTime,
    duration: gst::ClockTime,
    label: String,
    confidence: f64,
    probabilities: Vec<f64>,
}

enum Pending {
    InFlight {
        id: u64,
        pts: gst::ClockTime,
        duration: gst::ClockTime,
    },
    Ready(WindowResult),
}

/// Everything that lives from `start` to `stop`.
struct State {
    /// The model the service runs: in this process, or on a Triton server.
    backend: Arc<dyn Backend>,
    /// This element's connection to the model's inference service.
    client: Arc<Client>,
    info: Option<gst_audio::AudioInfo>,
    resampler: Option<StreamResampler>,
    windower: Windower,
    /// PTS of 16 kHz sample 0 of the current window stream.
    anchor: Option<gst::ClockTime>,
    /// Input frames since the anchor, at the current input rate (for the expected next PTS).
    anchor_frames: u64,
    /// Input-rate frames counted before the last rate change, converted to ns.
    anchor_offset_ns: u64,
    live: Option<bool>,
    next_window_id: u64,
    pending: VecDeque<Pending>,
    /// Non-live: the last buffer, held until the next one or EOS so that windows completed by
    /// the end of the stream still have a buffer to ride on.
    held: Option<gst::Buffer>,
    warned_behind: bool,
    /// A warning about an unreachable model server was posted (cleared when windows are
    /// classified again, so that the next outage warns again).
    warned_unavailable: bool,
    /// Non-live: the model server stayed unreachable through the retries; the stream fails.
    server_lost: bool,
    /// Read from the settings once per buffer.
    silence_threshold: f64,
    /// Messages (warnings, QoS) made while the state is locked, posted once it is not: a bus
    /// sync handler may call back into the element.
    outbox: Vec<gst::Message>,
}

impl State {
    fn expected_pts(&self) -> Option<gst::ClockTime> {
        let info = self.info.as_ref()?;
        let ns = self.anchor_offset_ns
            + (self.anchor_frames as u128 * 1_000_000_000u128 / info.rate() as u128) as u64;
        self.anchor.map(|a| a + gst::ClockTime::from_nseconds(ns))
    }

    /// Forgets the window stream (after a discontinuity, a gap or a flush).
    fn restart_windows(&mut self) {
        self.windower.reset();
        if let Some(info) = &self.info {
            self.resampler = StreamResampler::new(info.rate()).ok();
        }
        self.anchor = None;
        self.anchor_frames = 0;
        self.anchor_offset_ns = 0;
    }

    fn window_pts(&self, w: &Window) -> (gst::ClockTime, gst::ClockTime) {
        let a = self.anchor.unwrap_or(gst::ClockTime::ZERO);
        (
            a + gst::ClockTime::from_nseconds(samples_to_ns(w.start)),
            gst::ClockTime::from_nseconds(samples_to_ns(w.len())),
        )
    }
}

#[derive(Default)]
pub struct ValenceClassify {
    settings: Mutex<Settings>,
    state: Mutex<Option<State>>,
    stats: Arc<Stats>,
}

#[glib::object_subclass]
impl ObjectSubclass for ValenceClassify {
    const NAME: &'static str = "GstValenceClassify";
    type Type = super::ValenceClassify;
    type ParentType = gst_base::BaseTransform;
}

impl ValenceClassify {
    fn silence_result(pts: gst::ClockTime, duration: gst::ClockTime, n: usize) -> WindowResult {
        WindowResult {
            pts,
            duration,
            label: "silence".into(),
            confidence: 0.0,
            probabilities: vec![1.0 / n as f64; n],
        }
    }

    fn make_result(
        state: &State,
        pts: gst::ClockTime,
        duration: gst::ClockTime,
        probs: &[f32],
    ) -> WindowResult {
        let (best, p) = valence_model::argmax(probs);
        WindowResult {
            pts,
            duration,
            label: state
                .backend
                .labels()
                .get(best)
                .cloned()
                .unwrap_or_default(),
            confidence: p as f64,
            probabilities: probs.iter().map(|&p| p as f64).collect(),
        }
    }

    /// The result structure shared by the bus message and the meta, fields in documented order.
    fn result_structure(&self, state: &State, r: &WindowResult) -> gst::Structure {
        let segment = self.obj().segment();
        let (stream_time, running_time) = match segment.downcast_ref::<gst::ClockTime>() {
            Some(seg) => (seg.to_stream_time(r.pts), seg.to_running_time(r.pts)),
            None => (None, None),
        };
        let mut s = gst::Structure::builder("valence")
            .field("timestamp", r.pts.nseconds())
            .field(
                "stream-time",
                stream_time.map(|t| t.nseconds()).unwrap_or(u64::MAX),
            )
            .field(
                "running-time",
                running_time.map(|t| t.nseconds()).unwrap_or(u64::MAX),
            )
            .field("duration", r.duration.nseconds())
            .field("label", r.label.as_str())
            .field("confidence", r.confidence)
            .build();
        for (name, p) in state.backend.labels().iter().zip(&r.probabilities) {
            s.set(name.as_str(), *p);
        }
        s.set("model", state.backend.name());
        s
    }

    /// Attaches results to `buf` as ValenceMeta (making it writable only then) and queues
    /// their element messages in the outbox, per the settings read for this buffer.
    fn publish(
        &self,
        state: &mut State,
        out: Output,
        results: &[WindowResult],
        buf: Option<&mut gst::Buffer>,
    ) {
        if results.is_empty() {
            return;
        }
        let structures: Vec<gst::Structure> = results
            .iter()
            .map(|r| self.result_structure(state, r))
            .collect();
        if out.attach_meta
            && let Some(buf) = buf
        {
            crate::register_meta();
            let buf = buf.make_mut();
            for s in &structures {
                match gst::meta::CustomMeta::add(buf, crate::META_NAME) {
                    Ok(mut m) => {
                        let ms = m.mut_structure();
                        for (k, v) in s.iter() {
                            ms.set_value(k, v.clone());
                        }
                    }
                    Err(e) => gst::warning!(CAT, imp = self, "cannot add meta: {e}"),
                }
            }
        }
        if out.post_messages {
            for s in structures {
                let msg = gst::message::Element::builder(s).src(&*self.obj()).build();
                state.outbox.push(msg);
            }
        }
    }

    fn error_message<T: gst::MessageErrorDomain>(&self, domain: T, text: &str) -> gst::Message {
        gst::message::Error::builder(domain, text)
            .src(&*self.obj())
            .build()
    }

    /// Posts what the outbox held; called with no lock held.
    fn post_all(&self, messages: Vec<gst::Message>) {
        for m in messages {
            let _ = self.obj().post_message(m);
        }
    }

    /// The settings one buffer is handled with, read once (before the state lock is taken,
    /// so the two locks are never held together).
    fn output_settings(&self) -> (Output, f64) {
        let s = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        (
            Output {
                post_messages: s.post_messages,
                attach_meta: s.attach_meta,
            },
            s.silence_threshold,
        )
    }

    /// Sends the buffer held back in non-live mode downstream (before a serialized event).
    fn batch_config(&self, settings: &Settings, device_name: &str) -> BatchConfig {
        BatchConfig {
            max_batch: batch_size_for(settings.batch_size, device_name),
            timeout: Duration::from_nanos(settings.batch_timeout),
        }
    }

    fn log_service_config(&self, service: &InferenceService, asked: BatchConfig) {
        if service.config() != asked {
            gst::info!(
                CAT,
                imp = self,
                "the model's service runs with {:?} (set by the element that started it), not {:?}",
                service.config(),
                asked
            );
        }
    }

    /// A model on a Triton server: connects and checks it (in the state change, not on a
    /// streaming thread); an unreachable server or a mismatched model fails the start.
    fn start_remote(
        &self,
        settings: &Settings,
    ) -> Result<Arc<InferenceService>, gst::ErrorMessage> {
        let config = self.batch_config(settings, "remote");
        let service =
            valence_triton::shared_service(&settings.model, &settings.model_instance_id, config)
                .map_err(|e| {
                    gst::error_msg!(
                        gst::ResourceError::OpenRead,
                        ("Cannot use remote model: {:#}", e)
                    )
                })?;
        self.log_service_config(&service, config);
        Ok(service)
    }

    /// A model in this process, loaded (once per process) on the device asked for.
    fn start_local(&self, settings: &Settings) -> Result<Arc<InferenceService>, gst::ErrorMessage> {
        let device = valence_model::parse_device(&settings.device).map_err(|e| {
            gst::error_msg!(
                gst::LibraryError::Settings,
                ("Bad device `{}`: {:#}", settings.device, e)
            )
        })?;
        let dir = registry::resolve_model(&settings.model).map_err(|e| {
            gst::error_msg!(gst::ResourceError::NotFound, ("Cannot find model: {:#}", e))
        })?;
        // Loading a large model takes seconds: say so (a failed load is an error naming it).
        let loading = registry::needs_load(&dir, &device);
        let load_msg = |kind, text: String| {
            gst::message::Progress::builder(kind, "load-model", &text)
                .src(&*self.obj())
                .build()
        };
        if loading {
            let _ = self.obj().post_message(load_msg(
                gst::ProgressType::Start,
                format!("Loading model {}", dir.display()),
            ));
        }
        let config = self.batch_config(settings, &valence_model::device_name(&device));
        let service = registry::shared_service(&dir, &device, &settings.model_instance_id, config)
            .map_err(|e| {
                if loading {
                    let _ = self.obj().post_message(load_msg(
                        gst::ProgressType::Error,
                        format!("Cannot load model {}", dir.display()),
                    ));
                }
                gst::error_msg!(
                    gst::ResourceError::OpenRead,
                    ("Cannot load model {}: {:#}", dir.display(), e)
                )
            })?;
        if loading {
            let _ = self.obj().post_message(load_msg(
                gst::ProgressType::Complete,
                format!("Loaded model {}", dir.display()),
            ));
        }
        self.log_service_config(&service, config);
        Ok(service)
    }

    fn push_held(&self) -> Result<gst::FlowSuccess, gst::FlowError> {
        let held = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|s| s.held.take());
        match (held, self.obj().static_pad("src")) {
            (Some(b), Some(pad)) => pad.push(b),
            _ => Ok(gst::FlowSuccess::Ok),
        }
    }

    /// Moves delivered outcomes into `pending` and returns the ready results at its head, in
    /// window order. Never waits.
    fn collect_ready(&self, state: &mut State) -> Vec<WindowResult> {
        for done in state.client.take_done() {
            self.resolve(state, done);
        }
        let mut out = Vec::new();
        while let Some(Pending::Ready(_)) = state.pending.front() {
            if let Some(Pending::Ready(r)) = state.pending.pop_front() {
                out.push(r);
            }
        }
        out
    }

    fn resolve(&self, state: &mut State, done: Completed) {
        let Some(idx) = state
            .pending
            .iter()
            .position(|p| matches!(p, Pending::InFlight { id, .. } if *id == done.tag))
        else {
            return; // from before a flush
        };
        let Pending::InFlight { pts, duration, .. } = state.pending[idx] else {
            return;
        };
        match done.outcome {
            Ok(probs) => {
                self.stats.classified.fetch_add(1, Ordering::Relaxed);
                state.warned_unavailable = false;
                self.stats
                    .inference_ns
                    .fetch_add(done.model_time.as_nanos() as u64, Ordering::Relaxed);
                self.stats
                    .batched_windows
                    .fetch_add(done.batch_size as u64, Ordering::Relaxed);
                state.pending[idx] =
                    Pending::Ready(Self::make_result(state, pts, duration, &probs));
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                state.pending.remove(idx);
                let live = state.live.unwrap_or(false);
                if e.unavailable && !live {
                    // A file or other non-live source: a result missing for good is an error.
                    if !state.server_lost {
                        state.server_lost = true;
                        let msg = self.error_message(
                            gst::ResourceError::Read,
                            &format!("Window at {pts} not classified, model server lost: {e}"),
                        );
                        state.outbox.push(msg);
                    }
                    return;
                }
                if e.unavailable && state.warned_unavailable {
                    return; // live: one warning per outage; windows-failed counts the rest
                }
                state.warned_unavailable |= e.unavailable;
                let text = if e.unavailable {
                    format!(
                        "Model server unreachable from window at {pts}: audio keeps flowing,                          windows fail (windows-failed) until it answers again: {e}"
                    )
                } else {
                    format!("Window at {pts} not classified: {e}")
                };
                let msg = gst::message::Warning::builder(gst::StreamError::Failed, &text)
                    .src(&*self.obj())
                    .build();
                state.outbox.push(msg);
            }
        }
    }

    /// Non-live (or when `always`): waits until the windows this element has in the service
    /// have results, with no lock held (the outbox is posted first). Returns the state lock
    /// taken again, or None when the element flushed or stopped meanwhile.
    fn settle<'a>(
        &'a self,
        mut guard: MutexGuard<'a, Option<State>>,
        always: bool,
    ) -> Option<MutexGuard<'a, Option<State>>> {
        let state = guard.as_mut()?;
        let waits = always || !state.live.unwrap_or(false);
        let in_flight = state
            .pending
            .iter()
            .any(|p| matches!(p, Pending::InFlight { .. }));
        if !waits || !in_flight {
            return Some(guard);
        }
        let client = state.client.clone();
        let generation = client.generation();
        let messages = std::mem::take(&mut state.outbox);
        drop(guard);
        self.post_all(messages);
        if client.wait_idle(generation) == Wait::Cancelled {
            return None;
        }
        let guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(s) if Arc::ptr_eq(&s.client, &client) => Some(guard),
            _ => None,
        }
    }

    /// Sends windows to the inference service (or reports them as silence). Never waits.
    fn submit(&self, state: &mut State, windows: Vec<Window>) {
        let live = state.live.unwrap_or(false);
        let min = state.backend.min_samples();
        for w in windows {
            let (pts, duration) = state.window_pts(&w);
            if audio::rms_dbfs(&w.samples) < state.silence_threshold || w.samples.len() < min {
                self.stats.silent.fetch_add(1, Ordering::Relaxed);
                let n = state.backend.labels().len();
                state
                    .pending
                    .push_back(Pending::Ready(Self::silence_result(pts, duration, n)));
                continue;
            }
            if live && state.client.outstanding() >= LIVE_MAX_IN_FLIGHT {
                self.skip_window(state, pts, duration);
                continue;
            }
            let id = state.next_window_id;
            state.next_window_id += 1;
            state.client.submit(id, w.samples);
            state
                .pending
                .push_back(Pending::InFlight { id, pts, duration });
        }
    }

    fn skip_window(&self, state: &mut State, pts: gst::ClockTime, duration: gst::ClockTime) {
        let skipped = self.stats.skipped.fetch_add(1, Ordering::Relaxed) + 1;
        let processed = self.stats.classified.load(Ordering::Relaxed);
        gst::debug!(
            CAT,
            imp = self,
            "inference behind: skipping window at {pts}"
        );
        let segment = self.obj().segment();
        let seg = segment.downcast_ref::<gst::ClockTime>();
        let msg = gst::message::Qos::builder(true)
            .running_time(seg.and_then(|s| s.to_running_time(pts)))
            .stream_time(seg.and_then(|s| s.to_stream_time(pts)))
            .timestamp(pts)
            .duration(duration)
            .stats(
                gst::format::Default::from_u64(processed),
                gst::format::Default::from_u64(skipped),
            )
            .src(&*self.obj())
            .build();
        state.outbox.push(msg);
        if !state.warned_behind {
            state.warned_behind = true;
            let msg = gst::message::Warning::builder(
                gst::ResourceError::Busy,
                "Inference is slower than real time: skipping whole windows \
                 (see the windows-skipped property and QoS messages)",
            )
            .src(&*self.obj())
            .build();
            state.outbox.push(msg);
        }
    }

    fn query_live(&self) -> bool {
        let mut q = gst::query::Latency::new();
        if self
            .obj()
            .sink_pads()
            .first()
            .is_some_and(|p| p.peer_query(&mut q))
        {
            q.result().0
        } else {
            false
        }
    }

    /// Analyses one input buffer's samples: its finished windows go to the service.
    fn analyse(&self, state: &mut State, buf: &gst::BufferRef) -> Result<(), gst::FlowError> {
        let Some(info) = state.info.clone() else {
            let msg = self.error_message(gst::CoreError::Negotiation, "No caps before data");
            state.outbox.push(msg);
            return Err(gst::FlowError::NotNegotiated);
        };
        let Ok(map) = buf.map_readable() else {
            let msg = self.error_message(gst::ResourceError::Read, "Cannot map buffer");
            state.outbox.push(msg);
            return Err(gst::FlowError::Error);
        };
        let bpf = info.bpf() as usize;
        let frames = map.len() / bpf.max(1);
        let data = &map[..frames * bpf];
        if state.live.is_none() {
            state.live = Some(self.query_live());
            gst::debug!(CAT, imp = self, "live: {:?}", state.live);
        }

        // Discontinuities restart the windows: nothing is smeared across a gap.
        let pts = buf.pts();
        let jumped = match (pts, state.expected_pts()) {
            (Some(p), Some(e)) => p.nseconds().abs_diff(e.nseconds()) > DISCONT_TOLERANCE_NS,
            _ => false,
        };
        if (buf.flags().contains(gst::BufferFlags::DISCONT) && state.anchor.is_some()) || jumped {
            gst::debug!(
                CAT,
                imp = self,
                "discontinuity at {:?}: restarting windows",
                pts
            );
            self.close_window_stream(state);
        }
        if frames == 0 {
            return Ok(());
        }
        if state.anchor.is_none() {
            let seg_start = self
                .obj()
                .segment()
                .downcast_ref::<gst::ClockTime>()
                .and_then(|s| s.start())
                .unwrap_or(gst::ClockTime::ZERO);
            state.anchor = Some(pts.unwrap_or(seg_start));
        }
        state.anchor_frames += frames as u64;

        let channels = info.channels() as usize;
        let mono = match info.format() {
            gst_audio::AudioFormat::F32le => {
                let s: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                audio::downmix(&s, channels, |x| x)
            }
            gst_audio::AudioFormat::S16le => {
                let s: Vec<i16> = data
                    .chunks_exact(2)
                    .map(|c| i16::from_le_bytes([c[0], c[1]]))
                    .collect();
                audio::downmix(&s, channels, |x| x as f32 / 32768.0)
            }
            other => {
                let msg = self.error_message(
                    gst::CoreError::Negotiation,
                    &format!("Unsupported format {other:?}"),
                );
                state.outbox.push(msg);
                return Err(gst::FlowError::NotNegotiated);
            }
        };
        drop(map);
        let resampled = match state.resampler.as_mut() {
            Some(r) => r.process(&mono),
            None => mono,
        };
        let windows = state.windower.push(&resampled);
        self.submit(state, windows);
        Ok(())
    }

    /// Ends the current window stream: what is left in the resampler goes into the windows,
    /// and audio not yet in any window becomes a last window when it is long enough.
    fn close_window_stream(&self, state: &mut State) {
        if let Some(r) = state.resampler.as_mut() {
            let rest = r.flush();
            let windows = state.windower.push(&rest);
            self.submit(state, windows);
        }
        let min_tail = audio::ns_to_samples(MIN_TAIL_NS) as usize;
        if let Some(w) = state.windower.finish(min_tail) {
            self.submit(state, vec![w]);
        }
        state.restart_windows();
    }
}

impl ObjectImpl for ValenceClassify {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: Lazy<Vec<glib::ParamSpec>> = Lazy::new(|| {
            vec![
                glib::ParamSpecString::builder("model")
                    .nick("Model")
                    .blurb(
                        "Model directory (holding valence.json), the name of a model installed \
                         in the valence cache (`default` is the model `valence setup` installs), \
                         or triton://HOST:PORT/NAME[/VERSION] for a model exported with \
                         `valence export triton` on a Triton Inference Server (gRPC)",
                    )
                    .default_value(Some(DEFAULT_MODEL))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("device")
                    .nick("Device")
                    .blurb(
                        "Where inference runs: auto (CUDA when built with it and a GPU exists, \
                         else CPU), cpu, cuda or cuda:N",
                    )
                    .default_value(Some(DEFAULT_DEVICE))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt64::builder("window")
                    .nick("Window")
                    .blurb("Length of each analysis window in nanoseconds")
                    .minimum(500_000_000)
                    .maximum(30_000_000_000)
                    .default_value(DEFAULT_WINDOW)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt64::builder("hop")
                    .nick("Hop")
                    .blurb("Time between the starts of successive windows in nanoseconds")
                    .minimum(100_000_000)
                    .maximum(30_000_000_000)
                    .default_value(DEFAULT_HOP)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("post-messages")
                    .nick("Post messages")
                    .blurb("Post a `valence` element message on the bus for every window")
                    .default_value(true)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("attach-meta")
                    .nick("Attach meta")
                    .blurb("Attach each window's result to a buffer as ValenceMeta")
                    .default_value(true)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("silence-threshold")
                    .nick("Silence threshold")
                    .blurb(
                        "RMS level in dBFS under which a window is reported as `silence` and \
                         not classified",
                    )
                    .minimum(-144.0)
                    .maximum(0.0)
                    .default_value(DEFAULT_SILENCE_THRESHOLD)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("batch-size")
                    .nick("Batch size")
                    .blurb(
                        "The most windows the model's inference service runs at once (shared by \
                         the elements using the same model, device and model-instance-id; the \
                         first element to start sets it); 0: automatic (8)",
                    )
                    .minimum(0)
                    .maximum(256)
                    .default_value(DEFAULT_BATCH_SIZE)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt64::builder("batch-timeout")
                    .nick("Batch timeout")
                    .blurb(
                        "Longest time in nanoseconds a window waits for others to fill a batch \
                         (only when several elements share the service)",
                    )
                    .maximum(10_000_000_000)
                    .default_value(DEFAULT_BATCH_TIMEOUT)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("model-instance-id")
                    .nick("Model instance id")
                    .blurb(
                        "Elements with the same model, device and id share one inference \
                         service (weights are shared regardless); empty: one service per model \
                         and device",
                    )
                    .default_value(Some(""))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt64::builder("windows-classified")
                    .nick("Windows classified")
                    .blurb("Windows the model classified since the element started")
                    .read_only()
                    .build(),
                glib::ParamSpecUInt64::builder("windows-skipped")
                    .nick("Windows skipped")
                    .blurb("Windows dropped because inference fell behind a live stream")
                    .read_only()
                    .build(),
                glib::ParamSpecUInt64::builder("windows-failed")
                    .nick("Windows failed")
                    .blurb(
                        "Windows sent for inference that got no result (a remote model server \
                         unreachable, or a window the model refused)",
                    )
                    .read_only()
                    .build(),
                glib::ParamSpecUInt64::builder("windows-silent")
                    .nick("Windows silent")
                    .blurb("Windows reported as silence without inference")
                    .read_only()
                    .build(),
                glib::ParamSpecUInt64::builder("average-inference-time")
                    .nick("Average inference time")
                    .blurb(
                        "Mean model time per classified window in nanoseconds (a batch's time \
                         divided by its size)",
                    )
                    .read_only()
                    .build(),
                glib::ParamSpecDouble::builder("average-batch-size")
                    .nick("Average batch size")
                    .blurb("Mean size of the batches this element's windows ran in")
                    .read_only()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        match pspec.name() {
            "model" => {
                s.model = value
                    .get::<Option<String>>()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| DEFAULT_MODEL.into())
            }
            "device" => {
                s.device = value
                    .get::<Option<String>>()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| DEFAULT_DEVICE.into())
            }
            "window" => s.window = value.get().unwrap_or(DEFAULT_WINDOW),
            "hop" => s.hop = value.get().unwrap_or(DEFAULT_HOP),
            "post-messages" => s.post_messages = value.get().unwrap_or(true),
            "attach-meta" => s.attach_meta = value.get().unwrap_or(true),
            "silence-threshold" => {
                s.silence_threshold = value.get().unwrap_or(DEFAULT_SILENCE_THRESHOLD)
            }
            "batch-size" => s.batch_size = value.get().unwrap_or(DEFAULT_BATCH_SIZE),
            "batch-timeout" => s.batch_timeout = value.get().unwrap_or(DEFAULT_BATCH_TIMEOUT),
            "model-instance-id" => {
                s.model_instance_id = value
                    .get::<Option<String>>()
                    .ok()
                    .flatten()
                    .unwrap_or_default()
            }
            other => gst::warning!(CAT, imp = self, "unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        match pspec.name() {
            "model" => s.model.to_value(),
            "device" => s.device.to_value(),
            "window" => s.window.to_value(),
            "hop" => s.hop.to_value(),
            "post-messages" => s.post_messages.to_value(),
            "attach-meta" => s.attach_meta.to_value(),
            "silence-threshold" => s.silence_threshold.to_value(),
            "batch-size" => s.batch_size.to_value(),
            "batch-timeout" => s.batch_timeout.to_value(),
            "model-instance-id" => s.model_instance_id.to_value(),
            "windows-classified" => self.stats.classified.load(Ordering::Relaxed).to_value(),
            "windows-skipped" => self.stats.skipped.load(Ordering::Relaxed).to_value(),
            "windows-silent" => self.stats.silent.load(Ordering::Relaxed).to_value(),
            "windows-failed" => self.stats.failed.load(Ordering::Relaxed).to_value(),
            "average-inference-time" => {
                let n = self.stats.classified.load(Ordering::Relaxed);
                let t = self.stats.inference_ns.load(Ordering::Relaxed);
                t.checked_div(n).unwrap_or(0).to_value()
            }
            "average-batch-size" => {
                let n = self.stats.classified.load(Ordering::Relaxed);
                let b = self.stats.batched_windows.load(Ordering::Relaxed);
                if n == 0 { 0.0 } else { b as f64 / n as f64 }.to_value()
            }
            _ => glib::Value::from_type(pspec.value_type()),
        }
    }
}

impl GstObjectImpl for ValenceClassify {}

impl ElementImpl for ValenceClassify {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: Lazy<gst::subclass::ElementMetadata> = Lazy::new(|| {
            gst::subclass::ElementMetadata::new(
                "Speech valence classifier",
                "Filter/Analyzer/Audio",
                "Classifies the emotional valence of speech (negative, neutral, positive) in \
                 windows, posting element messages and attaching ValenceMeta; audio passes \
                 through unchanged",
                "gst-plugin-valence developers",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: Lazy<Vec<gst::PadTemplate>> = Lazy::new(|| {
            let caps = gst_audio::AudioCapsBuilder::new_interleaved()
                .format_list([gst_audio::AudioFormat::F32le, gst_audio::AudioFormat::S16le])
                .rate_range(8000..=96000)
                .channels_range(1..=8)
                .build();
            vec![
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &caps,
                )
                .expect("valid src template"),
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &caps,
                )
                .expect("valid sink template"),
            ]
        });
        TEMPLATES.as_ref()
    }
}

impl BaseTransformImpl for ValenceClassify {
    const MODE: gst_base::subclass::BaseTransformMode =
        gst_base::subclass::BaseTransformMode::AlwaysInPlace;
    const PASSTHROUGH_ON_SAME_CAPS: bool = false;
    const TRANSFORM_IP_ON_PASSTHROUGH: bool = false;

    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let settings = self
            .settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if settings.hop == 0 || settings.window == 0 {
            return Err(gst::error_msg!(
                gst::LibraryError::Settings,
                ("window and hop must be > 0")
            ));
        }
        let service = if valence_triton::is_remote(&settings.model) {
            self.start_remote(&settings)?
        } else {
            self.start_local(&settings)?
        };
        let backend = service.backend().clone();
        gst::info!(CAT, imp = self, "model {}", backend.describe());
        let client = Arc::new(service.client());
        for c in [
            &self.stats.classified,
            &self.stats.skipped,
            &self.stats.silent,
            &self.stats.failed,
            &self.stats.inference_ns,
            &self.stats.batched_windows,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        let window_samples = audio::ns_to_samples(settings.window) as usize;
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(State {
            backend,
            client,
            info: None,
            resampler: None,
            windower: Windower::new(window_samples, audio::ns_to_samples(settings.hop) as usize),
            anchor: None,
            anchor_frames: 0,
            anchor_offset_ns: 0,
            live: None,
            next_window_id: 0,
            pending: VecDeque::new(),
            held: None,
            warned_behind: false,
            warned_unavailable: false,
            server_lost: false,
            silence_threshold: settings.silence_threshold,
            outbox: Vec::new(),
        });
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        // Cancels this element's queued windows; a batch already running finishes without us.
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(state) = state {
            state.client.cancel();
        }
        Ok(())
    }

    fn set_caps(&self, incaps: &gst::Caps, _outcaps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let info = gst_audio::AudioInfo::from_caps(incaps)
            .map_err(|_| gst::loggable_error!(CAT, "Invalid caps {incaps}"))?;
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(state) = guard.as_mut() else {
            return Err(gst::loggable_error!(CAT, "Caps before start"));
        };
        // A rate change mid-stream: flush the old resampler into the windows so they continue
        // seamlessly, and rebase the expected-timestamp bookkeeping on the new rate.
        if let (Some(old), Some(r)) = (state.info.as_ref(), state.resampler.as_mut()) {
            let rest = r.flush();
            let windows = state.windower.push(&rest);
            state.anchor_offset_ns +=
                (state.anchor_frames as u128 * 1_000_000_000u128 / old.rate() as u128) as u64;
            state.anchor_frames = 0;
            self.submit(state, windows);
        }
        // Their results ride on the next buffers, ahead of anything later, in window order.
        let Some(mut guard) = self.settle(guard, false) else {
            return Err(gst::loggable_error!(CAT, "Flushed while changing caps"));
        };
        let Some(state) = guard.as_mut() else {
            return Err(gst::loggable_error!(CAT, "Caps before start"));
        };
        state.resampler =
            Some(StreamResampler::new(info.rate()).map_err(|e| {
                gst::loggable_error!(CAT, "Cannot resample from {}: {e}", info.rate())
            })?);
        state.info = Some(info);
        let messages = std::mem::take(&mut state.outbox);
        drop(guard);
        self.post_all(messages);
        Ok(())
    }

    fn generate_output(&self) -> Result<GenerateOutputSuccess, gst::FlowError> {
        let Some(mut buf) = self.take_queued_buffer() else {
            return Ok(GenerateOutputSuccess::NoOutput);
        };
        let (out, silence_threshold) = self.output_settings();
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(state) = guard.as_mut() else {
            return Err(gst::FlowError::Flushing);
        };
        state.silence_threshold = silence_threshold;
        if let Err(e) = self.analyse(state, &buf) {
            let messages = std::mem::take(&mut state.outbox);
            drop(guard);
            self.post_all(messages);
            return Err(e);
        }
        let Some(mut guard) = self.settle(guard, false) else {
            return Err(gst::FlowError::Flushing);
        };
        let Some(state) = guard.as_mut() else {
            return Err(gst::FlowError::Flushing);
        };
        let results = self.collect_ready(state);
        self.publish(state, out, &results, Some(&mut buf));
        if state.server_lost {
            let messages = std::mem::take(&mut state.outbox);
            drop(guard);
            self.post_all(messages);
            return Err(gst::FlowError::Error);
        }
        let ret = if state.live == Some(true) {
            GenerateOutputSuccess::Buffer(buf)
        } else {
            match state.held.replace(buf) {
                Some(prev) => GenerateOutputSuccess::Buffer(prev),
                None => GenerateOutputSuccess::NoOutput,
            }
        };
        let messages = std::mem::take(&mut state.outbox);
        drop(guard);
        self.post_all(messages);
        Ok(ret)
    }

    fn sink_event(&self, event: gst::Event) -> bool {
        match event.view() {
            gst::EventView::Eos(_) => {
                let (out, _) = self.output_settings();
                let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(state) = guard.as_mut() {
                    // Close the windows and wait for everything in flight, live or not.
                    self.close_window_stream(state);
                }
                if let Some(mut guard) = self.settle(guard, true)
                    && let Some(state) = guard.as_mut()
                {
                    let results = self.collect_ready(state);
                    let mut held = state.held.take();
                    self.publish(state, out, &results, held.as_mut());
                    let messages = std::mem::take(&mut state.outbox);
                    drop(guard);
                    self.post_all(messages);
                    if let (Some(b), Some(pad)) = (held, self.obj().static_pad("src")) {
                        let _ = pad.push(b);
                    }
                }
            }
            gst::EventView::FlushStart(_) => {
                // Cancelling wakes a streaming thread waiting for results (it returns
                // Flushing) and drops this element's queued windows.
                let client = self
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_mut()
                    .map(|state| {
                        state.held = None;
                        state.client.clone()
                    });
                if let Some(client) = client {
                    client.cancel();
                }
            }
            gst::EventView::FlushStop(_) => {
                let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(state) = guard.as_mut() {
                    // Results of windows before the flush are dropped; their ids no longer match.
                    state.pending.clear();
                    state.held = None;
                    state.restart_windows();
                    state.live = None;
                }
            }
            gst::EventView::Gap(_) => {
                let _ = self.push_held();
                let (out, _) = self.output_settings();
                let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let closed = match guard.as_mut() {
                    Some(state) if state.anchor.is_some() => {
                        self.close_window_stream(state);
                        true
                    }
                    _ => false,
                };
                if closed
                    && let Some(mut guard) = self.settle(guard, false)
                    && let Some(state) = guard.as_mut()
                {
                    let results = self.collect_ready(state);
                    self.publish(state, out, &results, None);
                    let messages = std::mem::take(&mut state.outbox);
                    drop(guard);
                    self.post_all(messages);
                }
            }
            _ if event.is_serialized() => {
                // Caps, segments, tags...: the held buffer belongs before them.
                let _ = self.push_held();
            }
            _ => (),
        }
        self.parent_sink_event(event)
    }

    fn query(&self, direction: gst::PadDirection, query: &mut gst::QueryRef) -> bool {
        if direction == gst::PadDirection::Src
            && let gst::QueryViewMut::Latency(q) = query.view_mut()
        {
            // Audio is never held back: buffers leave as soon as they arrive (results ride on
            // later buffers in live mode), so the element adds no latency to upstream's.
            let mut upstream = gst::query::Latency::new();
            if self
                .obj()
                .sink_pads()
                .first()
                .is_some_and(|p| p.peer_query(&mut upstream))
            {
                let (live, min, max) = upstream.result();
                q.set(live, min, max);
                return true;
            }
            return false;
        }
        BaseTransformImplExt::parent_query(self, direction, query)
    }
}
