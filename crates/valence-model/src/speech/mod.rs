//! Which stretches of a stream are speech: the Silero detector ([`silero`]) run over a stream
//! as it arrives ([`SpeechStream`]), and the share of a window's frames it calls speech.
//!
//! The element pushes each buffer's 16 kHz audio into its stream's queue (a copy, under a lock
//! held for that copy alone); the detector runs where inference runs, when a window of that
//! stream is about to be classified ([`crate::serving::service`]), over everything queued so
//! far, in order, with the state carried. The streaming thread never runs or waits for it.

pub mod silero;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Result;

pub use silero::{DEFAULT_THRESHOLD, FRAME, SileroVad, VadState};

/// The share of a window's frames that must be speech for it to be classified, by default:
/// chosen on the shared speech and non-speech clips (`valence bench --what vad`).
pub const DEFAULT_MIN_SPEECH: f32 = 0.05;

/// Where `valence setup` installs the detector, as manifests name it.
pub const DEFAULT_DETECTOR: &str = "@cache/detectors/silero_vad_16k.safetensors";

/// Where [`DEFAULT_DETECTOR`] lies in this machine's cache.
pub fn default_detector_path() -> PathBuf {
    crate::Manifest::resolve(Path::new(""), DEFAULT_DETECTOR)
}

/// Audio queued beyond this (a stream whose windows are all silent or skipped for a while, so
/// the detector is never asked) is dropped from the front, whole frames at a time; the
/// detector restarts after the gap and its frames count as unknown.
const MAX_QUEUED: usize = 30 * 16_000;
/// Frame probabilities kept behind the newest: more than any window (30 s) plus its hop.
const KEPT_FRAMES: usize = 64 * 16_000 / FRAME;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The process-wide copy of a detector file, loaded on first use.
pub fn shared_detector(path: &Path) -> Result<Arc<SileroVad>> {
    static LOADED: Mutex<Option<HashMap<PathBuf, Arc<SileroVad>>>> = Mutex::new(None);
    let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if let Some(v) = lock(&LOADED).get_or_insert_with(HashMap::new).get(&key) {
        return Ok(v.clone());
    }
    // Loaded with no lock held (1.2 MB: milliseconds, but a bad path must not stall others).
    let v = Arc::new(SileroVad::load(path)?);
    Ok(lock(&LOADED)
        .get_or_insert_with(HashMap::new)
        .entry(key)
        .or_insert(v)
        .clone())
}

#[derive(Default)]
struct Tracker {
    state: VadState,
    /// Samples after the last whole frame.
    carry: Vec<f32>,
    /// Speech probability of frames `first_frame..`; NaN where audio was dropped.
    probs: VecDeque<f32>,
    first_frame: u64,
}

/// Audio pushed and not yet run through the detector.
#[derive(Default)]
struct Queue {
    samples: Vec<f32>,
    /// Stream position (16 kHz samples) of `samples[0]`.
    start: u64,
}

/// One stream's speech detection: created when a window stream starts, dropped when it ends
/// (a discontinuity, a flush or new caps start a new one, so state never crosses them).
pub struct SpeechStream {
    detector: Arc<SileroVad>,
    queued: Mutex<Queue>,
    tracker: Mutex<Tracker>,
}

impl SpeechStream {
    pub fn new(detector: Arc<SileroVad>) -> Arc<Self> {
        Arc::new(Self {
            detector,
            queued: Mutex::new(Queue::default()),
            tracker: Mutex::new(Tracker::default()),
        })
    }

    /// Queues the stream's next 16 kHz samples (cheap: a copy; at most 30 s are kept queued).
    pub fn push(&self, samples: &[f32]) {
        let mut q = lock(&self.queued);
        q.samples.extend_from_slice(samples);
        if q.samples.len() > MAX_QUEUED {
            let excess = (q.samples.len() - MAX_QUEUED) as u64;
            let new_start = (q.start + excess).next_multiple_of(FRAME as u64);
            let drop = ((new_start - q.start) as usize).min(q.samples.len());
            q.samples.drain(..drop);
            q.start += drop as u64;
        }
    }

    /// Runs the detector over everything queued (on the caller's thread).
    fn catch_up(&self, t: &mut Tracker) {
        let (queued, start) = {
            let mut q = lock(&self.queued);
            let start = q.start;
            q.start += q.samples.len() as u64;
            (std::mem::take(&mut q.samples), start)
        };
        let frames_done = t.first_frame + t.probs.len() as u64;
        if start > frames_done * FRAME as u64 + t.carry.len() as u64 {
            // Audio was dropped while queued (from a frame boundary): its frames are unknown,
            // and the detector starts afresh after it.
            let gap = start / FRAME as u64 - frames_done;
            t.probs.extend(std::iter::repeat_n(f32::NAN, gap as usize));
            t.carry.clear();
            t.state = VadState::default();
        }
        let mut audio = std::mem::take(&mut t.carry);
        audio.extend_from_slice(&queued);
        let whole = audio.len() / FRAME * FRAME;
        let probs = self.detector.process(&mut t.state, &audio[..whole]);
        t.probs.extend(probs);
        t.carry = audio[whole..].to_vec();
        while t.probs.len() > KEPT_FRAMES {
            t.probs.pop_front();
            t.first_frame += 1;
        }
    }

