//! The dense projection `x W^T + b` (optionally followed by the erf GELU) with `W^T` stored as
//! a contiguous [in, out] matrix that the product reads in place. Twin: candle's
//! `broadcast_matmul`, `broadcast_add` and `gelu_erf`.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};

use super::epilogue::{RowEpilogue, row_epilogue};
use super::{MatRef, contiguous_f32, par_gemm_f32};

/// Whether [`dense`] runs for these operands (f32 on the CPU).
pub fn supported(x: &Tensor, weight_t: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && weight_t.dtype() == DType::F32
}

/// `x [.., in] · weight_t [in, out] + bias [out]`, then the erf GELU when `gelu`.
pub fn dense(
    x: &Tensor,
    weight_t: &Tensor,
    bias: &Tensor,
    gelu: bool,
) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3_no_bwd(weight_t, bias, &DenseProduct { gelu })
}

/// The CPU f32 projection: x [.., in] times `W^T` [in, out] read in place, then bias (and GELU)
/// per output row while it is in cache. Saves the separate bias pass, the product's zero-filled
/// destination being read back, and for the feed-forward's first product the GELU's own
/// allocation and pass.
struct DenseProduct {
    gelu: bool,
}

impl CustomOp3 for DenseProduct {
    fn name(&self) -> &'static str {
        "dense-product-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = contiguous_f32(self.name(), s2, l2)?;
        let bias = contiguous_f32(self.name(), s3, l3)?;
        let (k, n) = l2.shape().dims2()?;
        let x = projection_input(self.name(), s1, l1, (k, n), Some(bias))?;
        let dims = l1.dims();
        let m = x.len() / k;
        let mut dst = vec![0f32; m * n];
        // SAFETY: x is [m, k] and w [k, n], both contiguous row-major; dst is [m, n].
        unsafe {
            par_gemm_f32(
                (m, n, k),
                dst.as_mut_ptr(),
                n,
                MatRef {
                    ptr: x.as_ptr(),
                    row_stride: k,
                    col_stride: 1,
                },
                MatRef {
                    ptr: w.as_ptr(),
                    row_stride: n,
                    col_stride: 1,
                },
            );
        }
        Ok(projection_output(dst, dims, n, Some(bias), self.gelu))
    }
}

/// The input of a projection of width `k` -> `n` as a candle op sees it: its contiguous f32
/// values, once its last dimension is `k` and the bias (when there is one) has `n` values.
pub(crate) fn projection_input<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
    (k, n): (usize, usize),
    bias: Option<&[f32]>,
) -> candle_core::Result<&'a [f32]> {
    let x = contiguous_f32(op, storage, layout)?;
    let dims = layout.dims();
    if dims.last() != Some(&k) || bias.is_some_and(|b| b.len() != n) {
        candle_core::bail!(
            "{op}: projection of width {k} -> {n} applied to {dims:?} (bias {:?})",
            bias.map(<[f32]>::len)
        );
    }
    Ok(x)
}

/// A projection's product `dst` [.., n] with the bias (and GELU) applied, shaped as the input
/// `dims` with the last one now `n`.
pub(crate) fn projection_output(
    mut dst: Vec<f32>,
    dims: &[usize],
    n: usize,
    bias: Option<&[f32]>,
    gelu: bool,
) -> (CpuStorage, Shape) {
    row_epilogue(
        &mut dst,
        n,
        &RowEpilogue {
            bias,
            norm: None,
            gelu,
        },
    );
    let mut shape = dims.to_vec();
    *shape.last_mut().unwrap_or(&mut 0) = n;
    (CpuStorage::F32(dst), Shape::from(shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn twin(x: &Tensor, w_t: &Tensor, b: &Tensor, gelu: bool) -> Tensor {
        let y = x.broadcast_matmul(w_t).unwrap().broadcast_add(b).unwrap();
        if gelu { y.gelu_erf().unwrap() } else { y }
    }

    /// Odd sizes, 2-D and 3-D inputs, a transposed (non-contiguous) input.
    #[test]
    fn dense_matches_candle_ops() {
        let dev = Device::Cpu;
        for (rows, k, n) in [
            (1usize, 1usize, 1usize),
            (7, 13, 5),
            (45, 12, 7),
            (130, 33, 65),
        ] {
            let w_t = Tensor::randn(0f32, 1., (k, n), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., n, &dev).unwrap();
            let inputs = [
                Tensor::randn(0f32, 1., (rows, k), &dev).unwrap(),
                Tensor::randn(0f32, 1., (2, rows, k), &dev).unwrap(),
                Tensor::randn(0f32, 1., (k, rows), &dev)
                    .unwrap()
                    .t()
                    .unwrap(),
            ];
            for x in inputs {
                for gelu in [false, true] {
                    let got = dense(&x, &w_t, &b, gelu).unwrap();
                    let want = twin(&x, &w_t, &b, gelu);
                    assert_eq!(got.dims(), want.dims());
                    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
                    let diff = diff.to_scalar::<f32>().unwrap();
                    assert!(diff < 1e-4, "({rows}, {k}, {n}) gelu {gelu}: {diff}");
                }
            }
        }
    }

    #[test]
    fn dense_rejects_mismatched_widths() {
        let dev = Device::Cpu;
        let w_t = Tensor::zeros((4, 3), DType::F32, &dev).unwrap();
        let b = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let x = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
        assert!(dense(&x, &w_t, &b, false).is_err());
    }
}
