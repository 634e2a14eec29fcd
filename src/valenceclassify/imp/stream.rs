//! The stream state and how windows are cut: each buffer's audio is mixed to mono, resampled
//! to 16 kHz and counted into windows; its timestamp is checked against the count
//! ([`super::timeline`]) so that drift and jitter are followed and only a real gap or overlap
//! restarts the windows.

use std::collections::VecDeque;
use std::sync::Arc;

use gst::subclass::prelude::*;
use gst_base::prelude::*;

use valence_model::audio::{self, StreamResampler, Window, Windower, samples_to_ns};
use valence_model::serving::service::{Backend, Client};
use valence_model::speech::{SileroVad, SpeechStream};

use super::inference::Pending;
use super::settings::BufferSettings;
use super::timeline::{Timeline, Verdict};
use super::{CAT, ValenceClassify};

/// At EOS, audio not yet in any window is classified when there is at least this much.
const MIN_TAIL_NS: u64 = 1_000_000_000;

/// One buffer's audio, mixed to mono at the input rate.
pub(super) struct Chunk {
    pts: Option<u64>,
    mono: Vec<f32>,
}

impl Chunk {
    fn frames(&self) -> u64 {
        self.mono.len() as u64
    }
}

/// Everything that lives from `start` to `stop`.
pub(super) struct State {
    /// The model the service runs: in this process, or on a Triton server.
    pub backend: Arc<dyn Backend>,
    /// This element's connection to the model's inference service.
    pub client: Arc<Client>,
    pub info: Option<gst_audio::AudioInfo>,
    pub resampler: Option<StreamResampler>,
    pub windower: Windower,
    /// The speech detector gating this element's windows (None: no gate).
    pub detector: Option<Arc<SileroVad>>,
    /// The detector's view of the current window stream.
    pub speech: Option<Arc<SpeechStream>>,
    /// The settings of the buffer being handled (read once per buffer).
    pub settings: BufferSettings,
    /// Whether any window was cut since the element started or flushed: a stream too short
    /// for one still gets its audio classified at EOS.
    pub any_window: bool,
    /// Where the timestamps say the window stream's audio is.
    pub timeline: Timeline,
    /// Buffers whose timestamps deviate, held until the deviation is judged (jitter: they
    /// continue the windows; a discontinuity: the windows restart where they began).
    pub deviating: Vec<Chunk>,
    pub live: Option<bool>,
    pub next_window_id: u64,
    pub pending: VecDeque<Pending>,
    /// Non-live: the last buffer, held until the next one or EOS so that windows completed by
    /// the end of the stream still have a buffer to ride on.
    pub held: Option<gst::Buffer>,
    pub warned_behind: bool,
    /// A warning about an unreachable model server was posted (cleared when windows are
    /// classified again, so that the next outage warns again).
    pub warned_unavailable: bool,
    /// Non-live: the model server stayed unreachable through the retries; the stream fails.
    pub server_lost: bool,
    /// Messages (warnings, QoS) made while the state is locked, posted once it is not: a bus
    /// sync handler may call back into the element.
    pub outbox: Vec<gst::Message>,
}

impl State {
    pub fn new(
        backend: Arc<dyn Backend>,
        client: Arc<Client>,
        windower: Windower,
        detector: Option<Arc<SileroVad>>,
        settings: BufferSettings,
    ) -> Self {
        Self {
            backend,
            client,
            info: None,
            resampler: None,
            windower,
            speech: detector.clone().map(SpeechStream::new),
            detector,
            settings,
            any_window: false,
            timeline: Timeline::default(),
            deviating: Vec::new(),
            live: None,
            next_window_id: 0,
            pending: VecDeque::new(),
            held: None,
            warned_behind: false,
            warned_unavailable: false,
            server_lost: false,
            outbox: Vec::new(),
        }
    }

