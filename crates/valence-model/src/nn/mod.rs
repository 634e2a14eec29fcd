//! Model blocks shared by the encoders: projections (dense or 8-bit), fused Q/K/V,
//! self-attention, convolutions, layer norm. On the CPU in f32 they call the fused kernels of
//! [`crate::kernels`]; other devices and dtypes use candle's ops, so every block is
//! device-generic. 8-bit weights exist only on the CPU ([`crate::kernels::int8`]).

pub mod conv;

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv1d, LayerNorm, VarBuilder};

pub use crate::kernels::activation::gelu_erf;
use crate::kernels::epilogue::{LayerNormOp, RowNorm};
use crate::kernels::int8::{Int8Kernel, Int8Product, PackedWeights};
use crate::kernels::packed_f32::{PackedF32, PackedF32Product};
use crate::kernels::{attention, dense};
pub use conv::FrameConv1d;

/// A layer norm of width `size` from HF/PyTorch's `weight` and `bias` (the one loader the
/// encoders and the head share; a training `VarBuilder` starts it at weight 1, bias 0).
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Norm> {
    Norm::new(candle_nn::layer_norm(size, eps, vb)?)
}

/// A layer norm that runs f32 rows on the CPU with [`LayerNormOp`] (candle's op elsewhere), for
/// inference: it copies the weights at load and has no backward pass (heads that train use
/// candle's `LayerNorm`).
#[derive(Debug, Clone)]
pub struct Norm {
    candle: LayerNorm,
    cpu: Option<RowNorm>,
}

impl Norm {
    pub fn new(candle: LayerNorm) -> candle_core::Result<Self> {
        let cpu = match (candle.weight(), candle.bias()) {
            (w, Some(b))
                if candle.remove_mean() && w.device().is_cpu() && w.dtype() == DType::F32 =>
            {
                Some(RowNorm {
                    weight: w.to_vec1()?,
                    bias: b.to_dtype(DType::F32)?.to_vec1()?,
                    eps: candle.eps() as f32,
                })
            }
            _ => None,
        };
        Ok(Self { candle, cpu })
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.cpu {
            Some(norm) if x.device().is_cpu() && x.dtype() == DType::F32 => {
                x.contiguous()?.apply_op1_no_bwd(&LayerNormOp(norm))
            }
            _ => self.candle.forward(x),
        }
    }
}

/// A linear projection `x W^T + b` with dense or (on the CPU) 8-bit weights.
#[derive(Debug, Clone)]
pub enum Projection {
    /// `W^T` as a contiguous [in, out] matrix, which the CPU product reads in place, and the bias
    /// (zeros where the checkpoint has none).
    Dense {
        weight_t: Tensor,
        bias: Tensor,
    },
    Int8(Int8Weights),
    /// CPU f32 weights packed once for the AVX2/FMA tiles ([`PackedF32`]; weights up to
    /// [`crate::kernels::packed_f32::PACK_LIMIT`] values, where they beat `gemm`).
    PackedF32 {
        weights: Arc<PackedF32>,
        bias: Vec<f32>,
    },
}

/// 8-bit weights of a projection or convolution, their f32 bias and the kernel that runs them.
#[derive(Debug, Clone)]
pub struct Int8Weights {
    pub weights: Arc<PackedWeights>,
    pub bias: Option<Vec<f32>>,
    pub kernel: Int8Kernel,
}

impl Int8Weights {
    /// From an [out, in] f32 CPU weight.
    fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        kernel: Int8Kernel,
    ) -> candle_core::Result<Self> {
        let (n, k) = weight.dims2()?;
        let values = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self {
            weights: Arc::new(PackedWeights::pack(&values, n, k)?),
            bias: bias
                .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
                .transpose()?,
            kernel,
        })
    }

    /// `x [.., in] W^T + b` (then GELU), in the caller's dtype.
    fn apply(&self, x: &Tensor, gelu: bool) -> candle_core::Result<Tensor> {
        let op = Int8Product {
            weights: &self.weights,
            bias: self.bias.as_deref(),
            gelu,
            kernel: self.kernel,
        };
        x.to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1_no_bwd(&op)?
            .to_dtype(x.dtype())
    }
}

