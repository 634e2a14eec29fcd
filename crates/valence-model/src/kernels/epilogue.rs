//! What follows a product, row by row while each block of rows is in cache: bias, layer norm,
//! erf GELU. Twin: the same steps in f64, one row at a time.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

use super::activation::gelu_erf_chunk;
use super::{avx2_dispatch, par_pieces_mut};

/// A layer norm over each row: `(x - mean) / sqrt(var + eps) * weight + bias`.
#[derive(Debug, Clone)]
pub struct RowNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

/// What follows a product, row by row, in [`row_epilogue`]: bias, then layer norm, then GELU.
pub(crate) struct RowEpilogue<'a> {
    pub(crate) bias: Option<&'a [f32]>,
    pub(crate) norm: Option<&'a RowNorm>,
    pub(crate) gelu: bool,
}

/// Applies `e` to each row (`width` values) of a product's output in one pass on candle's
/// pool, each block of rows while it is in cache (separate ops made a pass and, but for the
/// bias, an allocation each).
pub(crate) fn row_epilogue(dst: &mut [f32], width: usize, e: &RowEpilogue) {
    const ROWS_PER_TASK: usize = 32;
    if e.bias.is_none() && e.norm.is_none() && !e.gelu {
        return;
    }
    par_pieces_mut(dst, ROWS_PER_TASK * width, |_, rows| {
        bias_and_norm(rows, width, e);
        if e.gelu {
            gelu_erf_chunk(rows);
        }
    });
}

/// A layer norm over the last dimension as a candle op on contiguous f32 CPU tensors: rows on
/// candle's pool, vectorised (candle's own runs a scalar loop on one thread: 1 ms of a 3 s
/// Whisper window's six norms, at 2.2 ns per value).
pub struct LayerNormOp<'a>(pub &'a RowNorm);

impl CustomOp1 for LayerNormOp<'_> {
    fn name(&self) -> &'static str {
        "row-layer-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{} needs f32 input", self.name());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{} needs contiguous input", self.name());
        };
        let width = layout.dims().last().copied().unwrap_or(0);
        if width != self.0.weight.len() {
            candle_core::bail!(
                "{}: rows of {width} values for a norm of {}",
                self.name(),
                self.0.weight.len()
            );
        }
        let mut dst = data[start..end].to_vec();
        let e = RowEpilogue {
            bias: None,
            norm: Some(self.0),
            gelu: false,
        };
        row_epilogue(&mut dst, width, &e);
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

avx2_dispatch!(fn bias_and_norm(rows: &mut [f32], width: usize, e: &RowEpilogue) => bias_and_norm_generic);

#[inline(always)]
fn bias_and_norm_generic(rows: &mut [f32], width: usize, e: &RowEpilogue) {
    for row in rows.chunks_exact_mut(width) {
        if let Some(bias) = e.bias {
            for (x, b) in row.iter_mut().zip(bias) {
                *x += b;
            }
        }
        if let Some(norm) = e.norm {
            layer_norm_row(row, norm);
        }
    }
}

/// Two passes (mean, then the centred variance) with lane-wise sums so that they vectorise.
#[inline(always)]
fn layer_norm_row(row: &mut [f32], norm: &RowNorm) {
    let n = row.len() as f32;
    let mean = lane_sum(row, |x| x) / n;
    let var = lane_sum(row, |x| (x - mean) * (x - mean)) / n;
    let scale = 1.0 / (var + norm.eps).sqrt();
    for ((x, w), b) in row.iter_mut().zip(&norm.weight).zip(&norm.bias) {
        *x = (*x - mean) * scale * w + b;
    }
}

#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += f(x);
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().map(|&x| f(x)).sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn twin(row: &[f32], e: &RowEpilogue) -> Vec<f64> {
        let mut y: Vec<f64> = row.iter().map(|&x| x as f64).collect();
        if let Some(b) = e.bias {
            y.iter_mut().zip(b).for_each(|(x, &b)| *x += b as f64);
        }
        if let Some(n) = e.norm {
            let len = y.len() as f64;
            let mean = y.iter().sum::<f64>() / len;
            let var = y.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / len;
            for (i, x) in y.iter_mut().enumerate() {
                *x = (*x - mean) / (var + n.eps as f64).sqrt() * n.weight[i] as f64
                    + n.bias[i] as f64;
            }
        }
        if e.gelu {
            let erf = |x: f64| {
                let t = candle_core::Tensor::new(&[x], &candle_core::Device::Cpu).unwrap();
                t.erf().unwrap().to_vec1::<f64>().unwrap()[0]
            };
            y.iter_mut()
                .for_each(|x| *x = 0.5 * *x * (1.0 + erf(*x / std::f64::consts::SQRT_2)));
        }
        y
    }

    /// Every combination of the three steps, for odd widths and row counts on both sides of
    /// one pool task (32 rows).
    #[test]
    fn row_epilogue_matches_its_twin() {
        for (rows, width) in [(1usize, 1usize), (3, 17), (33, 5), (70, 31)] {
            let src: Vec<f32> = (0..rows * width)
                .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
                .collect();
            let bias: Vec<f32> = (0..width).map(|i| i as f32 * 0.1 - 0.5).collect();
            let norm = RowNorm {
                weight: (0..width).map(|i| 1.0 + i as f32 * 0.01).collect(),
                bias: (0..width).map(|i| 0.2 - i as f32 * 0.02).collect(),
                eps: 1e-5,
            };
            for mask in 0..8 {
                let e = RowEpilogue {
                    bias: (mask & 1 != 0).then_some(&bias[..]),
                    norm: (mask & 2 != 0).then_some(&norm),
                    gelu: mask & 4 != 0,
                };
                let mut got = src.clone();
                row_epilogue(&mut got, width, &e);
                for (r, row) in src.chunks(width).enumerate() {
                    let want = twin(row, &e);
                    for (c, w) in want.iter().enumerate() {
                        let g = got[r * width + c] as f64;
                        assert!(
                            (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                            "rows {rows} width {width} mask {mask} at ({r}, {c}): {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