    /// Forgets the window stream (after a discontinuity, a gap or a flush).
    pub fn restart_windows(&mut self) {
        self.windower.reset();
        if let Some(info) = &self.info {
            self.resampler = StreamResampler::new(info.rate()).ok();
        }
        self.timeline.restart();
        self.deviating.clear();
        // The detector's state never crosses a discontinuity, a flush or new caps.
        self.speech = self.detector.clone().map(SpeechStream::new);
    }

    /// A window's PTS (following the stream's timestamps) and duration (its sample count).
    pub fn window_pts(&mut self, w: &Window) -> (gst::ClockTime, gst::ClockTime) {
        let pts = self.timeline.pts_at(samples_to_ns(w.start));
        (
            gst::ClockTime::from_nseconds(pts),
            gst::ClockTime::from_nseconds(samples_to_ns(w.len())),
        )
    }
}

impl ValenceClassify {
    fn segment_start(&self) -> u64 {
        self.obj()
            .segment()
            .downcast_ref::<gst::ClockTime>()
            .and_then(|s| s.start())
            .map(|t| t.nseconds())
            .unwrap_or(0)
    }

    /// Analyses one input buffer's samples: its finished windows go to the service.
    pub(super) fn analyse(
        &self,
        state: &mut State,
        buf: &gst::BufferRef,
    ) -> Result<(), gst::FlowError> {
        let Some(info) = state.info.clone() else {
            let msg = self.error_message(gst::CoreError::Negotiation, "No caps before data");
            state.outbox.push(msg);
            return Err(gst::FlowError::NotNegotiated);
        };
        if state.live.is_none() {
            state.live = Some(self.upstream_latency().is_some_and(|(live, _, _)| live));
            gst::debug!(CAT, imp = self, "live: {:?}", state.live);
        }
        let chunk = Chunk {
            pts: buf.pts().map(|t| t.nseconds()),
            mono: self.mix_to_mono(state, &info, buf)?,
        };
        let discont = buf.flags().contains(gst::BufferFlags::DISCONT);
        if chunk.mono.is_empty() {
            // No audio, but a flagged jump still ends the windows before it.
            let alignment = state.settings.alignment;
            if state.timeline.classify(chunk.pts, 0, discont, alignment) == Verdict::Discont {
                self.end_window_stream(state);
            }
            return Ok(());
        }
        self.take_chunk(state, chunk, discont);
        Ok(())
    }

    fn mix_to_mono(
        &self,
        state: &mut State,
        info: &gst_audio::AudioInfo,
        buf: &gst::BufferRef,
    ) -> Result<Vec<f32>, gst::FlowError> {
        let Ok(map) = buf.map_readable() else {
            let msg = self.error_message(gst::ResourceError::Read, "Cannot map buffer");
            state.outbox.push(msg);
            return Err(gst::FlowError::Error);
        };
        let bpf = info.bpf() as usize;
        let frames = map.len() / bpf.max(1);
        let data = &map[..frames * bpf];
        let channels = info.channels() as usize;
        match info.format() {
            gst_audio::AudioFormat::F32le => {
                let s: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Ok(audio::downmix(&s, channels, |x| x))
            }
            gst_audio::AudioFormat::S16le => {
                let s: Vec<i16> = data
                    .chunks_exact(2)
                    .map(|c| i16::from_le_bytes([c[0], c[1]]))
                    .collect();
                Ok(audio::downmix(&s, channels, |x| x as f32 / 32768.0))
            }
            other => {
                let msg = self.error_message(
                    gst::CoreError::Negotiation,
                    &format!("Unsupported format {other:?}"),
                );
                state.outbox.push(msg);
                Err(gst::FlowError::NotNegotiated)
            }
        }
    }