/// An HF/PyTorch linear layer's `weight` `[out, in]` and, when it has one, `bias` `[out]`.
pub fn linear_weights(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: &VarBuilder,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let b = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok((vb.get((out_dim, in_dim), "weight")?, b))
}

impl Projection {
    /// From PyTorch's [out, in] `weight`.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let bias = match bias {
            Some(b) => b,
            None => Tensor::zeros(weight.dim(0)?, weight.dtype(), weight.device())?,
        };
        let (n, k) = weight.dims2()?;
        if weight.device().is_cpu()
            && weight.dtype() == DType::F32
            && PackedF32::worth_packing(n, k)
        {
            let values = weight.flatten_all()?.to_vec1::<f32>()?;
            return Ok(Self::PackedF32 {
                weights: Arc::new(PackedF32::pack(&values, n, k)?),
                bias: bias.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            });
        }
        Ok(Self::Dense {
            weight_t: crate::kernels::transposed(&weight)?,
            bias,
        })
    }

    /// Loads a linear layer with a bias.
    pub fn load(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let (w, b) = linear_weights(in_dim, out_dim, true, &vb)?;
        Self::dense(w, b)
    }

    /// `gelu(x W^T + b)` with the erf GELU; on the CPU in f32 the bias and GELU are applied to
    /// each output row right after the product, in one pass.
    pub fn forward_gelu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, gelu: bool) -> candle_core::Result<Tensor> {
        let y = match self {
            Self::Dense { weight_t, bias } => {
                if dense::supported(x, weight_t) {
                    return dense::dense(x, weight_t, bias, gelu);
                }
                // One [rows, in] x [in, out] product: a broadcast matmul of [batch, time, in]
                // would run `batch` small products (cuBLAS batched GEMM), several times slower
                // on a GPU at large batches.
                let dims = x.dims();
                let (in_dim, out_dim) = weight_t.dims2()?;
                let rows = x.elem_count() / in_dim.max(1);
                let mut out_dims = dims.to_vec();
                if let Some(last) = out_dims.last_mut() {
                    *last = out_dim;
                }
                x.reshape((rows, in_dim))?
                    .matmul(weight_t)?
                    .broadcast_add(bias)?
                    .reshape(out_dims)?
            }
            Self::Int8(w) => return w.apply(x, gelu),
            Self::PackedF32 { weights, bias } => {
                let op = PackedF32Product {
                    weights,
                    bias,
                    gelu,
                };
                return x
                    .to_dtype(DType::F32)?
                    .contiguous()?
                    .apply_op1_no_bwd(&op)?
                    .to_dtype(x.dtype());
            }
        };
        if gelu { gelu_erf(&y) } else { Ok(y) }
    }

    /// Re-stores CPU weights as 8-bit values run by `kernel`; weights on other devices stay.
    pub fn quantize(&self, kernel: Int8Kernel) -> candle_core::Result<Self> {
        match self {
            Self::Dense { weight_t, bias } if weight_t.device().is_cpu() => Ok(Self::Int8(
                Int8Weights::new(&crate::kernels::transposed(weight_t)?, Some(bias), kernel)?,
            )),
            Self::PackedF32 { weights, bias } => {
                let cpu = candle_core::Device::Cpu;
                let weight = Tensor::from_vec(weights.unpack(), (weights.n, weights.k), &cpu)?;
                let bias = Tensor::from_slice(bias, weights.n, &cpu)?;
                Ok(Self::Int8(Int8Weights::new(&weight, Some(&bias), kernel)?))
            }
            _ => Ok(self.clone()),
        }
    }
}

impl Module for Projection {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, false)
    }
}

