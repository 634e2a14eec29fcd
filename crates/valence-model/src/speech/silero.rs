//! Silero VAD (v5, 16 kHz; MIT) on the CPU: the speech probability of each 32 ms frame of a
//! stream, with the recurrent state carried from frame to frame.
//!
//! The network, as the `silero-vad` wheel's reference (`tinygrad_model.py`) and its ONNX form
//! compute it: each frame is 512 new samples after the previous 64 (the context), reflect-padded
//! by 64 on the right; an STFT as a fixed 1-D convolution (258 filters of 256 taps, hop 128: four
//! frames), magnitudes of its 129 bins, four convolutions (129→128, 128→64 stride 2, 64→64
//! stride 2, 64→128; kernel 3, padding 1, ReLU), an LSTM cell of 128, then ReLU, a 1×1
//! convolution and a sigmoid. The weights are those of the wheel's ONNX model (what the package
//! runs), which `valence setup` writes as safetensors under these names; the wheel's own
//! `silero_vad_16k.safetensors` has the same names and shapes but other weights.
//!
//! Everything but the LSTM's recurrence is independent per frame, so a block of frames runs as
//! a few products of strided rows ([`crate::kernels::rows`]): each weight is read once per
//! block, not once per frame; the LSTM then steps through the block. The STFT's filters are a
//! periodic-Hann-windowed DFT; when the loaded ones are (to 1e-6), an FFT computes them, and
//! the product with the filters only otherwise.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustfft::num_complex::Complex32;

use crate::kernels::activation::exp_approx;
use crate::kernels::rows::{matvec_acc, rows_times_weight};

/// New samples per frame (32 ms at 16 kHz).
pub const FRAME: usize = 512;
/// Samples of the previous frame each frame also reads.
pub const CONTEXT: usize = 64;
/// Silero's own default threshold on a frame's speech probability.
pub const DEFAULT_THRESHOLD: f32 = 0.5;
/// The largest detector file read (the real one is 1.2 MB).
const MAX_BYTES: u64 = 16 << 20;

const INPUT: usize = CONTEXT + FRAME; // 576
const PADDED: usize = INPUT + 64; // 640: reflect pad on the right
const N_FFT: usize = 256;
const HOP: usize = 128;
const STFT_FRAMES: usize = (PADDED - N_FFT) / HOP + 1; // 4
const BINS: usize = N_FFT / 2 + 1; // 129
const HIDDEN: usize = 128;

/// One convolution (kernel 3, padding 1) with its weight laid out for a product of im2col rows:
/// `w[o][k * cin + i] = weight[o][i][k]`, so that an input stored frame-major reads each
/// output's receptive field as one contiguous row.
struct Conv3 {
    cin: usize,
    cout: usize,
    w: Vec<f32>,
    b: Vec<f32>,
}

impl Conv3 {
    fn new(weight: Vec<f32>, bias: Vec<f32>, cout: usize, cin: usize) -> Self {
        let mut w = vec![0f32; cout * 3 * cin];
        for o in 0..cout {
            for i in 0..cin {
                for k in 0..3 {
                    w[o * 3 * cin + k * cin + i] = weight[(o * cin + i) * 3 + k];
                }
            }
        }
        Self {
            cin,
            cout,
            w,
            b: bias,
        }
    }
}

/// The detector's weights, shared by every stream (a stream's state is a [`VadState`]).
pub struct SileroVad {
    stft: Vec<f32>,
    /// The STFT as an FFT of Hann-windowed frames, when the filters are exactly that.
    fft: Option<(Arc<dyn rustfft::Fft<f32>>, Vec<f32>)>,
    conv1: Conv3,
    conv2: Conv3,
    conv3: Conv3,
    conv4: Conv3,
    /// The LSTM's input and recurrent weights (512 x 128 each) and summed biases.
    w_ih: Vec<f32>,
    w_hh: Vec<f32>,
    lstm_b: Vec<f32>,
    out_w: Vec<f32>,
    out_b: f32,
}

/// What a stream carries from frame to frame.
#[derive(Clone)]
pub struct VadState {
    h: Vec<f32>,
    c: Vec<f32>,
    context: Vec<f32>,
}

impl Default for VadState {
    fn default() -> Self {
        Self {
            h: vec![0.0; HIDDEN],
            c: vec![0.0; HIDDEN],
            context: vec![0.0; CONTEXT],
        }
    }
}

