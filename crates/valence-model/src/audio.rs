//! Plain audio plumbing for the element: downmix, resampling to 16 kHz, windowing, levels.
//! No GStreamer here, so all of it is unit-tested directly.

use anyhow::{Result, bail};
use rubato::{FftFixedIn, Resampler};

/// The rate every model runs at.
pub const MODEL_RATE: u32 = 16000;

/// Largest sample magnitude the analysis sees (+36 dBFS): float audio far outside [-1, 1] is
/// garbage to classify anyway, and unbounded values overflow the resampler's FFT to NaN.
pub const MAX_ANALYSIS_AMPLITUDE: f32 = 64.0;

/// Averages interleaved channels into mono; NaN and ±Inf samples count as silence so one bad
/// sample cannot poison a whole window, and finite samples are clamped to
/// ±[`MAX_ANALYSIS_AMPLITUDE`].
pub fn downmix<T: Copy>(interleaved: &[T], channels: usize, to_f32: impl Fn(T) -> f32) -> Vec<f32> {
    let channels = channels.max(1);
    let scale = 1.0 / channels as f32;
    interleaved
        .chunks_exact(channels)
        .map(|frame| {
            frame
                .iter()
                .map(|&s| {
                    let v = to_f32(s);
                    if v.is_finite() {
                        v.clamp(-MAX_ANALYSIS_AMPLITUDE, MAX_ANALYSIS_AMPLITUDE)
                    } else {
                        0.0
                    }
                })
                .sum::<f32>()
                * scale
        })
        .collect()
}

/// Streaming mono resampler to 16 kHz (rubato's FFT resampler), with its delay removed so
/// that output sample `i` is the input instant `i / 16000` s.
pub struct StreamResampler {
    inner: Option<FftFixedIn<f32>>,
    in_rate: u32,
    pending: Vec<f32>,
    to_drop: usize,
    frames_in: u64,
    frames_out: u64,
}

impl StreamResampler {
    pub fn new(in_rate: u32) -> Result<Self> {
        if !(1000..=768_000).contains(&in_rate) {
            bail!("unsupported sample rate {in_rate}");
        }
        let (inner, to_drop) = if in_rate == MODEL_RATE {
            (None, 0)
        } else {
            let r = FftFixedIn::<f32>::new(in_rate as usize, MODEL_RATE as usize, 1024, 2, 1)?;
            let d = r.output_delay();
            (Some(r), d)
        };
        Ok(Self {
            inner,
            in_rate,
            pending: Vec::new(),
            to_drop,
            frames_in: 0,
            frames_out: 0,
        })
    }

    pub fn in_rate(&self) -> u32 {
        self.in_rate
    }

    /// 16 kHz samples the input so far corresponds to, rounded down.
    fn expected_out(&self) -> u64 {
        self.frames_in * MODEL_RATE as u64 / self.in_rate as u64
    }

    fn emit(&mut self, produced: &[f32], out: &mut Vec<f32>) {
        let skip = self.to_drop.min(produced.len());
        self.to_drop -= skip;
        out.extend_from_slice(&produced[skip..]);
    }

    pub fn process(&mut self, mono: &[f32]) -> Vec<f32> {
        self.frames_in += mono.len() as u64;
        let Some(r) = self.inner.as_mut() else {
            self.frames_out += mono.len() as u64;
            return mono.to_vec();
        };
        self.pending.extend_from_slice(mono);
        let mut out = Vec::new();
        let mut produced_all = Vec::new();
        let mut offset = 0;
        loop {
            let need = r.input_frames_next();
            if self.pending.len() - offset < need {
                break;
            }
            match r.process(&[&self.pending[offset..offset + need]], None) {
                Ok(mut o) => produced_all.append(&mut o[0]),
                Err(_) => break, // cannot happen with a correctly sized chunk
            }
            offset += need;
        }
        self.pending.drain(..offset);
        self.emit(&produced_all, &mut out);
        self.frames_out += out.len() as u64;
        out
    }

    /// Pushes out what is still inside the resampler (end of stream or a rate change).
    pub fn flush(&mut self) -> Vec<f32> {
        let expected = self.expected_out();
        let mut out = Vec::new();
        let mut produced_all = Vec::new();
        let mut next_delay = None;
        if let Some(r) = self.inner.as_mut() {
            // Feed zeros until the delay-free output covers all the input so far.
            let mut guard = 0;
            while self.frames_out + (produced_all.len().saturating_sub(self.to_drop) as u64)
                < expected
                && guard < 64
            {
                let mut chunk = std::mem::take(&mut self.pending);
                chunk.resize(r.input_frames_next(), 0.0);
                match r.process(&[&chunk], None) {
                    Ok(mut o) => produced_all.append(&mut o[0]),
                    Err(_) => break,
                }
                guard += 1;
            }
            r.reset();
            next_delay = Some(r.output_delay());
        }
        self.emit(&produced_all, &mut out);
        out.truncate(expected.saturating_sub(self.frames_out) as usize);
        if let Some(d) = next_delay {
            self.to_drop = d;
        }
        self.pending.clear();
        self.frames_out += out.len() as u64;
        out
    }
}

