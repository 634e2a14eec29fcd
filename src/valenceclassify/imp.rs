//! Element implementation. Audio passes through in place; analysis happens on a 16 kHz mono
//! copy that is cut into windows and sent to the model's inference service
//! ([`valence_model::serving::service`]), which batches the windows of every element sharing the model.
//!
//! Non-live streams: the streaming thread submits each buffer's finished windows and waits for
//! their results (holding no lock), so every window is classified, in order, and results ride on
//! the buffer that completed the window. Live streams: the streaming thread never waits; an
//! element keeps at most two windows in the service, and a window that finds them all busy is
//! skipped, counted and reported with a QoS message. Results then ride on the first buffer
//! after they are ready. FLUSH_START and `stop()` cancel the element's queued windows and
//! return at once.
//!
//! The rooms: [`settings`] (properties), [`stream`] (cutting windows), [`timeline`] (following
//! timestamps), [`inference`] (the service client), [`results`] (messages and meta); this file
//! wires them into GStreamer's virtual methods.

use std::sync::{Arc, Mutex};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::subclass::base_transform::GenerateOutputSuccess;
use gst_base::subclass::prelude::*;
use once_cell::sync::Lazy;

use valence_model::audio::{self, StreamResampler, Windower};

mod inference;
mod results;
mod settings;
mod stream;
mod timeline;

use settings::{Settings, Stats};
use stream::State;

static CAT: Lazy<gst::DebugCategory> = Lazy::new(|| {
    gst::DebugCategory::new(
        "valenceclassify",
        gst::DebugColorFlags::empty(),
        Some("Speech valence classifier"),
    )
});

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
    /// Upstream's answer to a latency query (live, min, max), if it gives one.
    fn upstream_latency(&self) -> Option<(bool, gst::ClockTime, Option<gst::ClockTime>)> {
        let mut q = gst::query::Latency::new();
        let pad = self.obj().sink_pads().first()?.clone();
        pad.peer_query(&mut q).then(|| q.result())
    }

    /// Sends the buffer held back in non-live mode downstream (before a serialized event).
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
}

impl ObjectImpl for ValenceClassify {
    fn properties() -> &'static [glib::ParamSpec] {
        settings::properties()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        self.set_setting(value, pspec);
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        self.setting(pspec)
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
        self.stats.reset();
        let windower = Windower::new(
            audio::ns_to_samples(settings.window) as usize,
            audio::ns_to_samples(settings.hop) as usize,
        );
        let detector = self.speech_detector(&settings, backend.as_ref());
        let state = State::new(backend, client, windower, detector, settings.per_buffer());
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
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
        // A rate change mid-stream: audio held while its timestamps were judged goes in first
        // (at the old rate), then the old resampler is flushed into the windows so they
        // continue seamlessly; the timeline counts on at the new rate.
        self.settle_deviation(state);
        if let Some(r) = state.resampler.as_mut() {
            let rest = r.flush();
            self.take_16k(state, &rest);
        }
        state.timeline.set_rate(info.rate());
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
        let out = self.buffer_settings();
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(state) = guard.as_mut() else {
            return Err(gst::FlowError::Flushing);
        };
        state.settings = out;
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
                let out = self.buffer_settings();
                let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(state) = guard.as_mut() {
                    // Close the windows and wait for everything in flight, live or not.
                    self.end_stream(state);
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
                    state.any_window = false;
                    state.live = None;
                }
            }
            gst::EventView::Gap(_) => {
                let _ = self.push_held();
                let out = self.buffer_settings();
                let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let closed = match guard.as_mut() {
                    Some(state) if state.timeline.started() => {
                        self.end_window_stream(state);
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
            let Some((live, min, max)) = self.upstream_latency() else {
                return false;
            };
            q.set(live, min, max);
            return true;
        }
        BaseTransformImplExt::parent_query(self, direction, query)
    }
}