fn tensor(st: &safetensors::SafeTensors, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = st
        .tensor(name)
        .with_context(|| format!("the speech detector lacks `{name}`"))?;
    if t.dtype() != safetensors::Dtype::F32 {
        bail!("`{name}` is {:?}, not F32", t.dtype());
    }
    if t.shape() != shape {
        bail!("`{name}` has shape {:?}, not {shape:?}", t.shape());
    }
    let v: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if v.iter().any(|x| !x.is_finite()) {
        bail!("`{name}` holds NaN or infinite values");
    }
    Ok(v)
}

/// The FFT that computes the STFT filters `stft` ([258, 1, 256]: real parts then imaginary
/// parts of bins 0..=128), when they are a periodic-Hann-windowed DFT.
fn stft_as_fft(stft: &[f32]) -> Option<(Arc<dyn rustfft::Fft<f32>>, Vec<f32>)> {
    let window: Vec<f32> = (0..N_FFT)
        .map(|n| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64).cos()) as f32)
        .collect();
    for b in 0..BINS {
        for (n, w) in window.iter().enumerate() {
            let a = 2.0 * std::f64::consts::PI * ((b * n) % N_FFT) as f64 / N_FFT as f64;
            let re = *w as f64 * a.cos();
            let im = -(*w as f64) * a.sin();
            if (stft[b * N_FFT + n] as f64 - re).abs() > 1e-6
                || (stft[(BINS + b) * N_FFT + n] as f64 - im).abs() > 1e-6
            {
                return None;
            }
        }
    }
    let plan = rustfft::FftPlanner::new().plan_fft_forward(N_FFT);
    Some((plan, window))
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-x))
}

/// `tanh` through the same exponential (`2 sigmoid(2x) - 1`): glibc's goes through `expm1f`,
/// which was the detector's second-largest cost.
fn tanh(x: f32) -> f32 {
    2.0 * sigmoid(2.0 * x) - 1.0
}