/// A 1-D convolution that can run on the CPU as im2col + one of the projections' products:
/// 8-bit (Whisper's second front-end convolution is 512 x 1536 per output frame: worth
/// quantizing with the layers) or packed f32 (its first, 512 x 240, ran at a fifth of the
/// packed tiles' rate through candle's convolution). Other convolutions use candle's own op.
#[derive(Debug, Clone)]
pub enum Conv1dLayer {
    Dense(Conv1d),
    Im2col {
        /// A product of [out, in * kernel] weights, columns in the dense weight's (in, kernel)
        /// order: [`Projection::Int8`] or [`Projection::PackedF32`].
        projection: Projection,
        in_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    },
}

impl Conv1dLayer {
    /// `conv` as im2col + packed f32 tiles where the CPU runs them (f32, ungrouped, undilated,
    /// weights within [`crate::kernels::packed_f32::PACK_LIMIT`]), else candle's convolution.
    pub fn packed_or_dense(conv: Conv1d) -> candle_core::Result<Self> {
        let (out, cin, k) = conv.weight().dims3()?;
        if Self::im2col_applies(&conv)
            && conv.weight().dtype() == DType::F32
            && PackedF32::worth_packing(out, cin * k)
        {
            return Self::as_im2col(&conv);
        }
        Ok(Self::Dense(conv))
    }

    /// Quantizes when on the CPU, ungrouped and undilated, with at least 256 inputs per output
    /// frame (Whisper's 80-mel first convolution, 240, is cheap and stays f32).
    pub fn quantize(&self, kernel: Int8Kernel) -> candle_core::Result<Self> {
        match self {
            Self::Dense(conv) if Self::im2col_applies(conv) && Self::inputs(conv)? >= 256 => {
                Self::as_im2col(conv)?.quantize(kernel)
            }
            Self::Im2col {
                projection,
                in_channels,
                kernel: k,
                stride,
                padding,
            } if in_channels * k >= 256 => Ok(Self::Im2col {
                projection: projection.quantize(kernel)?,
                in_channels: *in_channels,
                kernel: *k,
                stride: *stride,
                padding: *padding,
            }),
            _ => Ok(self.clone()),
        }
    }

    /// Inputs per output frame.
    fn inputs(conv: &Conv1d) -> candle_core::Result<usize> {
        let (_, cin, k) = conv.weight().dims3()?;
        Ok(cin * k)
    }

    /// Where the im2col forms can stand in for candle's convolution.
    fn im2col_applies(conv: &Conv1d) -> bool {
        let cfg = conv.config();
        conv.weight().device().is_cpu() && cfg.groups == 1 && cfg.dilation == 1
    }

    /// `conv` as im2col + a projection of its weight as [out, in * kernel].
    fn as_im2col(conv: &Conv1d) -> candle_core::Result<Self> {
        let cfg = conv.config();
        let (out, cin, k) = conv.weight().dims3()?;
        Ok(Self::Im2col {
            projection: Projection::dense(
                conv.weight().reshape((out, cin * k))?,
                conv.bias().cloned(),
            )?,
            in_channels: cin,
            kernel: k,
            stride: cfg.stride,
            padding: cfg.padding,
        })
    }

