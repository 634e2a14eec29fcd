//! Products of a few strided rows with a weight in PyTorch's `[out, in]` layout, on the calling
//! thread: what a small streaming model (the speech detector) runs per block of audio. Rows may
//! overlap (frames of a signal taken with a hop), so a 1-D convolution is one product.

use super::{MatRef, avx2_dispatch, gemm_f32};

avx2_dispatch!(
    /// `dst[o] += sum_i weight[o * x.len() + i] * x[i]`: one row times a weight, for the steps
    /// of a recurrence (`gemm` is built for many rows; one row is a dot product per output).
    pub fn matvec_acc(weight: &[f32], x: &[f32], dst: &mut [f32]) => matvec_acc_generic
);

#[inline(always)]
fn matvec_acc_generic(weight: &[f32], x: &[f32], dst: &mut [f32]) {
    let k = x.len();
    assert!(
        k > 0 && weight.len() == k * dst.len(),
        "weight is not [{}, {k}]",
        dst.len()
    );
    for (d, w) in dst.iter_mut().zip(weight.chunks_exact(k)) {
        // Eight partial sums, so the loop vectorises (and FMA chains do not serialise).
        let mut acc = [0f32; 8];
        let (wc, wr) = (w.chunks_exact(8), w.chunks_exact(8).remainder());
        let (xc, xr) = (x.chunks_exact(8), x.chunks_exact(8).remainder());
        for (a, b) in wc.zip(xc) {
            for j in 0..8 {
                acc[j] = a[j].mul_add(b[j], acc[j]);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (a, b) in wr.iter().zip(xr) {
            s += a * b;
        }
        *d += s;
    }
}

/// `dst[r][o] = bias[o] + sum_i x[r * row_stride + i] * weight[o * k + i]` for `rows` rows of
/// `k` inputs and `n = weight.len() / k` outputs; `dst` is `rows x n`, row-major.
///
/// Panics when the rows or the weight do not fit their slices (a caller's bug, not input data).
pub fn rows_times_weight(
    x: &[f32],
    rows: usize,
    row_stride: usize,
    k: usize,
    weight: &[f32],
    bias: Option<&[f32]>,
    dst: &mut [f32],
) {
    assert!(
        k > 0 && weight.len().is_multiple_of(k),
        "weight is not [n, {k}]"
    );
    let n = weight.len() / k;
    assert!(bias.is_none_or(|b| b.len() == n), "bias is not [{n}]");
    assert_eq!(dst.len(), rows * n, "dst is not [{rows}, {n}]");
    if rows == 0 || n == 0 {
        return;
    }
    assert!(
        (rows - 1) * row_stride + k <= x.len(),
        "{rows} rows of {k} at stride {row_stride} overrun {} inputs",
        x.len()
    );
    let lhs = MatRef {
        ptr: x.as_ptr(),
        row_stride,
        col_stride: 1,
    };
    // The weight read as its transpose: element (i, o) at weight[o * k + i].
    let rhs = MatRef {
        ptr: weight.as_ptr(),
        row_stride: 1,
        col_stride: k,
    };
    // SAFETY: the asserts above keep every row of `x`, the whole weight and `dst` (rows x n,
    // row stride n) inside their slices; `dst` is a unique borrow, so it overlaps nothing.
    unsafe { gemm_f32((rows, n, k), dst.as_mut_ptr(), n, lhs, rhs) };
    if let Some(b) = bias {
        for row in dst.chunks_exact_mut(n) {
            for (d, b) in row.iter_mut().zip(b) {
                *d += b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededNormal;

    /// The plain twin: the sum as written, in f64.
    fn plain(x: &[f32], rows: usize, stride: usize, k: usize, w: &[f32], b: &[f32]) -> Vec<f32> {
        let n = w.len() / k;
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            for o in 0..n {
                let mut s = b[o] as f64;
                for i in 0..k {
                    s += x[r * stride + i] as f64 * w[o * k + i] as f64;
                }
                out[r * n + o] = s as f32;
            }
        }
        out
    }

    #[test]
    fn overlapping_and_gapped_rows_match_the_plain_sum() {
        let mut rng = SeededNormal::new(3);
        for (rows, stride, k, n) in [
            (4, 128, 256, 258),
            (7, 129, 387, 128),
            (1, 5, 3, 1),
            (3, 300, 192, 65),
        ] {
            let x: Vec<f32> = (0..(rows - 1) * stride + k).map(|_| rng.sample()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.sample()).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.sample()).collect();
            let mut got = vec![0f32; rows * n];
            rows_times_weight(&x, rows, stride, k, &w, Some(&b), &mut got);
            let want = plain(&x, rows, stride, k, &w, &b);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
            }
        }
    }

    #[test]
    fn matvec_matches_the_plain_sum() {
        let mut rng = SeededNormal::new(8);
        for (n, k) in [(512, 128), (3, 13), (1, 8), (7, 1)] {
            let x: Vec<f32> = (0..k).map(|_| rng.sample()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.sample()).collect();
            let mut got = vec![1f32; n];
            matvec_acc(&w, &x, &mut got);
            let want = plain(&x, 1, 0, k, &w, &vec![1.0; n]);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "overrun")]
    fn rows_past_the_input_are_refused() {
        let mut dst = vec![0f32; 2];
        rows_times_weight(&[0.0; 10], 2, 8, 4, &[0.0; 4], None, &mut dst);
    }
}
