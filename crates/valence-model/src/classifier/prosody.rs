//! Prosodic statistics of an utterance: pitch, loudness, voice quality and rhythm.
//!
//! Valence studies across languages find these carry more of it from one language to another
//! than spectral detail does, so a model can read them beside the encoder's features
//! (`features.prosody` in `valence.json`). Every value is relative (semitones around the
//! speaker's own median, decibels below the loudest frame), so the input's gain does not
//! change them, and the spectral-tilt bands lie inside the telephone band (300-3400 Hz).
//!
//! Pitch: per 40 ms frame (10 ms hop) the autocorrelation of the Hann-windowed frame, divided
//! by the window's own autocorrelation (Boersma 1993), searched for its peak between 60 and
//! 500 Hz; a frame is voiced where that peak is above [`VOICING_THRESHOLD`] and the frame is
//! within [`ACTIVE_RANGE_DB`] of the loudest one.

use std::sync::Arc;

use rustfft::num_complex::Complex32;
use rustfft::{Fft, FftPlanner};

/// 16 kHz samples per frame (40 ms: two periods of the lowest pitch searched).
const FRAME: usize = 640;
/// 10 ms.
const HOP: usize = 160;
/// At least twice the frame, so the autocorrelation does not wrap around.
const FFT_LEN: usize = 1280;
const RATE: f32 = 16_000.0;
/// Lags searched for the pitch period: 500 Hz down to 60 Hz.
const MIN_LAG: usize = 32;
const MAX_LAG: usize = 267;
/// Normalised autocorrelation peak above which a frame counts as voiced.
pub const VOICING_THRESHOLD: f32 = 0.45;
/// Frames within this many dB of the loudest frame are speech-active.
pub const ACTIVE_RANGE_DB: f32 = 35.0;
/// Frames quieter than this (dB re full scale) are never active.
const FLOOR_DB: f32 = -70.0;

/// What each value of [`utterance_features`] is, in order.
pub const NAMES: [&str; 15] = [
    "voiced_fraction",
    "f0_median_semitones_re_100hz",
    "f0_std_semitones",
    "f0_range_p10_p90_semitones",
    "f0_slope_semitones_per_s",
    "f0_mean_abs_delta_semitones_per_frame",
    "voiced_energy_db_below_max",
    "energy_std_db",
    "energy_range_p10_p90_db",
    "energy_slope_db_per_s",
    "voiced_segments_per_s",
    "voiced_segment_mean_s",
    "harmonicity",
    "spectral_tilt_db",
    "spectral_tilt_std_db",
];
pub const DIM: usize = NAMES.len();

/// One analysis frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Frame {
    pub energy_db: f32,
    /// Peak of the normalised autocorrelation in the pitch range (0 when flat).
    pub periodicity: f32,
    /// Pitch in Hz at that peak.
    pub f0_hz: f32,
    /// Energy in 1000-3400 Hz over energy in 300-1000 Hz, in dB.
    pub tilt_db: f32,
}

/// Frame analysis with its FFT plans and window made once.
pub struct Analyzer {
    forward: Arc<dyn Fft<f32>>,
    inverse: Arc<dyn Fft<f32>>,
    window: Vec<f32>,
    /// The window's normalised autocorrelation, by lag.
    window_ac: Vec<f32>,
}

impl Default for Analyzer {
    fn default() -> Self {
        Self::new()
    }
}

impl Analyzer {
    pub fn new() -> Self {
        let mut planner = FftPlanner::new();
        let forward = planner.plan_fft_forward(FFT_LEN);
        let inverse = planner.plan_fft_inverse(FFT_LEN);
        let window: Vec<f32> = (0..FRAME)
            .map(|n| 0.5 - 0.5 * (std::f32::consts::TAU * n as f32 / FRAME as f32).cos())
            .collect();
        let mut a = Self {
            forward,
            inverse,
            window: window.clone(),
            window_ac: vec![1.0; MAX_LAG + 2],
        };
        let ac = a.autocorrelation(&window, false).0;
        a.window_ac = ac[..MAX_LAG + 2].iter().map(|v| v / ac[0]).collect();
        a
    }