    /// Places one buffer's audio on the timeline: it continues the windows, waits while its
    /// deviation is judged, or starts new windows after a discontinuity.
    fn take_chunk(&self, state: &mut State, chunk: Chunk, discont: bool) {
        let alignment = state.settings.alignment;
        loop {
            match state
                .timeline
                .classify(chunk.pts, chunk.frames(), discont, alignment)
            {
                Verdict::Aligned => {
                    // What was held deviated only for a moment: it continues the windows.
                    self.settle_deviation(state);
                    self.feed(state, chunk, true);
                    return;
                }
                Verdict::Hold => {
                    state.timeline.hold(chunk.pts, chunk.frames());
                    state.deviating.push(chunk);
                    return;
                }
                Verdict::Discont if !state.deviating.is_empty() => {
                    // The discontinuity began at the first held buffer; then judge this one
                    // against the timeline the held ones start.
                    self.restart_from_deviating(state);
                }
                Verdict::Discont => {
                    gst::debug!(
                        CAT,
                        imp = self,
                        "discontinuity at {:?}: restarting windows",
                        chunk.pts.map(gst::ClockTime::from_nseconds)
                    );
                    self.close_window_stream(state, false);
                    self.feed(state, chunk, true);
                    return;
                }
            }
        }
    }

    /// Resamples a chunk into the windows and sends the windows it completes.
    fn feed(&self, state: &mut State, chunk: Chunk, marked: bool) {
        let origin = if state.timeline.started() {
            0
        } else {
            self.segment_start()
        };
        state
            .timeline
            .take(chunk.pts, chunk.frames(), marked, origin);
        let resampled = match state.resampler.as_mut() {
            Some(r) => r.process(&chunk.mono),
            None => chunk.mono,
        };
        self.take_16k(state, &resampled);
    }

    /// 16 kHz audio of the window stream: to the speech detector's queue and the windows.
    pub(super) fn take_16k(&self, state: &mut State, samples: &[f32]) {
        if let Some(s) = &state.speech {
            s.push(samples);
        }
        let windows = state.windower.push(samples);
        state.any_window |= !windows.is_empty();
        self.submit(state, windows);
    }

    /// A deviation judged a discontinuity: the windows before it end, and new ones start with
    /// the held audio, on its own timestamps.
    fn restart_from_deviating(&self, state: &mut State) {
        let held = std::mem::take(&mut state.deviating);
        gst::debug!(
            CAT,
            imp = self,
            "discontinuity at {:?}: restarting windows",
            held.first()
                .and_then(|c| c.pts)
                .map(gst::ClockTime::from_nseconds)
        );
        self.close_window_stream(state, false);
        for chunk in held {
            self.feed(state, chunk, true);
        }
    }

    /// Held audio whose deviation did not last `discont-wait` (the timestamps came back, the
    /// stream ends, a gap or new caps come) continues the windows, on the timeline before it.
    pub(super) fn settle_deviation(&self, state: &mut State) {
        for held in std::mem::take(&mut state.deviating) {
            self.feed(state, held, false);
        }
    }

    /// Ends the window stream at a gap: held audio first, then the last windows.
    pub(super) fn end_window_stream(&self, state: &mut State) {
        self.settle_deviation(state);
        self.close_window_stream(state, false);
    }

    /// Ends the stream at EOS: as at a gap, except that a stream too short for any window
    /// has what there is classified (never silence for a short input).
    pub(super) fn end_stream(&self, state: &mut State) {
        self.settle_deviation(state);
        self.close_window_stream(state, true);
    }

    /// Ends the current window stream: what is left in the resampler goes into the windows,
    /// and audio not yet in any window becomes a last window when it is long enough (at the
    /// end of a stream that had no window at all, whatever its length).
    fn close_window_stream(&self, state: &mut State, at_eos: bool) {
        if let Some(r) = state.resampler.as_mut() {
            let rest = r.flush();
            self.take_16k(state, &rest);
        }
        let min_tail = if at_eos && !state.any_window {
            1
        } else {
            audio::ns_to_samples(MIN_TAIL_NS) as usize
        };
        if let Some(w) = state.windower.finish(min_tail) {
            state.any_window = true;
            self.submit(state, vec![w]);
        }
        state.restart_windows();
    }
}
