//! The element's side of the model's inference service ([`valence_model::serving::service`]): starting
//! it (in this process or on a Triton server), sending windows, collecting their results in
//! window order, and waiting for them (non-live) with no lock held.

use std::sync::Arc;
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;

use valence_model::audio::{self, Window};
use valence_model::serving::registry;
use valence_model::serving::service::{Backend, BatchConfig, Completed, InferenceService, Wait};
use valence_model::speech::{self, SileroVad, SpeechGate};

use super::results::WindowResult;
use super::settings::{Settings, batch_size_for};
use super::stream::State;
use super::{CAT, ValenceClassify};

/// A live element's windows in the service at most (one running, one queued per element, as a
/// worker thread with a one-slot queue had): a stream that outpaces inference skips windows
/// instead of building a queue.
const LIVE_MAX_IN_FLIGHT: usize = 2;

/// A window on its way: sent to the service, or with its result ready to publish.
pub(super) enum Pending {
    InFlight {
        id: u64,
        pts: gst::ClockTime,
        duration: gst::ClockTime,
    },
    Ready(WindowResult),
}

impl ValenceClassify {
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
    pub(super) fn start_remote(
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
    pub(super) fn start_local(
        &self,
        settings: &Settings,
    ) -> Result<Arc<InferenceService>, gst::ErrorMessage> {
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

    /// The speech detector for this element's windows: the model's own, or for a remote model
    /// the one `valence setup` installs, when there is one; none when `vad` is off. A detector
    /// that fails to load is a warning, not a failed start: windows are then not gated.
    pub(super) fn speech_detector(
        &self,
        settings: &Settings,
        backend: &dyn Backend,
    ) -> Option<Arc<SileroVad>> {
        if !settings.vad {
            return None;
        }
        if let Some(d) = backend.speech_detector() {
            return Some(d);
        }
        if !valence_triton::is_remote(&settings.model) {
            gst::info!(
                CAT,
                imp = self,
                "the model names no speech detector: windows are not gated"
            );
            return None;
        }
        let path = speech::default_detector_path();
        if !path.is_file() {
            gst::info!(
                CAT,
                imp = self,
                "no speech detector installed ({}): windows are not gated",
                path.display()
            );
            return None;
        }
        match speech::shared_detector(&path) {
            Ok(d) => Some(d),
            Err(e) => {
                gst::warning!(
                    CAT,
                    imp = self,
                    "speech detector not loaded, windows are not gated: {e:#}"
                );
                None
            }
        }
    }

    /// Moves delivered outcomes into `pending` and returns the ready results at its head, in
    /// window order. Never waits.
    pub(super) fn collect_ready(&self, state: &mut State) -> Vec<WindowResult> {
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
        let speech = done.speech.map(f64::from);
        match done.outcome {
            Ok(None) => {
                self.stats.no_speech.fetch_add(1, Ordering::Relaxed);
                state.pending[idx] = Pending::Ready(WindowResult::no_speech(pts, duration, speech));
            }
            Ok(Some(probs)) => {
                self.stats.classified.fetch_add(1, Ordering::Relaxed);
                state.warned_unavailable = false;
                self.stats
                    .inference_ns
                    .fetch_add(done.model_time.as_nanos() as u64, Ordering::Relaxed);
                self.stats
                    .batched_windows
                    .fetch_add(done.batch_size as u64, Ordering::Relaxed);
                let mut r =
                    WindowResult::classified(state.backend.labels(), pts, duration, &probs, speech);
                if r.confidence < state.settings.min_confidence {
                    r.label = "uncertain".into();
                }
                state.pending[idx] = Pending::Ready(r);
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
                        "Model server unreachable from window at {pts}: audio keeps flowing, \
                         windows fail (windows-failed) until it answers again: {e}"
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
    pub(super) fn settle<'a>(
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
    pub(super) fn submit(&self, state: &mut State, windows: Vec<Window>) {
        let live = state.live.unwrap_or(false);
        let min = state.backend.min_samples();
        for w in windows {
            let (pts, duration) = state.window_pts(&w);
            if w.samples.len() < min {
                let msg = gst::message::Warning::builder(
                    gst::StreamError::Decode,
                    &format!(
                        "Window at {pts} holds {} ms of audio, too short for the model ({} ms): \
                         reported as silence",
                        w.samples.len() / 16,
                        min / 16
                    ),
                )
                .src(&*self.obj())
                .build();
                state.outbox.push(msg);
            }
            if audio::rms_dbfs(&w.samples) < state.settings.silence_threshold
                || w.samples.len() < min
            {
                self.stats.silent.fetch_add(1, Ordering::Relaxed);
                let n = state.backend.labels().len();
                let speech = state.speech.as_ref().map(|_| 0.0);
                state
                    .pending
                    .push_back(Pending::Ready(WindowResult::silence(
                        pts, duration, n, speech,
                    )));
                continue;
            }
            if live && state.client.outstanding() >= LIVE_MAX_IN_FLIGHT {
                self.skip_window(state, pts, duration);
                continue;
            }
            let id = state.next_window_id;
            state.next_window_id += 1;
            let gate = state.speech.as_ref().map(|s| SpeechGate {
                stream: s.clone(),
                start: w.start,
                threshold: state.settings.speech_threshold,
                min_speech: state.settings.min_speech,
            });
            state.client.submit_gated(id, w.samples, gate);
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
}