impl SileroVad {
    /// Reads the detector's safetensors file (`valence setup` installs it).
    pub fn load(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read speech detector {}", path.display()))?;
        if !meta.is_file() || meta.len() > MAX_BYTES {
            bail!(
                "{} is not a speech detector file (a regular file of at most {MAX_BYTES} bytes)",
                path.display()
            );
        }
        let bytes = std::fs::read(path)?;
        Self::from_bytes(&bytes).with_context(|| format!("speech detector {}", path.display()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(bytes)?;
        let conv = |n: &str, cout: usize, cin: usize| -> Result<Conv3> {
            Ok(Conv3::new(
                tensor(&st, &format!("{n}.weight"), &[cout, cin, 3])?,
                tensor(&st, &format!("{n}.bias"), &[cout])?,
                cout,
                cin,
            ))
        };
        let w_ih = tensor(&st, "lstm_cell.weight_ih", &[4 * HIDDEN, HIDDEN])?;
        let w_hh = tensor(&st, "lstm_cell.weight_hh", &[4 * HIDDEN, HIDDEN])?;
        let b_ih = tensor(&st, "lstm_cell.bias_ih", &[4 * HIDDEN])?;
        let b_hh = tensor(&st, "lstm_cell.bias_hh", &[4 * HIDDEN])?;
        let stft = tensor(&st, "stft_conv.weight", &[2 * BINS, 1, N_FFT])?;
        Ok(Self {
            fft: stft_as_fft(&stft),
            stft,
            conv1: conv("conv1", 128, BINS)?,
            conv2: conv("conv2", 64, 128)?,
            conv3: conv("conv3", 64, 64)?,
            conv4: conv("conv4", 128, 64)?,
            w_ih,
            w_hh,
            lstm_b: b_ih.iter().zip(&b_hh).map(|(a, b)| a + b).collect(),
            out_w: tensor(&st, "final_conv.weight", &[1, HIDDEN, 1])?,
            out_b: tensor(&st, "final_conv.bias", &[1])?[0],
        })
    }

    /// STFT magnitudes of every frame, frame-major, `[n][5][129]`: a zero step, then the four steps; the next frame's zero step (or the
    /// zeros past the end) closes each frame, so the first convolution wastes no row on them.
    fn magnitudes(&self, padded: &[f32], n: usize) -> Vec<f32> {
        let mut mag = vec![0f32; n * (STFT_FRAMES + 1) * BINS + 3 * BINS];
        if let Some((fft, window)) = &self.fft {
            let mut buf = vec![Complex32::default(); N_FFT];
            let mut scratch = vec![Complex32::default(); fft.get_inplace_scratch_len()];
            for f in 0..n {
                for t in 0..STFT_FRAMES {
                    let x = &padded[f * PADDED + t * HOP..f * PADDED + t * HOP + N_FFT];
                    for ((b, x), w) in buf.iter_mut().zip(x).zip(window) {
                        *b = Complex32::new(x * w, 0.0);
                    }
                    fft.process_with_scratch(&mut buf, &mut scratch);
                    let d = &mut mag[(f * 5 + t + 1) * BINS..(f * 5 + t + 2) * BINS];
                    for (d, b) in d.iter_mut().zip(&buf) {
                        *d = (b.re * b.re + b.im * b.im).sqrt();
                    }
                }
            }
            return mag;
        }
        // Rows at a hop of 128 through all frames; 640 = 5 hops, so rows 5f..5f+3 are frame
        // f's four STFT frames and every fifth row (straddling two frames) is unused.
        let rows = n * 5;
        let mut spec = vec![0f32; rows * 2 * BINS];
        rows_times_weight(padded, rows, HOP, N_FFT, &self.stft, None, &mut spec);
        for f in 0..n {
            for t in 0..STFT_FRAMES {
                let s = &spec[(f * 5 + t) * 2 * BINS..(f * 5 + t + 1) * 2 * BINS];
                let d = &mut mag[(f * 5 + t + 1) * BINS..(f * 5 + t + 2) * BINS];
                for (b, d) in d.iter_mut().enumerate() {
                    *d = (s[b] * s[b] + s[BINS + b] * s[BINS + b]).sqrt();
                }
            }
        }
        mag
    }

    /// Speech probabilities of the whole frames in `samples` (16 kHz, a multiple of
    /// [`FRAME`] long), continuing from `state` and leaving it after the last frame.
    pub fn process(&self, state: &mut VadState, samples: &[f32]) -> Vec<f32> {
        let n = samples.len() / FRAME;
        if n == 0 {
            return Vec::new();
        }
        // Each frame's 576 inputs, reflect-padded to 640, frames back to back (plus one spare
        // hop so that the STFT's rows that straddle two frames stay inside the buffer).
        let mut padded = vec![0f32; n * PADDED + HOP];
        for f in 0..n {
            let dst = &mut padded[f * PADDED..(f + 1) * PADDED];
            let new = &samples[f * FRAME..(f + 1) * FRAME];
            if f == 0 {
                dst[..CONTEXT].copy_from_slice(&state.context);
            } else {
                dst[..CONTEXT].copy_from_slice(&samples[f * FRAME - CONTEXT..f * FRAME]);
            }
            dst[CONTEXT..INPUT].copy_from_slice(new);
            for i in 0..PADDED - INPUT {
                dst[INPUT + i] = dst[INPUT - 2 - i];
            }
        }
        state
            .context
            .copy_from_slice(&samples[n * FRAME - CONTEXT..n * FRAME]);

        let mag = self.magnitudes(&padded, n);
        // conv1 (stride 1): output t of frame f reads steps t..t+2 of its five (and the next
        // frame's leading zero step for t = 3).
        let x1 = conv_rows(&self.conv1, &mag, n, 5, 4, 1);
        let x2 = conv_rows(&self.conv2, &x1, n, 6, 2, 2);
        let x3 = conv_rows(&self.conv3, &x2, n, 4, 1, 2);
        let x4 = conv_rows(&self.conv4, &x3, n, 3, 1, 1);

        // The LSTM: its input products for the whole block at once, then the recurrence;
        // then ReLU, the 1x1 convolution and the sigmoid.
        let mut from_x = vec![0f32; n * 4 * HIDDEN];
        rows_times_weight(
            &x4[HIDDEN..],
            n,
            3 * HIDDEN,
            HIDDEN,
            &self.w_ih,
            Some(&self.lstm_b),
            &mut from_x,
        );
        let mut probs = Vec::with_capacity(n);
        let mut gates = vec![0f32; 4 * HIDDEN];
        for f in 0..n {
            gates.copy_from_slice(&from_x[f * 4 * HIDDEN..(f + 1) * 4 * HIDDEN]);
            matvec_acc(&self.w_hh, &state.h, &mut gates);
            for j in 0..HIDDEN {
                let i = sigmoid(gates[j]);
                let fg = sigmoid(gates[HIDDEN + j]);
                let g = tanh(gates[2 * HIDDEN + j]);
                let o = sigmoid(gates[3 * HIDDEN + j]);
                state.c[j] = fg * state.c[j] + i * g;
                state.h[j] = o * tanh(state.c[j]);
            }
            let z: f32 = state
                .h
                .iter()
                .zip(&self.out_w)
                .map(|(h, w)| h.max(0.0) * w)
                .sum::<f32>()
                + self.out_b;
            probs.push(sigmoid(z));
        }
        probs
    }
}

/// One kernel-3 convolution over every frame of a block. The input is `[n][slots][cin]`, each
/// frame's time steps with a zero step either side (and zeros past the last); the output is
/// `[n][tout + 2][cout]` in the same form, ReLU applied, ready for the next convolution.
fn conv_rows(c: &Conv3, x: &[f32], n: usize, slots: usize, tout: usize, stride: usize) -> Vec<f32> {
    // Output t of frame f reads slots stride * t .. stride * t + 2 of it; frames are `slots`
    // apart, a multiple of the stride, so one product over rows `stride` slots apart covers
    // every frame (the rows between two frames' outputs are computed and left out).
    // A single output step per frame needs no rows in between: one row per frame.
    let (per_frame, row_stride) = if tout == 1 {
        (1, slots * c.cin)
    } else {
        debug_assert_eq!(slots % stride, 0);
        (slots / stride, stride * c.cin)
    };
    let rows = (n - 1) * per_frame + tout;
    let mut y = vec![0f32; rows * c.cout];
    rows_times_weight(x, rows, row_stride, 3 * c.cin, &c.w, Some(&c.b), &mut y);
    let frame_out = tout + 2;
    let mut out = vec![0f32; n * frame_out * c.cout + 3 * c.cout];
    for f in 0..n {
        let src = &y[f * per_frame * c.cout..(f * per_frame + tout) * c.cout];
        let dst = &mut out[(f * frame_out + 1) * c.cout..(f * frame_out + 1 + tout) * c.cout];
        for (d, v) in dst.iter_mut().zip(src) {
            *d = v.max(0.0);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rng::SeededNormal;

    pub(crate) fn random_detector_bytes(seed: u64) -> Vec<u8> {
        crate::synthetic::tiny_detector_bytes(seed)
    }

    /// The plain twin: one frame at a time, every convolution written out as its sum.
    #[allow(clippy::needless_range_loop)] // the sums as written, index by index
    fn plain_frame(v: &SileroVad, st: &mut VadState, new: &[f32]) -> f32 {
        let mut x: Vec<f32> = st.context.iter().chain(new).copied().collect();
        for i in 0..64 {
            x.push(x[INPUT - 2 - i]);
        }
        st.context.copy_from_slice(&new[FRAME - CONTEXT..]);
        let mut mag = vec![vec![0f32; STFT_FRAMES]; BINS];
        for t in 0..STFT_FRAMES {
            for b in 0..BINS {
                let (mut re, mut im) = (0f64, 0f64);
                for k in 0..N_FFT {
                    re += v.stft[b * N_FFT + k] as f64 * x[t * HOP + k] as f64;
                    im += v.stft[(BINS + b) * N_FFT + k] as f64 * x[t * HOP + k] as f64;
                }
                mag[b][t] = (re * re + im * im).sqrt() as f32;
            }
        }
        let conv = |c: &Conv3, x: &Vec<Vec<f32>>, stride: usize| -> Vec<Vec<f32>> {
            let tin = x[0].len();
            let tout = (tin + 2 - 3) / stride + 1;
            (0..c.cout)
                .map(|o| {
                    (0..tout)
                        .map(|t| {
                            let mut s = c.b[o] as f64;
                            for i in 0..c.cin {
                                for k in 0..3 {
                                    let ti = (stride * t + k) as isize - 1;
                                    if ti >= 0 && (ti as usize) < tin {
                                        s += c.w[o * 3 * c.cin + k * c.cin + i] as f64
                                            * x[i][ti as usize] as f64;
                                    }
                                }
                            }
                            (s as f32).max(0.0)
                        })
                        .collect()
                })
                .collect()
        };
        let x4 = conv(
            &v.conv4,
            &conv(&v.conv3, &conv(&v.conv2, &conv(&v.conv1, &mag, 1), 2), 2),
            1,
        );
        let mut gates = v.lstm_b.clone();
        for (r, g) in gates.iter_mut().enumerate() {
            for j in 0..HIDDEN {
                *g += v.w_ih[r * HIDDEN + j] * x4[j][0] + v.w_hh[r * HIDDEN + j] * st.h[j];
            }
        }
        for j in 0..HIDDEN {
            let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
            let (i, f) = (sigmoid(gates[j]), sigmoid(gates[HIDDEN + j]));
            let (g, o) = (gates[2 * HIDDEN + j].tanh(), sigmoid(gates[3 * HIDDEN + j]));
            st.c[j] = f * st.c[j] + i * g;
            st.h[j] = o * st.c[j].tanh();
        }
        let z: f32 = (0..HIDDEN)
            .map(|j| st.h[j].max(0.0) * v.out_w[j])
            .sum::<f32>()
            + v.out_b;
        1.0 / (1.0 + (-z).exp())
    }

    fn audio(n: usize) -> Vec<f32> {
        let mut rng = SeededNormal::new(9);
        (0..n)
            .map(|i| 0.3 * (i as f32 * 0.05).sin() + 0.05 * rng.sample())
            .collect()
    }

    #[test]
    fn blocks_match_the_plain_frame_by_frame_twin() {
        let v = SileroVad::from_bytes(&random_detector_bytes(4)).unwrap();
        let x = audio(FRAME * 7);
        let mut st = VadState::default();
        let got = v.process(&mut st, &x);
        let mut st2 = VadState::default();
        for (f, g) in got.iter().enumerate() {
            let want = plain_frame(&v, &mut st2, &x[f * FRAME..(f + 1) * FRAME]);
            assert!((g - want).abs() < 1e-5, "frame {f}: {g} vs {want}");
        }
        assert!(st.h.iter().zip(&st2.h).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    #[test]
    fn hann_dft_filters_run_as_an_fft_with_the_same_result() {
        let mut v = SileroVad::from_bytes(&random_detector_bytes(6)).unwrap();
        assert!(v.fft.is_none(), "random filters are no DFT");
        for b in 0..BINS {
            for n in 0..N_FFT {
                let w = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / 256.0).cos();
                let a = 2.0 * std::f64::consts::PI * ((b * n) % N_FFT) as f64 / 256.0;
                v.stft[b * N_FFT + n] = (w * a.cos()) as f32;
                v.stft[(BINS + b) * N_FFT + n] = (-w * a.sin()) as f32;
            }
        }
        let x = audio(FRAME * 6);
        let by_product = v.process(&mut VadState::default(), &x);
        v.fft = stft_as_fft(&v.stft);
        assert!(v.fft.is_some());
        let by_fft = v.process(&mut VadState::default(), &x);
        for (a, b) in by_product.iter().zip(&by_fft) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn any_split_into_blocks_gives_the_same_probabilities() {
        let v = SileroVad::from_bytes(&random_detector_bytes(5)).unwrap();
        let x = audio(FRAME * 10);
        let whole = v.process(&mut VadState::default(), &x);
        let mut st = VadState::default();
        let mut parts = v.process(&mut st, &x[..FRAME * 3]);
        parts.extend(v.process(&mut st, &x[FRAME * 3..FRAME * 4]));
        parts.extend(v.process(&mut st, &x[FRAME * 4..]));
        assert_eq!(whole.len(), 10);
        for (a, b) in whole.iter().zip(&parts) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn wrong_files_are_clear_errors() {
        assert!(SileroVad::from_bytes(b"not safetensors").is_err());
        let mut bytes = random_detector_bytes(1);
        // A missing tensor: rename one in the header.
        let pos = bytes.windows(9).position(|w| w == b"conv4.bia").unwrap();
        bytes[pos] = b'k';
        let e = SileroVad::from_bytes(&bytes).err().unwrap().to_string();
        assert!(e.contains("conv4.bias"), "{e}");
    }
}