    /// `gelu(conv(x))` for `x` [batch, channels, time], returned frame-major, [batch, frames,
    /// out]: what the Whisper front end feeds its layers. The im2col forms produce frames
    /// directly (GELU fused into their product), with no transposed copies; they read `x`
    /// channel-major or, where it is a transposed view of frame-major storage (their own
    /// output), frame-major.
    pub fn forward_gelu_frames(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(c) => gelu_erf(&c.forward(x)?)?.transpose(1, 2),
            Self::Im2col { projection, .. } => {
                let dtype = x.dtype();
                projection.forward_gelu(&self.im2col(x)?)?.to_dtype(dtype)
            }
        }
    }

    /// The im2col forms' input as rows of (batch, output frame) holding
    /// x[c, frame * stride + j - padding] at c * kernel + j (zero outside the input).
    fn im2col(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Self::Im2col {
            in_channels,
            kernel,
            stride,
            padding,
            ..
        } = self
        else {
            candle_core::bail!("im2col of a dense convolution");
        };
        let (b, cin, t) = x.dims3()?;
        if cin != *in_channels {
            candle_core::bail!("conv expects {in_channels} channels, got {cin}");
        }
        let padded = t + 2 * padding;
        if padded < *kernel {
            candle_core::bail!("conv input of {t} frames is shorter than its kernel");
        }
        let t_out = (padded - kernel) / stride + 1;
        // Frame-major storage (x a transposed view of [b, t, cin]) is read as it lies.
        let frame_major = !x.is_contiguous() && x.transpose(1, 2)?.is_contiguous();
        let xs = if frame_major {
            x.transpose(1, 2)?
        } else {
            x.clone()
        }
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
        // Strides of a channel and of a frame in `xs`.
        let (c_stride, pos_stride) = if frame_major { (1, cin) } else { (t, 1) };
        let width = cin * kernel;
        let mut cols = vec![0f32; b * t_out * width];
        for bi in 0..b {
            let xb = &xs[bi * cin * t..(bi + 1) * cin * t];
            for f in 0..t_out {
                let row = &mut cols[(bi * t_out + f) * width..][..width];
                for j in 0..*kernel {
                    let pos = (f * stride + j) as isize - *padding as isize;
                    if pos < 0 || pos as usize >= t {
                        continue;
                    }
                    for c in 0..cin {
                        row[c * kernel + j] = xb[c * c_stride + pos as usize * pos_stride];
                    }
                }
            }
        }
        Tensor::from_vec(cols, (b, t_out, width), x.device())
    }
}

impl Module for Conv1dLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(c) => c.forward(x),
            Self::Im2col { projection, .. } => projection
                .forward(&self.im2col(x)?)?
                .transpose(1, 2)?
                .to_dtype(x.dtype()),
        }
    }
}

/// Q, K and V as one projection: one [3d, d] product instead of three [d, d] ones.
#[derive(Debug, Clone)]
pub struct FusedQkv {
    proj: Projection,
    width: usize,
}

impl FusedQkv {
    /// A missing bias (Whisper's key projection has none) counts as zeros.
    pub fn new(
        q: (Tensor, Option<Tensor>),
        k: (Tensor, Option<Tensor>),
        v: (Tensor, Option<Tensor>),
    ) -> candle_core::Result<Self> {
        let width = q.0.dim(0)?;
        let weight = Tensor::cat(&[&q.0, &k.0, &v.0], 0)?;
        let bias = [q, k, v]
            .into_iter()
            .map(|(w, b)| match b {
                Some(b) => Ok(b),
                None => Tensor::zeros(w.dim(0)?, w.dtype(), w.device()),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            proj: Projection::dense(weight, Some(Tensor::cat(&bias, 0)?))?,
            width,
        })
    }

    /// Loads `q_proj`, `k_proj` and `v_proj` (HF names, shared by Wav2Vec2 and Whisper) of
    /// width `width`; Whisper's key projection has no bias.
    pub fn load(width: usize, key_bias: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::new(
            linear_weights(width, width, true, &vb.pp("q_proj"))?,
            linear_weights(width, width, key_bias, &vb.pp("k_proj"))?,
            linear_weights(width, width, true, &vb.pp("v_proj"))?,
        )
    }

    pub fn quantize(&self, kernel: Int8Kernel) -> candle_core::Result<Self> {
        Ok(Self {
            proj: self.proj.quantize(kernel)?,
            width: self.width,
        })
    }

    /// Q, K and V side by side: [batch, time, 3 * width].
    pub fn project(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.proj.forward(x)
    }

    /// Returns (q, k, v), each [batch, time, width].
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let y = self.project(x)?;
        let d = self.width;
        Ok((
            y.narrow(2, 0, d)?,
            y.narrow(2, d, d)?,
            y.narrow(2, 2 * d, d)?,
        ))
    }
}

