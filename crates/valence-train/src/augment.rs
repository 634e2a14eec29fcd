//! Robustness augmentations of 16 kHz mono speech for training, all seeded: window-length crops
//! (the element classifies 3 s windows that mostly start mid-word), speed perturbation,
//! coloured and babble noise at a random SNR, gain, the telephone band, room sound around the
//! speech, and Opus over RTP ([`crate::codec`], through GStreamer). Each but the codec is a small
//! pure function; [`Augmenter::view`] chains a random selection of them.

use valence_model::rng::SeededNormal;

/// 16 kHz, the rate every function here assumes.
pub const RATE: f64 = 16000.0;

/// A uniform draw in `[lo, hi)`.
fn uniform(rng: &mut SeededNormal, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.uniform()
}

fn chance(rng: &mut SeededNormal, p: f64) -> bool {
    rng.uniform() < p
}

/// Root mean square (0 for an empty slice).
pub fn rms(x: &[f32]) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    (x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64).sqrt()
}

/// A random stretch of `len` samples, or the whole clip when it is not longer.
pub fn crop(x: &[f32], len: usize, rng: &mut SeededNormal) -> Vec<f32> {
    if x.len() <= len {
        return x.to_vec();
    }
    let start = (rng.uniform() * (x.len() - len + 1) as f64) as usize;
    x[start.min(x.len() - len)..][..len].to_vec()
}

/// Speed perturbation (tempo and pitch together, as Kaldi's 0.9/1.1): reads the input
/// `factor` times as fast, by linear interpolation.
pub fn speed(x: &[f32], factor: f64) -> Vec<f32> {
    if x.is_empty() || factor <= 0.0 {
        return x.to_vec();
    }
    let n = ((x.len() as f64) / factor).floor() as usize;
    (0..n)
        .map(|i| {
            let pos = i as f64 * factor;
            let j = pos.floor() as usize;
            let frac = (pos - j as f64) as f32;
            let a = x[j.min(x.len() - 1)];
            let b = x[(j + 1).min(x.len() - 1)];
            a + (b - a) * frac
        })
        .collect()
}

/// Noise colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    White,
    /// -3 dB per octave (Paul Kellet's economy filter).
    Pink,
    /// -6 dB per octave (leaky integrator).
    Brown,
}

/// `n` samples of noise of unit RMS.
pub fn noise(n: usize, colour: Colour, rng: &mut SeededNormal) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    let (mut b0, mut b1, mut b2) = (0f64, 0f64, 0f64);
    let mut brown = 0f64;
    for _ in 0..n {
        let w = rng.sample() as f64;
        out.push(match colour {
            Colour::White => w,
            Colour::Pink => {
                b0 = 0.99765 * b0 + w * 0.099_046;
                b1 = 0.96300 * b1 + w * 0.296_516_4;
                b2 = 0.57000 * b2 + w * 1.052_691_3;
                b0 + b1 + b2 + w * 0.1848
            }
            Colour::Brown => {
                brown = 0.98 * brown + w;
                brown
            }
        } as f32);
    }
    let r = rms(&out);
    if r > 0.0 {
        out.iter_mut().for_each(|v| *v = (*v as f64 / r) as f32);
    }
    out
}

/// Adds `noise` (repeated as needed) to `speech` so that the speech-to-noise ratio is `snr_db`.
pub fn mix_at_snr(speech: &mut [f32], noise: &[f32], snr_db: f64) {
    let (s, n) = (rms(speech), rms(noise));
    if s == 0.0 || n == 0.0 {
        return;
    }
    let scale = (s / n / 10f64.powf(snr_db / 20.0)) as f32;
    for (i, v) in speech.iter_mut().enumerate() {
        *v += noise[i % noise.len()] * scale;
    }
}

/// Multiplies by `db` decibels and keeps samples in [-1, 1] (louder input clips, as a real
/// recording chain would).
pub fn gain(x: &mut [f32], db: f64) {
    let g = 10f64.powf(db / 20.0) as f32;
    x.iter_mut().for_each(|v| *v = (*v * g).clamp(-1.0, 1.0));
}

/// A second-order section (RBJ cookbook), run in place.
struct Biquad {
    b: [f64; 3],
    a: [f64; 2],
}

impl Biquad {
    fn new(high_pass: bool, cutoff_hz: f64) -> Self {
        let w0 = 2.0 * std::f64::consts::PI * cutoff_hz / RATE;
        let alpha = w0.sin() / (2.0 * std::f64::consts::FRAC_1_SQRT_2);
        let cos = w0.cos();
        let a0 = 1.0 + alpha;
        let b = if high_pass {
            [(1.0 + cos) / 2.0, -(1.0 + cos), (1.0 + cos) / 2.0]
        } else {
            [(1.0 - cos) / 2.0, 1.0 - cos, (1.0 - cos) / 2.0]
        };
        Self {
            b: b.map(|v| v / a0),
            a: [-2.0 * cos / a0, (1.0 - alpha) / a0],
        }
    }

