//! 1-D convolution over channels-last frames, reading its windows in place. With frames as
//! rows, the window of `kernel` frames one output frame reads is `kernel * channels` contiguous
//! values, and consecutive windows start `stride * channels` apart: the im2col matrix is already
//! in memory, as a matrix whose rows overlap, and one `gemm` call per group reads it. The bias,
//! an optional per-frame layer norm and the erf GELU run in one pass over the output. Twin: a
//! direct scalar convolution.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::epilogue::{RowEpilogue, RowNorm, row_epilogue};
use super::int8::{self, Int8Kernel, PackedWeights};
use super::{MatRef, contiguous_f32, par_gemm_f32};

/// A convolution's weights packed for [`frame_conv`], and what follows it per output frame.
#[derive(Debug, Clone)]
pub struct PackedConv {
    /// Per group, a [kernel * in_per_group, out_per_group] row-major matrix: row `j * in_g + c`
    /// multiplies input channel `c` of the window's frame `j`.
    weights: Vec<Vec<f32>>,
    bias: Option<Vec<f32>>,
    kernel: usize,
    stride: usize,
    groups: usize,
    in_per_group: usize,
    out_per_group: usize,
    norm: Option<RowNorm>,
    gelu: bool,
    /// 8-bit copies of `weights` (per group, [out_per_group, kernel * in_per_group]) and the
    /// kernel that runs them; when set, the product runs in 8 bits (see [`PackedConv::quantize`]).
    int8: Option<(Vec<PackedWeights>, Int8Kernel)>,
}

impl PackedConv {
    /// From PyTorch's `weight` [out, in / groups, kernel] (any device and float dtype) and
    /// `bias` `[out]`.
    pub fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        groups: usize,
    ) -> candle_core::Result<Self> {
        let (out, in_g, kernel) = weight.dims3()?;
        if groups == 0 || !out.is_multiple_of(groups) || stride == 0 {
            candle_core::bail!("{out} output channels do not split into {groups} groups");
        }
        let out_g = out / groups;
        // [out, in_g, kernel] -> per group [kernel, in_g, out_g] = [kernel * in_g, out_g].
        let w = weight
            .to_dtype(DType::F32)?
            .reshape((groups, out_g, in_g, kernel))?
            .permute((0, 3, 2, 1))?
            .contiguous()?;
        let weights = (0..groups)
            .map(|g| w.get(g)?.flatten_all()?.to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let bias = bias
            .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
            .transpose()?;
        if bias.as_ref().is_some_and(|b| b.len() != out) {
            candle_core::bail!("conv bias does not have {out} values");
        }
        Ok(Self {
            weights,
            bias,
            kernel,
            stride,
            groups,
            in_per_group: in_g,
            out_per_group: out_g,
            norm: None,
            gelu: false,
            int8: None,
        })
    }

    /// Runs the product with 8-bit weights ([`int8`]) when a window holds at least 256 values
    /// (Wav2Vec2's feature-encoder layers after the first, and its positional convolution);
    /// the windows are quantized in place, never copied out. Returns whether it did.
    pub fn quantize(&mut self, kernel: Int8Kernel) -> candle_core::Result<bool> {
        let width = self.kernel * self.in_per_group;
        if width < 256 {
            return Ok(false);
        }
        let out_g = self.out_per_group;
        let packed = self
            .weights
            .iter()
            .map(|w| {
                // [width, out_g] -> [out_g, width]
                let mut t = vec![0f32; w.len()];
                for (r, row) in w.chunks_exact(out_g).enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        t[c * width + r] = v;
                    }
                }
                PackedWeights::pack(&t, out_g, width)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.int8 = Some((packed, kernel));
        Ok(true)
    }

    pub fn out_channels(&self) -> usize {
        self.groups * self.out_per_group
    }

    /// Follows the convolution with a layer norm over each output frame's channels.
    pub fn set_layer_norm(&mut self, norm: RowNorm) -> candle_core::Result<()> {
        let out = self.out_channels();
        if norm.weight.len() != out || norm.bias.len() != out {
            candle_core::bail!("layer norm size does not match the conv's {out} channels");
        }
        self.norm = Some(norm);
        Ok(())
    }

    /// Follows the convolution (and its layer norm) with the erf GELU.
    pub fn set_gelu(&mut self) {
        self.gelu = true;
    }
}

