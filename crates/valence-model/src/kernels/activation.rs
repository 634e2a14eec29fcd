//! The erf GELU (HF's "gelu") and the branch-free `erf`/`exp` it is built on. candle's own
//! `gelu_erf` calls libm's scalar `erf` per element; these vectorise. Twin: candle's `gelu_erf`
//! and its f64 `erf`.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::{avx2_dispatch, contiguous_f32, par_pieces_mut};

/// The erf GELU: `0.5 x (1 + erf(x / sqrt 2))`. Contiguous CPU f32 runs the vectorised kernel
/// on candle's pool; other devices and dtypes candle's op.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&GeluErfF32)
    } else {
        x.gelu_erf()
    }
}

struct GeluErfF32;

impl CustomOp1 for GeluErfF32 {
    fn name(&self) -> &'static str {
        "gelu-erf-f32"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(self.name(), storage, layout)?;
        // Zeroed by the allocator (fresh pages for large sizes), written once by the workers:
        // no serial copy of the input first.
        let mut dst = vec![0f32; src.len()];
        gelu_erf_into(src, &mut dst);
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// `dst = gelu(src)`, split across candle's CPU worker threads (its own pool, so no second
/// pool competes with candle's spinning workers for the cores).
fn gelu_erf_into(src: &[f32], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    par_pieces_mut(dst, 8 * 1024, |offset, part| {
        gelu_erf_chunk_into(&src[offset..offset + part.len()], part)
    });
}

avx2_dispatch!(
    /// In-place erf GELU on the calling thread (for callers that already split the work).
    pub(crate) fn gelu_erf_chunk(xs: &mut [f32]) => gelu_erf_in_place
);

avx2_dispatch!(fn gelu_erf_chunk_into(src: &[f32], dst: &mut [f32]) => gelu_erf_into_generic);

#[inline(always)]
fn gelu_erf_in_place(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = gelu_erf_scalar(*x));
}

#[inline(always)]
fn gelu_erf_into_generic(src: &[f32], dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = gelu_erf_scalar(x);
    }
}

#[inline(always)]
fn gelu_erf_scalar(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_approx(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Branch-free erf: Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7; under 1e-6 in f32 arithmetic)
/// with a polynomial exp.
#[inline(always)]
pub fn erf_approx(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_approx(-a * a);
    y.copysign(x)
}

/// Branch-free `exp` for f32 (relative error < 3e-7 over the normal range); inputs below
/// -87 flush to ~0, as erf and softmax want.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest with the 1.5 * 2^23 trick (vectorises without SSE4.1's round).
    let n = (x * LOG2E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * LN2_HI - n * LN2_LO;
    // exp(r) on [-ln2/2, ln2/2]: Cephes expf polynomial.
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    // 2^n from the float n without a float->int conversion (which would not vectorise): n + 127
    // lands in the low mantissa bits of n + 127 + 2^23; shifting by 23 moves it into the
    // exponent field and drops the magic number's own exponent.
    let scale = f32::from_bits((n + 127.0 + 8_388_608.0).to_bits() << 23);
    e * scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::max_abs;

    /// candle's own f64 erf as the reference.
    fn erf_f64(x: f64) -> f64 {
        let t = Tensor::new(&[x], &Device::Cpu).unwrap();
        t.erf().unwrap().to_vec1::<f64>().unwrap()[0]
    }

    #[test]
    fn erf_and_exp_are_accurate() {
        let mut worst_erf = 0f64;
        let mut worst_exp = 0f64;
        for i in -6000..=6000 {
            let x = i as f32 / 1000.0;
            worst_erf = worst_erf.max((erf_approx(x) as f64 - erf_f64(x as f64)).abs());
            let arg = x * 10.0;
            let e = (arg as f64).exp();
            worst_exp = worst_exp.max((exp_approx(arg) as f64 - e).abs() / e);
        }
        assert!(worst_erf < 1e-6, "erf error {worst_erf}");
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp}");
        assert_eq!(erf_approx(-0.7), -erf_approx(0.7));
        assert!(exp_approx(-1000.0) < 1e-37);
    }

    /// Sizes below, at and above one piece of the pool split, odd ones included, and a
    /// non-contiguous input.
    #[test]
    fn gelu_matches_candle() {
        for len in [1usize, 7, 8 * 1024, 8 * 1024 + 3, 100_003] {
            let xs: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37) % 20.0 - 10.0).collect();
            let t = Tensor::from_vec(xs, len, &Device::Cpu).unwrap();
            let diff = max_abs(&(gelu_erf(&t).unwrap() - t.gelu_erf().unwrap()).unwrap());
            assert!(diff < 1e-5, "len {len}: max |diff| {diff}");
        }
        let t = Tensor::randn(0f32, 3., (33, 17), &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        let diff = max_abs(&(gelu_erf(&t).unwrap() - t.gelu_erf().unwrap()).unwrap());
        assert!(diff < 1e-5, "transposed: max |diff| {diff}");
    }
}