    /// Autocorrelation of `x` (windowed if asked) by lag, and its power spectrum's bins.
    fn autocorrelation(&self, x: &[f32], windowed: bool) -> (Vec<f32>, Vec<f32>) {
        let mut buf = vec![Complex32::new(0.0, 0.0); FFT_LEN];
        for (i, (b, &v)) in buf.iter_mut().zip(x).enumerate() {
            b.re = if windowed { v * self.window[i] } else { v };
        }
        self.forward.process(&mut buf);
        let power: Vec<f32> = buf.iter().map(|c| c.norm_sqr()).collect();
        for (b, &p) in buf.iter_mut().zip(&power) {
            *b = Complex32::new(p, 0.0);
        }
        self.inverse.process(&mut buf);
        (buf.iter().map(|c| c.re / FFT_LEN as f32).collect(), power)
    }

    /// One frame of `FRAME` samples.
    pub fn frame(&self, x: &[f32]) -> Frame {
        let mean = x.iter().sum::<f32>() / x.len() as f32;
        let centred: Vec<f32> = x.iter().map(|v| v - mean).collect();
        let energy = centred.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let energy_db = 10.0 * (energy + 1e-12).log10();
        let (ac, power) = self.autocorrelation(&centred, true);
        let bin_hz = RATE / FFT_LEN as f32;
        let band = |lo: f32, hi: f32| -> f32 {
            power[(lo / bin_hz).round() as usize..(hi / bin_hz).round() as usize]
                .iter()
                .sum::<f32>()
        };
        let tilt_db =
            10.0 * ((band(1000.0, 3400.0) + 1e-12) / (band(300.0, 1000.0) + 1e-12)).log10();
        let (mut periodicity, mut f0_hz) = (0.0, 0.0);
        if ac[0] > 0.0 {
            let r = |lag: usize| ac[lag] / ac[0] / self.window_ac[lag].max(1e-3);
            // The highest local peak; the shortest lag within 5 % of it, which avoids
            // choosing a multiple of the period (an octave too low).
            let peaks: Vec<(usize, f32)> = (MIN_LAG..=MAX_LAG)
                .filter(|&l| r(l) >= r(l - 1) && r(l) >= r(l + 1))
                .map(|l| (l, r(l)))
                .collect();
            let best = peaks.iter().map(|p| p.1).fold(0f32, f32::max);
            if let Some(&(lag, value)) = peaks.iter().find(|p| p.1 >= 0.95 * best && best > 0.0) {
                // Parabolic interpolation around the peak lag.
                let (a, b, c) = (r(lag - 1), value, r(lag + 1));
                let denom = a - 2.0 * b + c;
                let shift = if denom.abs() > 1e-9 {
                    (0.5 * (a - c) / denom).clamp(-0.5, 0.5)
                } else {
                    0.0
                };
                periodicity = value.min(1.0);
                f0_hz = RATE / (lag as f32 + shift);
            }
        }
        Frame {
            energy_db,
            periodicity,
            f0_hz,
            tilt_db,
        }
    }

    /// Frames of 16 kHz samples (none when shorter than one frame).
    pub fn frames(&self, samples: &[f32]) -> Vec<Frame> {
        if samples.len() < FRAME {
            return Vec::new();
        }
        (0..=(samples.len() - FRAME) / HOP)
            .map(|i| self.frame(&samples[i * HOP..i * HOP + FRAME]))
            .collect()
    }
}

fn mean(v: &[f32]) -> f32 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f32>() / v.len() as f32
    }
}

fn std(v: &[f32]) -> f32 {
    let m = mean(v);
    mean(&v.iter().map(|x| (x - m) * (x - m)).collect::<Vec<_>>()).sqrt()
}

/// The `q` quantile (0..=1) by nearest rank; 0 for no values.
fn quantile(v: &[f32], q: f32) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f32::total_cmp);
    s[((s.len() - 1) as f32 * q).round() as usize]
}