/// One analysis window in 16 kHz samples counted from the window stream's anchor.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub start: u64,
    pub samples: Vec<f32>,
}

impl Window {
    pub fn len(&self) -> u64 {
        self.samples.len() as u64
    }
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Cuts a sample stream into windows of `window` samples every `hop` samples.
///
/// ```
/// use valence_model::audio::Windower;
/// let mut w = Windower::new(4, 2);
/// let starts: Vec<u64> = w.push(&[0.0; 9]).iter().map(|w| w.start).collect();
/// assert_eq!(starts, [0, 2, 4]);
/// // 1 sample was never in a window: a tail needs at least `min_tail`.
/// assert!(w.finish(2).is_none());
/// ```
#[derive(Debug, Clone)]
pub struct Windower {
    window: usize,
    hop: usize,
    buf: Vec<f32>,
    /// Index of `buf[0]` in the stream.
    buf_start: u64,
    next_start: u64,
    /// End of the last window given out (0 when none).
    covered_until: u64,
}

impl Windower {
    pub fn new(window: usize, hop: usize) -> Self {
        Self {
            window: window.max(1),
            hop: hop.max(1),
            buf: Vec::new(),
            buf_start: 0,
            next_start: 0,
            covered_until: 0,
        }
    }

    /// Samples pushed since the last reset.
    pub fn end(&self) -> u64 {
        self.buf_start + self.buf.len() as u64
    }

    pub fn push(&mut self, samples: &[f32]) -> Vec<Window> {
        self.buf.extend_from_slice(samples);
        let mut out = Vec::new();
        while self.next_start + self.window as u64 <= self.end() {
            let from = (self.next_start - self.buf_start) as usize;
            out.push(Window {
                start: self.next_start,
                samples: self.buf[from..from + self.window].to_vec(),
            });
            self.covered_until = self.next_start + self.window as u64;
            self.next_start += self.hop as u64;
            // Keep only what later windows still need.
            let keep_from = (self.next_start.min(self.end()) - self.buf_start) as usize;
            self.buf.drain(..keep_from);
            self.buf_start += keep_from as u64;
        }
        out
    }

    /// The window that ends the stream: from the next hop position to the end, given out only
    /// when at least `min_tail` samples were never in any window.
    pub fn finish(&mut self, min_tail: usize) -> Option<Window> {
        let end = self.end();
        let uncovered = end.saturating_sub(self.covered_until);
        let start = self.next_start.max(self.buf_start);
        let w = if uncovered >= min_tail as u64 && end > start {
            let from = (start - self.buf_start) as usize;
            Some(Window {
                start,
                samples: self.buf[from..].to_vec(),
            })
        } else {
            None
        };
        self.reset();
        w
    }