/// Called after each step of a block with the step's name, so a profiler can synchronise the
/// device and read the clock there (`valence bench --what gpu`); [`no_marks`] does nothing.
pub type Marks<'a> = &'a mut dyn FnMut(&'static str) -> candle_core::Result<()>;

/// Marks that do nothing: how models run outside a profiler.
pub fn no_marks(_step: &'static str) -> candle_core::Result<()> {
    Ok(())
}

/// Scaled dot-product self-attention over `x` [batch, time, width], no mask. CPU f32 runs the
/// fused kernel of [`attention`]; other devices and dtypes candle's ops.
pub fn self_attention(
    x: &Tensor,
    qkv: &FusedQkv,
    out: &Projection,
    heads: usize,
) -> candle_core::Result<Tensor> {
    self_attention_marked(x, qkv, out, heads, &mut no_marks)
}

/// [`self_attention`], marking its projection, attention and output projection steps.
pub fn self_attention_marked(
    x: &Tensor,
    qkv: &FusedQkv,
    out: &Projection,
    heads: usize,
    marks: Marks,
) -> candle_core::Result<Tensor> {
    if attention::supported(x) {
        let y = qkv.project(x)?;
        marks("q/k/v projection")?;
        let ctx = attention::fused_self_attention(&y, heads)?;
        marks("attention (scores, softmax, context)")?;
        let y = out.forward(&ctx)?;
        marks("output projection")?;
        return Ok(y);
    }
    let (b, t, width) = x.dims3()?;
    let head_dim = width / heads;
    let split = |y: Tensor| -> candle_core::Result<Tensor> {
        y.reshape((b, t, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = qkv.forward(x)?;
    marks("q/k/v projection")?;
    let q = split((q * (head_dim as f64).powf(-0.5))?)?;
    let k = split(k)?;
    let v = split(v)?;
    let scores = q.matmul(&k.t()?)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let ctx = probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, t, heads * head_dim))?;
    marks("attention (scores, softmax, context)")?;
    let y = out.forward(&ctx)?;
    marks("output projection")?;
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::max_abs;
    use candle_core::Device;
    use candle_nn::Linear;

    /// The fused CPU projection (bias and GELU after the in-place product) against candle's
    /// `Linear` and GELU, for 2-D and 3-D inputs, with and without a bias, and the generic
    /// (f16) path.
    #[test]
    fn dense_projection_matches_candle_linear() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (7, 12), &dev)?;
        let b = Tensor::randn(0f32, 1., 7, &dev)?;
        for bias in [Some(b), None] {
            let proj = Projection::dense(w.clone(), bias.clone())?;
            // Where the CPU has AVX2 and FMA this is the packed form; elsewhere `gemm`'s.
            assert_eq!(
                matches!(proj, Projection::PackedF32 { .. }),
                PackedF32::runs_here()
            );
            let linear = Linear::new(w.clone(), bias);
            for x in [
                Tensor::randn(0f32, 1., (2, 45, 12), &dev)?,
                Tensor::randn(0f32, 1., (3, 12), &dev)?,
            ] {
                let want = linear.forward(&x)?;
                let got = proj.forward(&x)?;
                assert_eq!(got.dims(), want.dims());
                assert!(max_abs(&(got - &want)?) < 1e-5);
                let got = proj.forward_gelu(&x)?;
                assert!(max_abs(&(got - want.gelu_erf()?)?) < 1e-5);
            }
        }
        // Weights beyond the packing limit stay with `gemm`.
        let side = (crate::kernels::packed_f32::PACK_LIMIT as f64).sqrt() as usize + 1;
        let large = Projection::dense(Tensor::zeros((side, side), DType::F32, &dev)?, None)?;
        assert!(matches!(large, Projection::Dense { .. }));
        let half = Projection::dense(w.to_dtype(DType::F16)?, None)?;
        let x = Tensor::randn(0f32, 1., (1, 5, 12), &dev)?;
        let want = Linear::new(w.clone(), None).forward(&x)?.gelu_erf()?;
        let got = half.forward_gelu(&x.to_dtype(DType::F16)?)?;
        assert!(max_abs(&(got.to_dtype(DType::F32)? - want)?) < 2e-2);
        Ok(())
    }

    /// The 8-bit projection follows the dense one (with and without GELU, 2-D and 3-D inputs,
    /// a width that is not a whole number of blocks) and keeps the caller's dtype.
    #[test]
    fn int8_projection_follows_the_dense_one() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (40, 300), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 40, &dev).unwrap();
        let dense = Projection::dense(w, Some(b)).unwrap();
        let q = dense.quantize(Int8Kernel::detect(None)).unwrap();
        assert!(matches!(q, Projection::Int8(_)));
        for x in [
            Tensor::randn(0f32, 1., (7, 300), &dev).unwrap(),
            Tensor::randn(0f32, 1., (2, 9, 300), &dev).unwrap(),
        ] {
            for gelu in [false, true] {
                let (yd, yq) = if gelu {
                    (dense.forward_gelu(&x).unwrap(), q.forward_gelu(&x).unwrap())
                } else {
                    (dense.forward(&x).unwrap(), q.forward(&x).unwrap())
                };
                assert_eq!(yd.dims(), yq.dims());
                let rel = max_abs(&(&yd - &yq).unwrap()) / max_abs(&yd);
                assert!(rel < 0.03, "gelu {gelu}: relative error {rel}");
            }
        }
        let half = q
            .forward(&Tensor::ones((3, 300), DType::F16, &dev).unwrap())
            .unwrap();
        assert_eq!(half.dtype(), DType::F16);
        assert!(
            q.forward(&Tensor::ones((3, 299), DType::F32, &dev).unwrap())
                .is_err()
        );
    }

    #[test]
    fn cpu_norm_matches_candle_layer_norm() {
        let dev = Device::Cpu;
        let w = Tensor::rand(0.5f32, 1.5, 37, &dev).unwrap();
        let b = Tensor::rand(-1f32, 1., 37, &dev).unwrap();
        let candle = LayerNorm::new(w, b, 1e-5);
        let norm = Norm::new(candle.clone()).unwrap();
        assert!(norm.cpu.is_some());
        // 3-D, and a strided (transposed) input, which is made contiguous first.
        let x = (Tensor::randn(0f32, 3., (2, 41, 37), &dev).unwrap() + 5.0).unwrap();
        let xt = Tensor::randn(0f32, 1., (2, 37, 41), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        for x in [&x, &xt] {
            let want = candle.forward(x).unwrap();
            let got = norm.forward(x).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_abs(&(&got - &want).unwrap()) < 1e-5);
        }
        // Half-precision weights (a GPU model's) keep candle's op.
        let half = LayerNorm::new(
            Tensor::ones(37, DType::F16, &dev).unwrap(),
            Tensor::zeros(37, DType::F16, &dev).unwrap(),
            1e-5,
        );
        assert!(Norm::new(half).unwrap().cpu.is_none());
        assert!(
            norm.forward(&Tensor::ones((2, 36), DType::F32, &dev).unwrap())
                .is_err()
        );
    }

    #[test]
    fn packed_conv_equals_the_dense_one_on_either_input_layout() {
        if !PackedF32::runs_here() {
            eprintln!("skipped: this CPU has no AVX2/FMA packed kernel");
            return;
        }
        let dev = Device::Cpu;
        let w = Tensor::rand(-0.1f32, 0.1, (40, 24, 3), &dev).unwrap();
        let b = Tensor::rand(-1f32, 1., 40, &dev).unwrap();
        let cfg = candle_nn::Conv1dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let dense = Conv1dLayer::Dense(Conv1d::new(w.clone(), Some(b.clone()), cfg));
        let packed = Conv1dLayer::packed_or_dense(Conv1d::new(w, Some(b), cfg)).unwrap();
        assert!(matches!(
            packed,
            Conv1dLayer::Im2col {
                projection: Projection::PackedF32 { .. },
                ..
            }
        ));
        let x = Tensor::rand(-1f32, 1., (2, 24, 17), &dev).unwrap();
        // The same input stored frame-major and viewed channel-major.
        let x_frames = x.transpose(1, 2).unwrap().contiguous().unwrap();
        let x_view = x_frames.transpose(1, 2).unwrap();
        let want = dense.forward(&x).unwrap();
        let scale = max_abs(&want);
        for input in [&x, &x_view] {
            let got = packed.forward(input).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_abs(&(&got - &want).unwrap()) < 1e-5 * scale);
            let frames = packed.forward_gelu_frames(input).unwrap();
            let want_frames = dense.forward_gelu_frames(&x).unwrap();
            assert_eq!(frames.dims(), want_frames.dims());
            assert!(max_abs(&(&frames - &want_frames).unwrap()) < 1e-5 * scale);
        }
        // Fewer than 256 inputs per frame (Whisper's conv1: 240) stay f32 in a quantized model.
        let q = packed.quantize(Int8Kernel::detect(None)).unwrap();
        assert!(matches!(
            q,
            Conv1dLayer::Im2col {
                projection: Projection::PackedF32 { .. },
                ..
            }
        ));
        assert!(
            packed
                .forward(&Tensor::ones((1, 23, 17), DType::F32, &dev).unwrap())
                .is_err()
        );
    }

    #[test]
    fn quantized_conv_follows_the_dense_one() {
        let dev = Device::Cpu;
        let w = Tensor::rand(-0.1f32, 0.1, (32, 128, 2), &dev).unwrap();
        let b = Tensor::rand(-1f32, 1., 32, &dev).unwrap();
        let x = Tensor::rand(-1f32, 1., (1, 128, 21), &dev).unwrap();
        let cfg = candle_nn::Conv1dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let dense = Conv1dLayer::Dense(Conv1d::new(w, Some(b), cfg));
        let q = dense.quantize(Int8Kernel::detect(None)).unwrap();
        assert!(matches!(
            q,
            Conv1dLayer::Im2col {
                projection: Projection::Int8(_),
                ..
            }
        ));
        let (yd, yq) = (dense.forward(&x).unwrap(), q.forward(&x).unwrap());
        assert_eq!(yd.dims(), yq.dims());
        let rel = max_abs(&(&yd - &yq).unwrap()) / max_abs(&yd);
        assert!(rel < 0.02, "relative error {rel}");
        // Frame-major with GELU: the same values, transposed, through the GELU.
        let want = yd.gelu_erf().unwrap().transpose(1, 2).unwrap();
        for conv in [&dense, &q] {
            let got = conv.forward_gelu_frames(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let rel = max_abs(&(&got - &want).unwrap()) / max_abs(&want);
            assert!(rel < 0.02, "frames: relative error {rel}");
        }
    }

    #[test]
    fn fused_qkv_equals_separate_projections() {
        let dev = Device::Cpu;
        let w = |s: u64| Tensor::rand(-1f32, 1., (8, 8), &dev).map(|t| (t * s as f64).unwrap());
        let (wq, wk, wv) = (w(1).unwrap(), w(2).unwrap(), w(3).unwrap());
        let bq = Tensor::rand(-1f32, 1., 8, &dev).unwrap();
        let bv = Tensor::rand(-1f32, 1., 8, &dev).unwrap();
        let x = Tensor::rand(-1f32, 1., (1, 5, 8), &dev).unwrap();
        let fused = FusedQkv::new(
            (wq.clone(), Some(bq.clone())),
            (wk.clone(), None),
            (wv.clone(), Some(bv.clone())),
        )
        .unwrap();
        let (q, k, v) = fused.forward(&x).unwrap();
        let q_ref = Linear::new(wq, Some(bq)).forward(&x).unwrap();
        let k_ref = Linear::new(wk, None).forward(&x).unwrap();
        let v_ref = Linear::new(wv, Some(bv)).forward(&x).unwrap();
        for (a, b) in [(q, q_ref), (k, k_ref), (v, v_ref)] {
            assert!(max_abs(&(a - b).unwrap()) < 1e-5);
        }
    }
}
