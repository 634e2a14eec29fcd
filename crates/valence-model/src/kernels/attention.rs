//! Unmasked multi-head self-attention on the CPU, one fused op per layer. Built from candle ops,
//! attention makes strided copies to split Q, K and V into heads, a scaling pass, a batched
//! product of head-sized GEMMs too small to split well over threads, a scalar-`expf` softmax
//! and a copy to merge the heads. Here each head is one task on candle's CPU pool: it reads its
//! Q, K and V columns straight out of the fused QKV projection's output, multiplies
//! single-threaded (`gemm`, candle's engine), applies the scaled softmax in place with a
//! vectorised `exp`, and writes its context columns straight into the merged output.
//! Twin: the same attention from candle's ops (tests).

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::activation::exp_approx;
use super::{MatRef, SyncPtr, avx2_dispatch, contiguous_f32, gemm_f32};

/// `softmax(q k^T / sqrt(head_dim)) v` per head, from `qkv` [batch, time, 3 * width] (the Q, K and
/// V projections side by side); returns the heads' contexts merged, [batch, time, width]. Only
/// for contiguous f32 CPU tensors (see [`supported`]).
pub fn fused_self_attention(qkv: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (_, _, w3) = qkv.dims3()?;
    if w3 % 3 != 0 || (w3 / 3) % heads != 0 {
        candle_core::bail!("qkv width {w3} is not 3 x a multiple of {heads} heads");
    }
    qkv.contiguous()?
        .apply_op1_no_bwd(&FusedAttention { heads })
}

/// Whether [`fused_self_attention`] takes tensors like `x`.
pub fn supported(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32
}

struct FusedAttention {
    heads: usize,
}

impl CustomOp1 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-self-attention-f32"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = contiguous_f32(self.name(), storage, layout)?;
        let (batch, t, w3) = layout.shape().dims3()?;
        let qkv = data;
        let width = w3 / 3;
        let heads = self.heads;
        let hd = width / heads;
        let scale = (hd as f32).powf(-0.5);
        let mut out = vec![0f32; batch * t * width];
        let out_ptr = SyncPtr(out.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(batch * heads, |tasks| {
            let mut scores = vec![0f32; t * t];
            for task in tasks {
                let (b, h) = (task / heads, task % heads);
                let base = &qkv[b * t * w3..(b + 1) * t * w3];
                let q = base[h * hd..].as_ptr();
                let k = base[width + h * hd..].as_ptr();
                let v = base[2 * width + h * hd..].as_ptr();
                // SAFETY (both products): q, k and v are [t, hd] column blocks of the
                // [t, 3 * width] batch slice, rows w3 apart, so every read stays inside it;
                // `scores` is [t, t]; this task's output block is rows b * t .. (b + 1) * t,
                // columns h * hd .. (h + 1) * hd of `out`, disjoint from every other task's.
                unsafe {
                    // scores = q k^T: k^T is k read with its row and column strides swapped.
                    gemm_f32(
                        (t, t, hd),
                        scores.as_mut_ptr(),
                        t,
                        MatRef {
                            ptr: q,
                            row_stride: w3,
                            col_stride: 1,
                        },
                        MatRef {
                            ptr: k,
                            row_stride: 1,
                            col_stride: w3,
                        },
                    );
                }
                for row in scores.chunks_exact_mut(t) {
                    scaled_softmax(row, scale);
                }
                unsafe {
                    gemm_f32(
                        (t, hd, t),
                        out_ptr.get().add(b * t * width + h * hd),
                        width,
                        MatRef {
                            ptr: scores.as_ptr(),
                            row_stride: t,
                            col_stride: 1,
                        },
                        MatRef {
                            ptr: v,
                            row_stride: w3,
                            col_stride: 1,
                        },
                    );
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((batch, t, width))))
    }
}

avx2_dispatch!(
    /// In place: `row = softmax(scale * row)`.
    fn scaled_softmax(row: &mut [f32], scale: f32) => scaled_softmax_generic
);

#[inline(always)]
fn scaled_softmax_generic(row: &mut [f32], scale: f32) {
    // Lane-wise max and sum so that both reductions vectorise (a single running value would be
    // a serial dependency chain, and `f32::max` keeps NaN rules that block vectorisation).
    const LANES: usize = 16;
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &x) in lane_max.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lane_max)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for x in row.iter_mut() {
        *x = exp_approx((*x - max) * scale);
    }
    let mut lane_sum = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (s, &x) in lane_sum.iter_mut().zip(c) {
            *s += x;
        }
    }
    let sum: f32 = lane_sum.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the same attention built from candle ops, for several head counts and odd sizes.
    #[test]
    fn matches_candle_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (b, t, heads, hd) in [
            (1, 37, 4, 16),
            (2, 5, 3, 20),
            (1, 200, 16, 64),
            (1, 1, 2, 8),
        ] {
            let width = heads * hd;
            let qkv = (Tensor::randn(0f32, 1., (b, t, 3 * width), &dev)? * 3.0)?;
            let got = fused_self_attention(&qkv, heads)?;
            let split = |i: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(2, i * width, width)?
                    .reshape((b, t, heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = (split(0)? * (hd as f64).powf(-0.5))?;
            let p = candle_nn::ops::softmax_last_dim(&q.matmul(&split(1)?.t()?)?)?;
            let want = p
                .matmul(&split(2)?)?
                .transpose(1, 2)?
                .reshape((b, t, width))?;
            let diff = crate::kernels::max_abs(&(got - &want)?);
            // f32 rounding scales with the outputs (contexts of several units here): an absolute
            // 1e-5 failed about 1 run in 150 on random inputs; a wrong kernel errs by O(1).
            let bound = 1e-5 * crate::kernels::max_abs(&want).max(1.0);
            assert!(
                diff < bound,
                "{:?}: max diff {diff} (bound {bound})",
                (b, t, heads, hd)
            );
        }
        Ok(())
    }

    /// The in-place softmax against a plain f64 softmax, for odd lengths and scales.
    #[test]
    fn scaled_softmax_matches_its_twin() {
        for len in [1usize, 3, 15, 16, 17, 501] {
            for scale in [0.125f32, 1.0] {
                let src: Vec<f32> = (0..len).map(|i| ((i * 613) % 97) as f32 - 40.0).collect();
                let mut got = src.clone();
                scaled_softmax(&mut got, scale);
                let max = src
                    .iter()
                    .map(|&x| (x * scale) as f64)
                    .fold(f64::MIN, f64::max);
                let exps: Vec<f64> = src
                    .iter()
                    .map(|&x| ((x * scale) as f64 - max).exp())
                    .collect();
                let sum: f64 = exps.iter().sum();
                for (g, e) in got.iter().zip(&exps) {
                    assert!(
                        (*g as f64 - e / sum).abs() < 1e-6,
                        "len {len} scale {scale}"
                    );
                }
            }
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_survive_large_scores() {
        let mut row = vec![1000.0, 999.0, -1000.0, 0.0];
        scaled_softmax(&mut row, 1.0);
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6, "{row:?}");
        assert!(
            (row[0] / row[1] - std::f32::consts::E).abs() < 1e-4,
            "{row:?}"
        );
        assert!(row.iter().all(|x| x.is_finite()));
    }
}