/// Runs `conv` on CPU f32 input that is already padded and group-major:
/// [batch, groups, frames, in_per_group] (or [batch, frames, in] for one group). Returns
/// [batch, frames_out, out].
pub fn frame_conv(x: &Tensor, conv: &Arc<PackedConv>) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op1_no_bwd(&WindowProduct(conv.clone()))
}

/// The CPU op: input [batch, groups, frames, in_g] (or [batch, frames, in] for one group),
/// output [batch, frames_out, out].
struct WindowProduct(Arc<PackedConv>);

impl CustomOp1 for WindowProduct {
    fn name(&self) -> &'static str {
        "frame-conv1d-f32"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = &*self.0;
        let x = contiguous_f32(self.name(), storage, layout)?;
        let dims = layout.dims();
        let (batch, frames) = (dims[0], dims[dims.len() - 2]);
        let (k, s, in_g, out_g) = (p.kernel, p.stride, p.in_per_group, p.out_per_group);
        if x.len() != batch * p.groups * frames * in_g || frames < k {
            candle_core::bail!("frame-conv1d-f32: unexpected input shape {dims:?}");
        }
        let frames_out = (frames - k) / s + 1;
        let out = p.groups * out_g;
        // Zeroed by the allocator (fresh pages for large sizes): the first touch happens in the
        // threads of the product, and the bias comes with the per-frame pass below.
        let mut dst = vec![0f32; batch * frames_out * out];
        match &p.int8 {
            Some((packed, kernel)) => {
                let mut part = vec![0f32; if p.groups > 1 { frames_out * out_g } else { 0 }];
                for b in 0..batch {
                    for (g, w) in packed.iter().enumerate() {
                        let lhs = &x[(b * p.groups + g) * frames * in_g..][..frames * in_g];
                        let rows = int8::quantize_strided_rows(lhs, frames_out, k * in_g, s * in_g);
                        let dst_b = &mut dst[b * frames_out * out..][..frames_out * out];
                        if p.groups == 1 {
                            int8::matmul(&rows, w, dst_b, *kernel);
                        } else {
                            int8::matmul(&rows, w, &mut part, *kernel);
                            for (d, r) in dst_b.chunks_exact_mut(out).zip(part.chunks_exact(out_g))
                            {
                                d[g * out_g..(g + 1) * out_g].copy_from_slice(r);
                            }
                        }
                    }
                }
            }
            None => {
                for b in 0..batch {
                    for (g, w) in p.weights.iter().enumerate() {
                        let lhs = &x[(b * p.groups + g) * frames * in_g..][..frames * in_g];
                        let dst_g = &mut dst[b * frames_out * out + g * out_g..];
                        // SAFETY: lhs row r reads lhs[r * s * in_g .. r * s * in_g + k * in_g], and the
                        // last row (r = frames_out - 1) ends at or before frames * in_g by the definition
                        // of frames_out; rhs is [k * in_g, out_g] row-major; dst row r writes
                        // dst_g[r * out .. r * out + out_g], the last ending inside `dst`. Rows of lhs
                        // overlap, which is fine: the product only reads them.
                        unsafe {
                            par_gemm_f32(
                                (frames_out, out_g, k * in_g),
                                dst_g.as_mut_ptr(),
                                out,
                                MatRef {
                                    ptr: lhs.as_ptr(),
                                    row_stride: s * in_g,
                                    col_stride: 1,
                                },
                                MatRef {
                                    ptr: w.as_ptr(),
                                    row_stride: out_g,
                                    col_stride: 1,
                                },
                            );
                        }
                    }
                }
            }
        }
        row_epilogue(
            &mut dst,
            out,
            &RowEpilogue {
                bias: p.bias.as_deref(),
                norm: p.norm.as_ref(),
                gelu: p.gelu,
            },
        );
        Ok((CpuStorage::F32(dst), Shape::from((batch, frames_out, out))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Direct convolution in f64 on channels-last, group-major-free input [batch, frames, in].
    fn twin(
        x: &[f32],
        dims: (usize, usize, usize),
        w: &[f32],
        wdims: (usize, usize, usize),
        bias: &[f32],
        stride: usize,
        groups: usize,
    ) -> Vec<f64> {
        let (b, t, cin) = dims;
        let (out, in_g, k) = wdims;
        let out_g = out / groups;
        let t_out = (t - k) / stride + 1;
        let mut y = vec![0f64; b * t_out * out];
        for bi in 0..b {
            for f in 0..t_out {
                for o in 0..out {
                    let g = o / out_g;
                    let mut acc = bias[o] as f64;
                    for c in 0..in_g {
                        for j in 0..k {
                            let xin = x[(bi * t + f * stride + j) * cin + g * in_g + c] as f64;
                            acc += xin * w[(o * in_g + c) * k + j] as f64;
                        }
                    }
                    y[(bi * t_out + f) * out + o] = acc;
                }
            }
        }
        y
    }

    /// One case (batch, frames, in, out, kernel, stride, groups) with random input and weights
    /// of spread `w_std`, through [`frame_conv`] (in 8 bits with `int8`) and through the twin.
    fn run_case(
        (b, t, cin, out, k, s, g): (usize, usize, usize, usize, usize, usize, usize),
        w_std: f32,
        int8: Option<Int8Kernel>,
    ) -> (Vec<f32>, Vec<f64>) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (b, t, cin), &dev).unwrap();
        let w = Tensor::randn(0f32, w_std, (out, cin / g, k), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1., out, &dev).unwrap();
        let mut packed = PackedConv::new(&w, Some(&bias), s, g).unwrap();
        if let Some(kernel) = int8 {
            assert!(
                packed.quantize(kernel).unwrap(),
                "window of {} values",
                k * cin / g
            );
        }
        let grouped = x
            .reshape((b, t, g, cin / g))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let got = frame_conv(&grouped, &Arc::new(packed)).unwrap();
        assert_eq!(got.dims(), &[b, (t - k) / s + 1, out]);
        let want = twin(
            &x.flatten_all().unwrap().to_vec1().unwrap(),
            (b, t, cin),
            &w.flatten_all().unwrap().to_vec1().unwrap(),
            (out, cin / g, k),
            &bias.to_vec1().unwrap(),
            s,
            g,
        );
        (got.flatten_all().unwrap().to_vec1().unwrap(), want)
    }

