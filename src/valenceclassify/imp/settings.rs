//! The element's properties: settings (written by `set_property`, read once per buffer or at
//! start) and the read-only counters.

use std::sync::atomic::{AtomicU64, Ordering};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use once_cell::sync::Lazy;

use valence_model::serving::registry;

use super::timeline::Alignment;
use super::{CAT, ValenceClassify};

pub(super) const DEFAULT_MODEL: &str = registry::DEFAULT_MODEL;
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
/// `GstAudioBaseSink`'s defaults: a timestamp within 40 ms of the sample count is continuous;
/// a larger deviation must last 1 s (without a DISCONT flag) to count as a discontinuity.
const DEFAULT_ALIGNMENT_THRESHOLD: u64 = 40_000_000;
const DEFAULT_DISCONT_WAIT: u64 = 1_000_000_000;
/// The element holds the audio of an undecided deviation: this bounds it.
const MAX_DISCONT_WAIT: u64 = 30_000_000_000;
/// Silero's own threshold on a 32 ms frame's speech probability.
const DEFAULT_SPEECH_THRESHOLD: f64 = valence_model::speech::DEFAULT_THRESHOLD as f64;
/// A window is classified when at least this share of its frames is speech.
const DEFAULT_MIN_SPEECH: f64 = valence_model::speech::DEFAULT_MIN_SPEECH as f64;

/// The batch size `batch-size=0` means on a device: 8. On a GPU batches are what it is fast at;
/// on a CPU with the 8-bit kernels a batch of 4-8 windows costs less per window than single
/// ones, and with no batch timeout batches form only when windows queue anyway (measured in
/// docs/performance.md: at 48 live streams 3.8 % skipped at 8 against 15.2 % at 1, equal below
/// saturation). The device stays a parameter so that a CPU default can differ again.
pub(super) fn batch_size_for(setting: u32, _device_name: &str) -> usize {
    match setting {
        0 => 8,
        n => n as usize,
    }
}

#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub model: String,
    pub device: String,
    pub window: u64,
    pub hop: u64,
    pub post_messages: bool,
    pub attach_meta: bool,
    pub silence_threshold: f64,
    pub batch_size: u32,
    pub batch_timeout: u64,
    pub model_instance_id: String,
    pub alignment_threshold: u64,
    pub discont_wait: u64,
    pub vad: bool,
    pub speech_threshold: f64,
    pub min_speech: f64,
    pub min_confidence: f64,
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
            alignment_threshold: DEFAULT_ALIGNMENT_THRESHOLD,
            discont_wait: DEFAULT_DISCONT_WAIT,
            vad: true,
            speech_threshold: DEFAULT_SPEECH_THRESHOLD,
            min_speech: DEFAULT_MIN_SPEECH,
            min_confidence: 0.0,
        }
    }
}

/// The settings one buffer is handled with, read once per buffer.
#[derive(Debug, Clone, Copy)]
pub(super) struct BufferSettings {
    pub post_messages: bool,
    pub attach_meta: bool,
    pub silence_threshold: f64,
    pub alignment: Alignment,
    pub speech_threshold: f32,
    pub min_speech: f32,
    pub min_confidence: f64,
}

impl Settings {
    pub fn per_buffer(&self) -> BufferSettings {
        BufferSettings {
            post_messages: self.post_messages,
            attach_meta: self.attach_meta,
            silence_threshold: self.silence_threshold,
            alignment: Alignment {
                threshold: self.alignment_threshold,
                discont_wait: self.discont_wait,
            },
            speech_threshold: self.speech_threshold as f32,
            min_speech: self.min_speech as f32,
            min_confidence: self.min_confidence,
        }
    }
}

/// Counters behind the read-only properties.
#[derive(Default)]
pub(super) struct Stats {
    pub classified: AtomicU64,
    pub skipped: AtomicU64,
    pub silent: AtomicU64,
    /// Windows the speech gate kept from the model.
    pub no_speech: AtomicU64,
    /// Windows sent for inference that came back without a result.
    pub failed: AtomicU64,
    pub inference_ns: AtomicU64,
    /// Sum over classified windows of the size of the batch each ran in.
    pub batched_windows: AtomicU64,
}