    pub fn reset(&mut self) {
        *self = Self::new(self.window, self.hop);
    }
}

/// RMS level in dBFS (full scale = 1.0); -inf for digital silence.
///
/// ```
/// use valence_model::audio::rms_dbfs;
/// assert!((rms_dbfs(&[0.5, -0.5]) - (-6.0206)).abs() < 1e-3);
/// assert_eq!(rms_dbfs(&[0.0; 4]), f64::NEG_INFINITY);
/// ```
pub fn rms_dbfs(samples: &[f32]) -> f64 {
    if samples.is_empty() {
        return f64::NEG_INFINITY;
    }
    let ms = samples
        .iter()
        .map(|&s| (s as f64) * (s as f64))
        .sum::<f64>()
        / samples.len() as f64;
    10.0 * ms.log10()
}

/// Converts a count of 16 kHz samples into nanoseconds.
pub fn samples_to_ns(n: u64) -> u64 {
    (n as u128 * 1_000_000_000u128 / MODEL_RATE as u128) as u64
}

/// Converts nanoseconds into 16 kHz samples (rounded to nearest).
pub fn ns_to_samples(ns: u64) -> u64 {
    ((ns as u128 * MODEL_RATE as u128 + 500_000_000) / 1_000_000_000u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_seconds_three_second_windows_one_second_hop_gives_eight() {
        let mut w = Windower::new(48000, 16000);
        let mut starts = vec![];
        for chunk in vec![0.1f32; 160_000].chunks(1234) {
            starts.extend(w.push(chunk).into_iter().map(|w| w.start));
        }
        assert_eq!(starts, (0..8).map(|i| i * 16000).collect::<Vec<u64>>());
        assert_eq!(
            w.finish(16000),
            None,
            "nothing uncovered after the last window"
        );
    }

    #[test]
    fn short_stream_gives_one_tail_window_when_long_enough() {
        let mut w = Windower::new(48000, 16000);
        assert!(w.push(&vec![0.0; 20000]).is_empty());
        let tail = w.finish(16000).expect("1.25 s >= 1 s");
        assert_eq!((tail.start, tail.len()), (0, 20000));
        let mut w = Windower::new(48000, 16000);
        w.push(&vec![0.0; 15999]);
        assert_eq!(w.finish(16000), None, "under 1 s is not classified");
    }

    #[test]
    fn tail_after_windows_with_a_long_hop() {
        let mut w = Windower::new(16000, 32000);
        let n = w.push(&vec![0.0; 16000 * 5]).len(); // windows at 0, 2 s, 4 s... 4 s needs 5 s
        assert_eq!(n, 3);
        assert_eq!(w.finish(8000), None, "window at 4 s covered up to 5 s");
        let mut w = Windower::new(16000, 16000);
        w.push(&vec![0.0; 16000 * 2 + 12000]);
        let t = w.finish(8000).unwrap();
        assert_eq!((t.start, t.len()), (32000, 12000));
    }

    #[test]
    fn window_contents_are_the_right_samples() {
        let mut w = Windower::new(4, 2);
        let ramp: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let wins = w.push(&ramp);
        assert_eq!(wins.len(), 4);
        assert_eq!(wins[1].samples, vec![2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn downmix_averages_and_drops_non_finite() {
        let m = downmix(&[1.0f32, 0.0, f32::NAN, 0.5, f32::INFINITY, 1.0], 2, |x| x);
        assert_eq!(m, vec![0.5, 0.25, 0.5]);
        let s = downmix(&[i16::MAX, i16::MIN], 1, |x| x as f32 / 32768.0);
        assert!((s[0] - 1.0).abs() < 1e-4 && (s[1] + 1.0).abs() < 1e-6);
        let huge = downmix(&[f32::MAX, f32::MAX, -1e38, 1e38], 2, |x| x);
        assert_eq!(huge, vec![MAX_ANALYSIS_AMPLITUDE, 0.0]);
    }

    /// Adjacent huge samples used to make rubato's FFT overflow and panic.
    #[test]
    fn resampler_survives_huge_samples_after_downmix() {
        let raw: Vec<f32> = (0..48000)
            .map(|i| if i % 2 == 0 { 1e38 } else { -1e38 })
            .collect();
        let mono = downmix(&raw, 1, |x| x);
        let mut r = StreamResampler::new(48000).unwrap();
        let mut out = r.process(&mono);
        out.extend(r.flush());
        assert!(!out.is_empty() && out.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn resampler_keeps_length_and_phase() {
        for rate in [8000u32, 22050, 44100, 48000, 96000] {
            let n = rate as usize * 2;
            let f = 440.0f32;
            let input: Vec<f32> = (0..n)
                .map(|i| (2.0 * std::f32::consts::PI * f * i as f32 / rate as f32).sin() * 0.5)
                .collect();
            let mut r = StreamResampler::new(rate).unwrap();
            let mut out = Vec::new();
            for c in input.chunks(777) {
                out.extend(r.process(c));
            }
            out.extend(r.flush());
            assert_eq!(out.len(), 32000, "rate {rate}");
            // Compare with the ideal 16 kHz sine away from the edges: the delay is removed.
            let err = (1000..31000)
                .map(|i| {
                    let ideal = (2.0 * std::f32::consts::PI * f * i as f32 / 16000.0).sin() * 0.5;
                    (out[i] - ideal).abs()
                })
                .fold(0f32, f32::max);
            // One output sample of misalignment would give ~0.086 here; rubato's FFT resampler
            // leaves a sub-sample (≈ 1/3 sample at 48 kHz) offset, irrelevant for analysis.
            assert!(err < 0.05, "rate {rate}: max error {err}");
        }
    }

    #[test]
    fn levels_and_time_conversions() {
        assert!((rms_dbfs(&[1.0, -1.0]) - 0.0).abs() < 1e-9);
        assert!((rms_dbfs(&[0.1; 100]) + 20.0).abs() < 1e-6);
        assert_eq!(rms_dbfs(&[0.0; 10]), f64::NEG_INFINITY);
        assert_eq!(samples_to_ns(16000), 1_000_000_000);
        assert_eq!(ns_to_samples(3_000_000_000), 48000);
    }
}