    fn run(&self, x: &mut [f32]) {
        let (mut x1, mut x2, mut y1, mut y2) = (0f64, 0f64, 0f64, 0f64);
        for v in x.iter_mut() {
            let x0 = *v as f64;
            let y0 =
                self.b[0] * x0 + self.b[1] * x1 + self.b[2] * x2 - self.a[0] * y1 - self.a[1] * y2;
            (x2, x1, y2, y1) = (x1, x0, y1, y0);
            *v = y0 as f32;
        }
    }
}

/// The narrow-band telephone channel: 300-3400 Hz (two high-pass and two low-pass sections),
/// then 8 kHz sampling (every other sample, held back to 16 kHz by linear interpolation).
pub fn telephone(x: &[f32]) -> Vec<f32> {
    let mut y = x.to_vec();
    for (hp, f) in [
        (true, 300.0),
        (true, 300.0),
        (false, 3400.0),
        (false, 3400.0),
    ] {
        Biquad::new(hp, f).run(&mut y);
    }
    let mut out = y.clone();
    for i in (1..y.len()).step_by(2) {
        let next = if i + 1 < y.len() { y[i + 1] } else { y[i - 1] };
        out[i] = 0.5 * (y[i - 1] + next);
    }
    out
}

/// Room sound (pink noise `floor_db` below the speech's RMS) before and after the speech.
pub fn pad_with_room(
    x: &[f32],
    lead_s: f64,
    trail_s: f64,
    floor_db: f64,
    rng: &mut SeededNormal,
) -> Vec<f32> {
    let lead = (lead_s * RATE) as usize;
    let trail = (trail_s * RATE) as usize;
    let floor = rms(x) * 10f64.powf(floor_db / 20.0);
    let room = noise(lead + x.len() + trail, Colour::Pink, rng);
    let mut out: Vec<f32> = room.iter().map(|&v| (v as f64 * floor) as f32).collect();
    for (o, &v) in out[lead..].iter_mut().zip(x) {
        *o += v;
    }
    out
}

/// What one random view of a clip went through (for logs and tests).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ViewRecipe {
    pub speed: Option<f64>,
    pub room: bool,
    pub noise: Option<(String, f64)>,
    pub telephone: bool,
    pub gain_db: f64,
    /// Opus bit rate of the codec round trip, when there was one.
    pub opus_kbps: Option<u32>,
}

/// Makes random training views of clips, each cut to the element's window length.
pub struct Augmenter {
    /// Window length in samples (the element's default: 3 s).
    pub window: usize,
    /// Chance that a view ends with an Opus/RTP round trip at 12-32 kbps. At 0 no random draw
    /// is spent on it, so views are the same as before the codec existed.
    pub opus: f64,
}