    /// The share of the frames of samples `start..start + len` (16 kHz, counted from the
    /// stream's start) whose speech probability is at least `threshold`, after running the
    /// detector over what was queued. A frame belongs to the window its middle lies in; a
    /// window with no detected frame (shorter than a frame, or dropped) has no share.
    pub fn speech_share(&self, start: u64, len: usize, threshold: f32) -> Option<f32> {
        let mut t = lock(&self.tracker);
        self.catch_up(&mut t);
        let f = FRAME as u64;
        let first = (start + f / 2) / f;
        let end = (start + len as u64 + f / 2) / f;
        let (mut speech, mut known) = (0usize, 0usize);
        for frame in first.max(t.first_frame)..end {
            let Some(&p) = t.probs.get((frame - t.first_frame) as usize) else {
                break;
            };
            if p.is_nan() {
                continue;
            }
            known += 1;
            speech += (p >= threshold) as usize;
        }
        (known > 0).then(|| speech as f32 / known as f32)
    }

    /// Every whole frame's speech probability so far (a clip's, for evaluation).
    pub fn probabilities(&self) -> Vec<f32> {
        let mut t = lock(&self.tracker);
        self.catch_up(&mut t);
        t.probs.iter().copied().collect()
    }
}

/// How a window is gated: its stream, where it starts in it, and the settings that decide.
#[derive(Clone)]
pub struct SpeechGate {
    pub stream: Arc<SpeechStream>,
    /// First 16 kHz sample of the window, counted from the stream's start.
    pub start: u64,
    /// A frame is speech when its probability is at least this.
    pub threshold: f32,
    /// A window is classified when at least this share of its frames is speech.
    pub min_speech: f32,
}

impl SpeechGate {
    /// The window's speech share and whether it goes to the model (a window the detector could
    /// not judge goes, rather than being lost).
    pub fn judge(&self, len: usize) -> (Option<f32>, bool) {
        let share = self.stream.speech_share(self.start, len, self.threshold);
        (share, share.is_none_or(|s| s >= self.min_speech))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector() -> Arc<SileroVad> {
        Arc::new(SileroVad::from_bytes(&silero::tests::random_detector_bytes(2)).unwrap())
    }

    #[test]
    fn shares_come_from_the_frames_inside_the_window() {
        let v = detector();
        let s = SpeechStream::new(v.clone());
        let x: Vec<f32> = (0..FRAME * 20 + 100)
            .map(|i| (i as f32 * 0.01).sin())
            .collect();
        // Pushed in odd pieces, as buffers come.
        for piece in x.chunks(777) {
            s.push(piece);
        }
        let all = s.probabilities();
        assert_eq!(all, v.process(&mut VadState::default(), &x[..FRAME * 20]));
        let share = s.speech_share(FRAME as u64 * 4, FRAME * 10, 0.0).unwrap();
        assert_eq!(share, 1.0, "every frame is at least probability 0");
        let share = s.speech_share(FRAME as u64 * 4, FRAME * 10, 2.0).unwrap();
        assert_eq!(share, 0.0);
        let mid = all[4..14].iter().filter(|&&p| p >= all[8]).count() as f32 / 10.0;
        assert_eq!(
            s.speech_share(FRAME as u64 * 4, FRAME * 10, all[8]),
            Some(mid)
        );
        assert_eq!(s.speech_share(FRAME as u64 * 40, FRAME * 10, 0.5), None);
    }

    #[test]
    fn a_stream_nobody_asks_about_keeps_a_bounded_queue() {
        let s = SpeechStream::new(detector());
        s.push(&[0.1; 100]);
        assert_eq!(s.probabilities().len(), 0);
        // Far more than the queue holds, in pieces: the oldest whole frames are dropped.
        for _ in 0..15 {
            s.push(&vec![0.1; MAX_QUEUED / 10]);
        }
        assert!(lock(&s.queued).samples.len() <= MAX_QUEUED);
        let p = s.probabilities();
        assert_eq!(p.len(), (100 + 3 * MAX_QUEUED / 2) / FRAME);
        let unknown = p.iter().take_while(|x| x.is_nan()).count();
        assert!(unknown >= (MAX_QUEUED / 2) / FRAME, "{unknown}");
        assert!(p[unknown..].iter().all(|x| x.is_finite()));
        assert_eq!(
            s.speech_share(0, 5 * FRAME, 0.5),
            None,
            "dropped frames are unknown"
        );
        assert!(
            s.speech_share(((p.len() - 10) * FRAME) as u64, 5 * FRAME, 0.0)
                .is_some()
        );
    }
}
