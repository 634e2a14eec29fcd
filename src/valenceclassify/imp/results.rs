//! A window's outcome and how it leaves the element: a `valence` element message on the bus
//! and `ValenceMeta` on a buffer, with the same fields in the documented order. Messages are
//! queued in the state's outbox and posted once no lock is held.

use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;

use super::settings::BufferSettings;
use super::stream::State;
use super::{CAT, ValenceClassify};

/// One window's outcome, ready to post and attach.
#[derive(Debug, Clone)]
pub(super) struct WindowResult {
    pub pts: gst::ClockTime,
    pub duration: gst::ClockTime,
    pub label: String,
    pub confidence: f64,
    /// Empty for `no-speech`: the model never saw the window.
    pub probabilities: Vec<f64>,
    /// The share of the window's frames the speech detector called speech (when it runs).
    pub speech: Option<f64>,
}

impl WindowResult {
    /// A window too quiet (or too short for the model) to classify.
    pub fn silence(
        pts: gst::ClockTime,
        duration: gst::ClockTime,
        n: usize,
        speech: Option<f64>,
    ) -> Self {
        Self {
            pts,
            duration,
            label: "silence".into(),
            confidence: 0.0,
            probabilities: vec![1.0 / n as f64; n],
            speech,
        }
    }

    /// A window the speech detector found too little speech in: no valence.
    pub fn no_speech(pts: gst::ClockTime, duration: gst::ClockTime, speech: Option<f64>) -> Self {
        Self {
            pts,
            duration,
            label: "no-speech".into(),
            confidence: 0.0,
            probabilities: Vec::new(),
            speech,
        }
    }

    /// A classified window: the most probable label and its probability.
    pub fn classified(
        labels: &[String],
        pts: gst::ClockTime,
        duration: gst::ClockTime,
        probs: &[f32],
        speech: Option<f64>,
    ) -> Self {
        let (best, p) = valence_model::argmax(probs);
        Self {
            pts,
            duration,
            label: labels.get(best).cloned().unwrap_or_default(),
            confidence: p as f64,
            probabilities: probs.iter().map(|&p| p as f64).collect(),
            speech,
        }
    }
}

impl ValenceClassify {
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
        if let Some(speech) = r.speech {
            s.set("speech", speech);
        }
        for (name, p) in state.backend.labels().iter().zip(&r.probabilities) {
            s.set(name.as_str(), *p);
        }
        s.set("model", state.backend.name());
        s
    }

    /// Attaches results to `buf` as ValenceMeta (making it writable only then) and queues
    /// their element messages in the outbox, per the settings read for this buffer.
    pub(super) fn publish(
        &self,
        state: &mut State,
        out: BufferSettings,
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

    pub(super) fn error_message<T: gst::MessageErrorDomain>(
        &self,
        domain: T,
        text: &str,
    ) -> gst::Message {
        gst::message::Error::builder(domain, text)
            .src(&*self.obj())
            .build()
    }

    /// Posts what the outbox held; called with no lock held.
    pub(super) fn post_all(&self, messages: Vec<gst::Message>) {
        for m in messages {
            let _ = self.obj().post_message(m);
        }
    }
}