impl Augmenter {
    /// One random view of `clip`. `babble` is other speakers' speech to mix in as background
    /// chatter (it may be empty). Fails only when the codec round trip does.
    pub fn view(
        &self,
        clip: &[f32],
        babble: &[&[f32]],
        rng: &mut SeededNormal,
    ) -> anyhow::Result<(Vec<f32>, ViewRecipe)> {
        let mut r = ViewRecipe::default();
        let mut x = clip.to_vec();
        if chance(rng, 0.5) {
            let f = uniform(rng, 0.9, 1.1);
            x = speed(&x, f);
            r.speed = Some(f);
        }
        if chance(rng, 0.3) {
            x = pad_with_room(
                &x,
                uniform(rng, 0.1, 1.0),
                uniform(rng, 0.1, 1.0),
                uniform(rng, -40.0, -20.0),
                rng,
            );
            r.room = true;
        }
        x = crop(&x, self.window, rng);
        if chance(rng, 0.6) {
            let snr = uniform(rng, 5.0, 25.0);
            let pick = rng.uniform();
            let (name, n) = if !babble.is_empty() && pick < 0.3 {
                let mut b = vec![0f32; x.len()];
                for src in babble {
                    let piece = crop(src, x.len(), rng);
                    for (o, v) in b.iter_mut().zip(&piece) {
                        *o += v;
                    }
                }
                ("babble", b)
            } else if pick < 0.55 {
                ("white", noise(x.len(), Colour::White, rng))
            } else if pick < 0.8 {
                ("pink", noise(x.len(), Colour::Pink, rng))
            } else {
                ("brown", noise(x.len(), Colour::Brown, rng))
            };
            mix_at_snr(&mut x, &n, snr);
            r.noise = Some((name.into(), snr));
        }
        if chance(rng, 0.3) {
            x = telephone(&x);
            r.telephone = true;
        }
        r.gain_db = uniform(rng, -12.0, 6.0);
        gain(&mut x, r.gain_db);
        // The sender's codec comes last: after the room, the microphone's gain and clipping.
        if self.opus > 0.0 && chance(rng, self.opus) {
            let (lo, hi) = crate::codec::OPUS_KBPS;
            let kbps = (uniform(rng, lo as f64, hi as f64 + 1.0) as u32).min(hi);
            x = crate::codec::opus_round_trip(&x, kbps)?;
            r.opus_kbps = Some(kbps);
        }
        Ok((x, r))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A 16 kHz sine at amplitude 0.5.
    pub(crate) fn sine(hz: f64, secs: f64) -> Vec<f32> {
        (0..(secs * RATE) as usize)
            .map(|i| (0.5 * (2.0 * std::f64::consts::PI * hz * i as f64 / RATE).sin()) as f32)
            .collect()
    }

    #[test]
    fn crop_cuts_long_clips_and_keeps_short_ones() {
        let mut rng = SeededNormal::new(1);
        let x: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let c = crop(&x, 30, &mut rng);
        assert_eq!(c.len(), 30);
        assert_eq!(c[29] - c[0], 29.0, "a contiguous stretch");
        assert_eq!(crop(&x, 200, &mut rng), x);
    }

    #[test]
    fn speed_changes_length_and_pitch() {
        let x = sine(200.0, 1.0);
        let y = speed(&x, 1.1);
        assert_eq!(y.len(), (16000.0 / 1.1) as usize);
        // 200 Hz read 1.1x as fast is 220 Hz: count rising zero crossings.
        let crossings = y.windows(2).filter(|w| w[0] < 0.0 && w[1] >= 0.0).count() as f64;
        let hz = crossings / (y.len() as f64 / RATE);
        assert!((hz - 220.0).abs() < 3.0, "{hz} Hz");
    }

    #[test]
    fn noise_is_mixed_at_the_asked_snr() {
        let mut rng = SeededNormal::new(2);
        for colour in [Colour::White, Colour::Pink, Colour::Brown] {
            let n = noise(16000, colour, &mut rng);
            assert!((rms(&n) - 1.0).abs() < 1e-3);
            let clean = sine(300.0, 1.0);
            let mut noisy = clean.clone();
            mix_at_snr(&mut noisy, &n, 10.0);
            let resid: Vec<f32> = noisy.iter().zip(&clean).map(|(a, b)| a - b).collect();
            let snr = 20.0 * (rms(&clean) / rms(&resid)).log10();
            assert!((snr - 10.0).abs() < 0.01, "{colour:?}: {snr} dB");
        }
    }

    #[test]
    fn telephone_band_keeps_speech_band_and_drops_the_rest() {
        let level = |hz: f64| rms(&telephone(&sine(hz, 1.0))[4000..]) / rms(&sine(hz, 1.0));
        assert!(level(1000.0) > 0.8, "1 kHz {}", level(1000.0));
        assert!(level(100.0) < 0.2, "100 Hz {}", level(100.0));
        assert!(level(6000.0) < 0.2, "6 kHz {}", level(6000.0));
    }

    #[test]
    fn views_are_reproducible_window_sized_and_bounded() {
        let aug = Augmenter {
            window: 48000,
            opus: 0.0,
        };
        let clip = sine(180.0, 5.0);
        let other = sine(90.0, 2.0);
        let babble: Vec<&[f32]> = vec![&other];
        let (a, ra) = aug.view(&clip, &babble, &mut SeededNormal::new(7)).unwrap();
        let (b, rb) = aug.view(&clip, &babble, &mut SeededNormal::new(7)).unwrap();
        assert_eq!(a, b);
        assert_eq!(ra, rb);
        let mut rng = SeededNormal::new(8);
        for _ in 0..50 {
            let (v, r) = aug.view(&clip, &babble, &mut rng).unwrap();
            assert!(v.len() <= 48000 && !v.is_empty());
            assert!(v.iter().all(|s| s.is_finite() && s.abs() <= 1.0));
            assert_eq!(r.opus_kbps, None);
        }
    }

    #[test]
    fn views_with_the_codec_pass_some_through_opus_reproducibly() {
        let clip = sine(180.0, 4.0);
        let plain = Augmenter {
            window: 48000,
            opus: 0.0,
        };
        let coded = Augmenter {
            window: 48000,
            opus: 1.0,
        };
        let (p, rp) = plain.view(&clip, &[], &mut SeededNormal::new(3)).unwrap();
        let (c, rc) = coded.view(&clip, &[], &mut SeededNormal::new(3)).unwrap();
        let (c2, _) = coded.view(&clip, &[], &mut SeededNormal::new(3)).unwrap();
        assert_eq!(c, c2, "seeded, codec included");
        let kbps = rc.opus_kbps.expect("opus 1.0 always codes");
        assert!((12..=32).contains(&kbps), "{kbps} kbps");
        // The same view up to the codec: the coded one has the plain one's length, differs.
        assert_eq!(
            ViewRecipe {
                opus_kbps: None,
                ..rc
            },
            rp
        );
        assert_eq!(c.len(), p.len());
        assert_ne!(c, p);
    }
}