impl Stats {
    pub fn reset(&self) {
        for c in [
            &self.classified,
            &self.skipped,
            &self.silent,
            &self.no_speech,
            &self.failed,
            &self.inference_ns,
            &self.batched_windows,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

pub(super) fn properties() -> &'static [glib::ParamSpec] {
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
            glib::ParamSpecUInt64::builder("alignment-threshold")
                .nick("Alignment threshold")
                .blurb(
                    "Timestamp deviation in nanoseconds from the sample count up to which \
                     buffers count as continuous (drift and jitter are followed); as in \
                     audio sinks",
                )
                .minimum(1)
                .maximum(u64::MAX - 1)
                .default_value(DEFAULT_ALIGNMENT_THRESHOLD)
                .mutable_playing()
                .build(),
            glib::ParamSpecUInt64::builder("discont-wait")
                .nick("Discont wait")
                .blurb(
                    "How long in nanoseconds a larger deviation must last, on buffers not \
                     flagged DISCONT, before windows restart (0: at once); as in audio sinks",
                )
                .maximum(MAX_DISCONT_WAIT)
                .default_value(DEFAULT_DISCONT_WAIT)
                .mutable_playing()
                .build(),
            glib::ParamSpecBoolean::builder("vad")
                .nick("Speech detector")
                .blurb(
                    "Run the model's speech detector (Silero VAD) over the stream and give \
                     windows with too little speech the label `no-speech` instead of a valence \
                     (models that name no detector are not gated)",
                )
                .default_value(true)
                .mutable_ready()
                .build(),
            glib::ParamSpecDouble::builder("speech-threshold")
                .nick("Speech threshold")
                .blurb("Speech probability from which a 32 ms frame counts as speech")
                .minimum(0.0)
                .maximum(1.0)
                .default_value(DEFAULT_SPEECH_THRESHOLD)
                .mutable_playing()
                .build(),
            glib::ParamSpecDouble::builder("min-speech")
                .nick("Minimum speech")
                .blurb(
                    "Share of a window's frames that must be speech for it to be classified; \
                     windows with less are reported as `no-speech`",
                )
                .minimum(0.0)
                .maximum(1.0)
                .default_value(DEFAULT_MIN_SPEECH)
                .mutable_playing()
                .build(),
            glib::ParamSpecDouble::builder("min-confidence")
                .nick("Minimum confidence")
                .blurb(
                    "Classified windows whose winning probability is below this get the label \
                     `uncertain` (their probabilities kept); 0: off",
                )
                .minimum(0.0)
                .maximum(1.0)
                .default_value(0.0)
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
            glib::ParamSpecUInt64::builder("windows-no-speech")
                .nick("Windows without speech")
                .blurb("Windows the speech detector kept from the model (label `no-speech`)")
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

fn string_or(value: &glib::Value, default: &str) -> String {
    value
        .get::<Option<String>>()
        .ok()
        .flatten()
        .unwrap_or_else(|| default.into())
}

impl ValenceClassify {
    pub(super) fn set_setting(&self, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        match pspec.name() {
            "model" => s.model = string_or(value, DEFAULT_MODEL),
            "device" => s.device = string_or(value, DEFAULT_DEVICE),
            "window" => s.window = value.get().unwrap_or(DEFAULT_WINDOW),
            "hop" => s.hop = value.get().unwrap_or(DEFAULT_HOP),
            "post-messages" => s.post_messages = value.get().unwrap_or(true),
            "attach-meta" => s.attach_meta = value.get().unwrap_or(true),
            "silence-threshold" => {
                s.silence_threshold = value.get().unwrap_or(DEFAULT_SILENCE_THRESHOLD)
            }
            "alignment-threshold" => {
                s.alignment_threshold = value.get().unwrap_or(DEFAULT_ALIGNMENT_THRESHOLD)
            }
            "discont-wait" => s.discont_wait = value.get().unwrap_or(DEFAULT_DISCONT_WAIT),
            "vad" => s.vad = value.get().unwrap_or(true),
            "speech-threshold" => {
                s.speech_threshold = value.get().unwrap_or(DEFAULT_SPEECH_THRESHOLD)
            }
            "min-speech" => s.min_speech = value.get().unwrap_or(DEFAULT_MIN_SPEECH),
            "min-confidence" => s.min_confidence = value.get().unwrap_or(0.0),
            "batch-size" => s.batch_size = value.get().unwrap_or(DEFAULT_BATCH_SIZE),
            "batch-timeout" => s.batch_timeout = value.get().unwrap_or(DEFAULT_BATCH_TIMEOUT),
            "model-instance-id" => s.model_instance_id = string_or(value, ""),
            other => gst::warning!(CAT, imp = self, "unknown property {other}"),
        }
    }

    pub(super) fn setting(&self, pspec: &glib::ParamSpec) -> glib::Value {
        let stats = &self.stats;
        let s = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        match pspec.name() {
            "model" => s.model.to_value(),
            "device" => s.device.to_value(),
            "window" => s.window.to_value(),
            "hop" => s.hop.to_value(),
            "post-messages" => s.post_messages.to_value(),
            "attach-meta" => s.attach_meta.to_value(),
            "silence-threshold" => s.silence_threshold.to_value(),
            "alignment-threshold" => s.alignment_threshold.to_value(),
            "discont-wait" => s.discont_wait.to_value(),
            "vad" => s.vad.to_value(),
            "speech-threshold" => s.speech_threshold.to_value(),
            "min-speech" => s.min_speech.to_value(),
            "min-confidence" => s.min_confidence.to_value(),
            "batch-size" => s.batch_size.to_value(),
            "batch-timeout" => s.batch_timeout.to_value(),
            "model-instance-id" => s.model_instance_id.to_value(),
            "windows-classified" => stats.classified.load(Ordering::Relaxed).to_value(),
            "windows-skipped" => stats.skipped.load(Ordering::Relaxed).to_value(),
            "windows-silent" => stats.silent.load(Ordering::Relaxed).to_value(),
            "windows-no-speech" => stats.no_speech.load(Ordering::Relaxed).to_value(),
            "windows-failed" => stats.failed.load(Ordering::Relaxed).to_value(),
            "average-inference-time" => {
                let n = stats.classified.load(Ordering::Relaxed);
                let t = stats.inference_ns.load(Ordering::Relaxed);
                t.checked_div(n).unwrap_or(0).to_value()
            }
            "average-batch-size" => {
                let n = stats.classified.load(Ordering::Relaxed);
                let b = stats.batched_windows.load(Ordering::Relaxed);
                if n == 0 { 0.0 } else { b as f64 / n as f64 }.to_value()
            }
            _ => glib::Value::from_type(pspec.value_type()),
        }
    }

    /// The settings one buffer is handled with, read once (before the state lock is taken,
    /// so the two locks are never held together).
    pub(super) fn buffer_settings(&self) -> BufferSettings {
        self.settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .per_buffer()
    }
}