/// Least-squares slope of `y` over `t`; 0 with fewer than two points or no spread.
fn slope(t: &[f32], y: &[f32]) -> f32 {
    if t.len() < 2 {
        return 0.0;
    }
    let (mt, my) = (mean(t), mean(y));
    let var: f32 = t.iter().map(|x| (x - mt) * (x - mt)).sum();
    if var <= 0.0 {
        return 0.0;
    }
    t.iter()
        .zip(y)
        .map(|(a, b)| (a - mt) * (b - my))
        .sum::<f32>()
        / var
}

/// The [`NAMES`] statistics of an utterance's frames. No voiced frames: the pitch and voice
/// values are 0; no active frames (silence, or shorter than a frame): all are 0.
pub fn statistics(frames: &[Frame]) -> [f32; DIM] {
    let mut out = [0f32; DIM];
    let loudest = frames.iter().map(|f| f.energy_db).fold(f32::MIN, f32::max);
    let active: Vec<usize> = (0..frames.len())
        .filter(|&i| {
            frames[i].energy_db > FLOOR_DB && frames[i].energy_db > loudest - ACTIVE_RANGE_DB
        })
        .collect();
    if active.is_empty() {
        return out;
    }
    let voiced_at =
        |i: usize| active.binary_search(&i).is_ok() && frames[i].periodicity > VOICING_THRESHOLD;
    let voiced: Vec<usize> = active.iter().copied().filter(|&i| voiced_at(i)).collect();
    let seconds = |i: usize| i as f32 * HOP as f32 / RATE;
    let active_s = active.len() as f32 * HOP as f32 / RATE;
    out[0] = voiced.len() as f32 / active.len() as f32;

    let energy: Vec<f32> = active
        .iter()
        .map(|&i| frames[i].energy_db - loudest)
        .collect();
    let t_active: Vec<f32> = active.iter().map(|&i| seconds(i)).collect();
    out[7] = std(&energy);
    out[8] = quantile(&energy, 0.9) - quantile(&energy, 0.1);
    out[9] = slope(&t_active, &energy);

    if !voiced.is_empty() {
        let st: Vec<f32> = voiced
            .iter()
            .map(|&i| 12.0 * (frames[i].f0_hz / 100.0).log2())
            .collect();
        let median = quantile(&st, 0.5);
        out[1] = median;
        out[2] = std(&st);
        out[3] = quantile(&st, 0.9) - quantile(&st, 0.1);
        let t_voiced: Vec<f32> = voiced.iter().map(|&i| seconds(i)).collect();
        out[4] = slope(&t_voiced, &st);
        let deltas: Vec<f32> = voiced
            .windows(2)
            .zip(st.windows(2))
            .filter(|(i, _)| i[1] == i[0] + 1)
            .map(|(_, s)| (s[1] - s[0]).abs())
            .collect();
        out[5] = mean(&deltas);
        out[6] = mean(
            &voiced
                .iter()
                .map(|&i| frames[i].energy_db - loudest)
                .collect::<Vec<_>>(),
        );
        // Runs of consecutive voiced frames: syllable nuclei, roughly.
        let mut runs = Vec::new();
        let mut start = voiced[0];
        for w in voiced.windows(2) {
            if w[1] != w[0] + 1 {
                runs.push(w[0] + 1 - start);
                start = w[1];
            }
        }
        runs.push(voiced[voiced.len() - 1] + 1 - start);
        let runs: Vec<f32> = runs
            .into_iter()
            .filter(|&n| n >= 3)
            .map(|n| n as f32 * HOP as f32 / RATE)
            .collect();
        out[10] = runs.len() as f32 / active_s;
        out[11] = mean(&runs);
        out[12] = mean(
            &voiced
                .iter()
                .map(|&i| frames[i].periodicity)
                .collect::<Vec<_>>(),
        );
        let tilt: Vec<f32> = voiced.iter().map(|&i| frames[i].tilt_db).collect();
        out[13] = mean(&tilt);
        out[14] = std(&tilt);
    }
    out
}