    #[test]
    fn frame_conv_matches_direct_convolution() {
        // (batch, frames, in, out, kernel, stride, groups), odd sizes included.
        for case in [
            (1usize, 1usize, 1usize, 1usize, 1usize, 1usize, 1usize),
            (2, 23, 3, 5, 3, 2, 1),
            (1, 40, 8, 12, 5, 3, 4),
            (3, 17, 6, 6, 7, 1, 3),
        ] {
            let (got, want) = run_case(case, 1.0, None);
            for (i, (g_, w_)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g_ as f64 - w_).abs() < 1e-4 * (1.0 + w_.abs()),
                    "case {case:?} at {i}"
                );
            }
        }
    }

    /// The 8-bit product follows the direct convolution (one group and several, strides 1-3,
    /// windows of 256+ values); narrower windows stay f32.
    #[test]
    fn int8_frame_conv_follows_direct_convolution() {
        let kernel = Int8Kernel::detect(None);
        for case in [
            (1usize, 30usize, 128usize, 40usize, 3usize, 2usize, 1usize),
            (2, 25, 96, 20, 4, 1, 1),
            (1, 40, 256, 32, 8, 3, 4),
        ] {
            let (got, want) = run_case(case, 0.1, Some(kernel));
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let worst = got
                .iter()
                .zip(&want)
                .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
            assert!(worst < 0.03 * scale, "{case:?}: error {worst} of {scale}");
        }
        let w = Tensor::zeros((4, 2, 3), DType::F32, &Device::Cpu).unwrap();
        let mut narrow = PackedConv::new(&w, None, 1, 1).unwrap();
        assert!(!narrow.quantize(kernel).unwrap());
    }

    #[test]
    fn frame_conv_rejects_short_input() {
        let w = Tensor::zeros((2, 2, 5), DType::F32, &Device::Cpu).unwrap();
        let packed = Arc::new(PackedConv::new(&w, None, 1, 1).unwrap());
        let x = Tensor::zeros((1, 3, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(frame_conv(&x, &packed).is_err());
    }
}