/// The prosodic statistics of 16 kHz mono `samples` (see [`NAMES`]).
pub fn utterance_features(samples: &[f32]) -> [f32; DIM] {
    thread_local! {
        static ANALYZER: Analyzer = Analyzer::new();
    }
    ANALYZER.with(|a| statistics(&a.frames(samples)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn harmonic(f0: impl Fn(f32) -> f32, seconds: f32, gain: f32) -> Vec<f32> {
        let n = (seconds * RATE) as usize;
        let mut phase = 0f32;
        (0..n)
            .map(|i| {
                let t = i as f32 / RATE;
                phase += std::f32::consts::TAU * f0(t) / RATE;
                gain * (1..=10)
                    .map(|k| (k as f32 * phase).sin() / k as f32)
                    .sum::<f32>()
            })
            .collect()
    }

    fn noise(n: usize, gain: f32) -> Vec<f32> {
        let mut r = crate::rng::SeededNormal::new(3);
        (0..n).map(|_| gain * r.sample()).collect()
    }

    #[test]
    fn a_steady_tone_has_its_pitch_and_is_voiced() {
        for f0 in [80.0f32, 150.0, 230.0, 420.0] {
            let f = utterance_features(&harmonic(|_| f0, 1.0, 0.2));
            let want = 12.0 * (f0 / 100.0).log2();
            assert!((f[1] - want).abs() < 0.3, "{f0} Hz: {} vs {want}", f[1]);
            assert!(f[0] > 0.95, "voiced fraction {}", f[0]);
            assert!(f[2] < 0.2 && f[4].abs() < 0.5, "{f:?}");
            assert!(f[12] > 0.9, "harmonicity {}", f[12]);
        }
    }

    #[test]
    fn a_rising_glide_has_a_rising_slope() {
        // 120 Hz to 240 Hz in 1 s: one octave, 12 semitones per second.
        let f = utterance_features(&harmonic(|t| 120.0 * 2f32.powf(t), 1.0, 0.2));
        assert!((f[4] - 12.0).abs() < 1.0, "slope {}", f[4]);
        assert!((f[3] - 9.6).abs() < 1.5, "p10-p90 range {}", f[3]);
    }

    #[test]
    fn noise_is_not_voiced_and_silence_gives_zeros() {
        let f = utterance_features(&noise(16_000, 0.1));
        assert!(f[0] < 0.1, "voiced fraction of noise {}", f[0]);
        assert_eq!(utterance_features(&vec![0.0; 16_000]), [0.0; DIM]);
        assert_eq!(utterance_features(&[0.1; 100]), [0.0; DIM]);
        assert!(
            utterance_features(&noise(16_000, 1e-6))
                .iter()
                .all(|v| v.is_finite())
        );
    }

    #[test]
    fn gain_changes_nothing() {
        let mut x = harmonic(|t| 140.0 + 30.0 * (3.0 * t).sin(), 1.5, 0.3);
        // Syllables: voiced bursts with quiet gaps.
        for (i, v) in x.iter_mut().enumerate() {
            if (i / 3200) % 2 == 1 {
                *v *= 0.001;
            }
        }
        let a = utterance_features(&x);
        let b = utterance_features(&x.iter().map(|v| v * 0.05).collect::<Vec<_>>());
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-2 * (1.0 + p.abs()), "{a:?}\n{b:?}");
        }
        // Four bursts of 0.2 s in ~0.9 s of active (non-pause) frames.
        assert!(
            a[10] > 3.8 && a[10] < 5.2,
            "segments per active second {}",
            a[10]
        );
        assert!((a[11] - 0.2).abs() < 0.05, "segment length {}", a[11]);
    }

    #[test]
    fn tilt_follows_the_spectrum() {
        let bright = utterance_features(&harmonic(|_| 200.0, 1.0, 0.2));
        // Fewer high harmonics: a lower tilt.
        let dull: Vec<f32> = {
            let n = 16_000;
            (0..n)
                .map(|i| {
                    let p = std::f32::consts::TAU * 200.0 * i as f32 / RATE;
                    0.2 * ((p).sin() + 0.5 * (2.0 * p).sin() + 0.3 * (3.0 * p).sin())
                })
                .collect()
        };
        let dull = utterance_features(&dull);
        assert!(
            bright[13] > dull[13] + 10.0,
            "{} vs {}",
            bright[13],
            dull[13]
        );
    }
}
