//! Building blocks shared by the encoders, with CPU fast paths.
//!
//! Profiling the Whisper and Wav2Vec2 encoders on the CPU showed costs besides the matrix
//! products: candle's `gelu_erf` evaluates a scalar libm `erf` per element (≈14 % of the
//! samples for Whisper base, ~1 s of a 10 s xlsr-53 pass), and three separate Q/K/V products
//! run the small GEMMs below the thread pool's sweet spot. Here the erf GELU on contiguous f32
//! CPU tensors uses a branch-free approximation (|error| < 1e-6, far inside the 1e-4 parity
//! tolerance) that the compiler vectorises, the Q/K/V weights are fused into one product whose
//! output the fused attention op ([`super::attention`]) reads in place, and projections and
//! convolutions can hold 8-bit block-quantized weights (`q8_0`), which candle multiplies with
//! AVX512-VNNI kernels on CPUs that have them. Other devices and dtypes use candle's own ops.
//! Wav2Vec2's convolutions are in [`super::conv`].

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Module, Shape, Tensor};
use candle_nn::{Conv1d, VarBuilder};

use super::attention;

/// Defines `fn $name(args)` that runs the `#[inline(always)]` function `$body` compiled for
/// AVX2 and FMA when the CPU has them, so that its loops vectorise 8 wide (the crate is built
/// for baseline x86-64), and as is elsewhere.
macro_rules! avx2_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) => $body:ident) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn enabled($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the features were just detected.
                    unsafe { enabled($($arg),*) };
                    return;
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use avx2_dispatch;

/// A linear projection `x W^T + b` with dense or 8-bit block-quantized weights.
#[derive(Debug, Clone)]
pub enum Projection {
    /// `W^T` as a contiguous [in, out] matrix, which the CPU product reads in place, and the bias
    /// (zeros where the checkpoint has none).
    Dense { weight_t: Tensor, bias: Tensor },
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
}

/// An HF/PyTorch linear layer's `weight` [out, in] and, when it has one, `bias` [out].
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
        Ok(Self::Dense {
            weight_t: weight.t()?.contiguous()?,
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
                if matches!(x.device(), Device::Cpu)
                    && x.dtype() == DType::F32
                    && weight_t.dtype() == DType::F32
                {
                    return x.contiguous()?.apply_op3_no_bwd(
                        weight_t,
                        bias,
                        &DenseProduct { gelu },
                    );
                }
                x.broadcast_matmul(weight_t)?.broadcast_add(bias)?
            }
            Self::Quantized { weight, bias } => {
                // The quantized kernels take f32 activations; keep the caller's dtype outside.
                quantized_affine(weight, bias.as_ref(), &x.to_dtype(DType::F32)?)?
                    .to_dtype(x.dtype())?
            }
        };
        if gelu { gelu_erf(&y) } else { Ok(y) }
    }

    /// Re-stores the weights as `dtype` blocks (e.g. Q8_0). Shapes whose inner size is not a
    /// multiple of the block size stay dense.
    pub fn quantize(&self, dtype: GgmlDType) -> candle_core::Result<Self> {
        match self {
            Self::Dense { weight_t, bias } => {
                let (k, _) = weight_t.dims2()?;
                if !k.is_multiple_of(dtype.block_size()) {
                    return Ok(self.clone());
                }
                Ok(Self::Quantized {
                    weight: quantize_matrix(&weight_t.t()?.contiguous()?, dtype)?,
                    bias: Some(bias.clone()),
                })
            }
            Self::Quantized { .. } => Ok(self.clone()),
        }
    }
}

impl Module for Projection {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, false)
    }
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
        let x = contiguous_f32(self.name(), s1, l1)?;
        let w = contiguous_f32(self.name(), s2, l2)?;
        let bias = contiguous_f32(self.name(), s3, l3)?;
        let (k, n) = l2.shape().dims2()?;
        let dims = l1.dims();
        if dims.last() != Some(&k) || bias.len() != n {
            candle_core::bail!(
                "projection of width {k} -> {n} applied to {dims:?} (bias {})",
                bias.len()
            );
        }
        let m = x.len() / k;
        let mut dst = vec![0f32; m * n];
        // SAFETY: x is [m, k] and w [k, n], both contiguous row-major; dst is [m, n].
        unsafe {
            gemm_f32(
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
                gemm_parallelism(),
            );
        }
        row_epilogue(
            &mut dst,
            n,
            &RowEpilogue {
                bias: Some(bias),
                norm: None,
                gelu: self.gelu,
            },
        );
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = n;
        Ok((CpuStorage::F32(dst), Shape::from(shape)))
    }
}

/// A [out, in] weight matrix as `dtype` blocks, ready for `x W^T` products.
fn quantize_matrix(weight: &Tensor, dtype: GgmlDType) -> candle_core::Result<QMatMul> {
    QMatMul::from_qtensor(QTensor::quantize(&weight.to_dtype(DType::F32)?, dtype)?)
}

/// `x W^T + b` for f32 `x` and block-quantized `W`.
fn quantized_affine(
    weight: &QMatMul,
    bias: Option<&Tensor>,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let y = weight.forward(&x.contiguous()?)?;
    match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?),
        None => Ok(y),
    }
}

/// A 1-D convolution that can run as im2col + a block-quantized product on the CPU (Whisper's
/// second front-end convolution is 512 x 1536 per output frame: worth quantizing with the
/// layers). Dense convolutions use candle's own op.
#[derive(Debug, Clone)]
pub enum Conv1dLayer {
    Dense(Conv1d),
    Quantized {
        /// [out, in * kernel], rows in the dense weight's (in, kernel) order.
        weight: QMatMul,
        bias: Option<Tensor>,
        in_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    },
}

impl Conv1dLayer {
    /// Quantizes when on the CPU, ungrouped, undilated and `in * kernel` fits whole blocks.
    pub fn quantize(&self, dtype: GgmlDType) -> candle_core::Result<Self> {
        let Self::Dense(conv) = self else {
            return Ok(self.clone());
        };
        let cfg = conv.config();
        let (out, cin, k) = conv.weight().dims3()?;
        if !conv.weight().device().is_cpu()
            || cfg.groups != 1
            || cfg.dilation != 1
            || !(cin * k).is_multiple_of(dtype.block_size())
        {
            return Ok(self.clone());
        }
        Ok(Self::Quantized {
            weight: quantize_matrix(&conv.weight().reshape((out, cin * k))?, dtype)?,
            bias: conv.bias().cloned(),
            in_channels: cin,
            kernel: k,
            stride: cfg.stride,
            padding: cfg.padding,
        })
    }
}

impl Module for Conv1dLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(c) => c.forward(x),
            Self::Quantized {
                weight,
                bias,
                in_channels,
                kernel,
                stride,
                padding,
            } => {
                let (b, cin, t) = x.dims3()?;
                if cin != *in_channels {
                    candle_core::bail!("conv expects {in_channels} channels, got {cin}");
                }
                let dtype = x.dtype();
                let padded = t + 2 * padding;
                if padded < *kernel {
                    candle_core::bail!("conv input of {t} frames is shorter than its kernel");
                }
                let t_out = (padded - kernel) / stride + 1;
                let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                // im2col: row (batch, frame) holds x[c, frame * stride + j - padding] at c * kernel + j.
                let width = cin * kernel;
                let mut cols = vec![0f32; b * t_out * width];
                for bi in 0..b {
                    let xb = &xs[bi * cin * t..(bi + 1) * cin * t];
                    for f in 0..t_out {
                        let row = &mut cols[(bi * t_out + f) * width..][..width];
                        for c in 0..cin {
                            for j in 0..*kernel {
                                let pos = (f * stride + j) as isize - *padding as isize;
                                if pos >= 0 && (pos as usize) < t {
                                    row[c * kernel + j] = xb[c * t + pos as usize];
                                }
                            }
                        }
                    }
                }
                let cols = Tensor::from_vec(cols, (b, t_out, width), x.device())?;
                quantized_affine(weight, bias.as_ref(), &cols)?
                    .transpose(1, 2)?
                    .to_dtype(dtype)
            }
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

    pub fn quantize(&self, dtype: GgmlDType) -> candle_core::Result<Self> {
        Ok(Self {
            proj: self.proj.quantize(dtype)?,
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

/// Scaled dot-product self-attention over `x` [batch, time, width], no mask. CPU f32 runs the
/// fused op of [`attention`]; other devices and dtypes candle's ops.
pub fn self_attention(
    x: &Tensor,
    qkv: &FusedQkv,
    out: &Projection,
    heads: usize,
) -> candle_core::Result<Tensor> {
    if attention::supported(x) {
        return out.forward(&attention::fused_self_attention(&qkv.project(x)?, heads)?);
    }
    let (b, t, width) = x.dims3()?;
    let head_dim = width / heads;
    let split = |y: Tensor| -> candle_core::Result<Tensor> {
        y.reshape((b, t, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = qkv.forward(x)?;
    let q = split((q * (head_dim as f64).powf(-0.5))?)?;
    let k = split(k)?;
    let v = split(v)?;
    let scores = q.matmul(&k.t()?)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let ctx = probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, t, heads * head_dim))?;
    out.forward(&ctx)
}

/// The erf GELU (HF's "gelu"): `0.5 x (1 + erf(x / sqrt 2))`.
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

/// Runs `f(offset, piece)` over consecutive pieces of `dst` (`piece_len` values each, the last
/// possibly shorter) on candle's CPU pool, which hands each worker a run of whole pieces; on the
/// calling thread when there is only one piece.
pub(crate) fn par_pieces_mut(
    dst: &mut [f32],
    piece_len: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) {
    let len = dst.len();
    if len <= piece_len {
        f(0, dst);
        return;
    }
    let base = SyncPtr(dst.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(len.div_ceil(piece_len), |pieces| {
        let start = pieces.start * piece_len;
        let end = (pieces.end * piece_len).min(len);
        // SAFETY: the pool hands out disjoint piece ranges and `execute_chunked` returns only
        // when every range is done, so these are disjoint sub-slices of the live `dst`.
        f(start, unsafe {
            std::slice::from_raw_parts_mut(base.get().add(start), end - start)
        });
    });
}

/// A pointer into an output buffer that the CPU ops hand to candle's pool threads, each of
/// which writes a disjoint part of the buffer (every user states why its parts are disjoint).
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: only ever used to write disjoint parts of a buffer that outlives the pool call.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// A strided f32 matrix for [`gemm_f32`]: its first element and its row and column strides,
/// in elements.
#[derive(Clone, Copy)]
pub(crate) struct MatRef {
    pub(crate) ptr: *const f32,
    pub(crate) row_stride: usize,
    pub(crate) col_stride: usize,
}

/// `dst = lhs rhs` for an m x k `lhs`, a k x n `rhs` and an m x n `dst` whose rows are
/// `dst_row_stride` apart (columns adjacent), through `gemm`, candle's CPU matmul engine, which
/// takes any strides (rows may overlap: operands are only read).
///
/// # Safety
/// Every element the shapes and strides address must lie in live buffers, and `dst` must not
/// overlap the operands or anything another thread touches meanwhile.
pub(crate) unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: MatRef,
    rhs: MatRef,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: forwarded to the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            false,
            lhs.ptr,
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.ptr,
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// How the CPU products split across threads: like candle's own matmul.
pub(crate) fn gemm_parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// A layer norm over each row: `(x - mean) / sqrt(var + eps) * weight + bias`.
#[derive(Debug, Clone)]
pub(crate) struct RowNorm {
    pub(crate) weight: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) eps: f32,
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

/// The values of a contiguous f32 CPU tensor, as the fused CPU ops take them.
pub(crate) fn contiguous_f32<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op} expects f32");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} expects a contiguous tensor")
    };
    Ok(&data[start..end])
}

avx2_dispatch!(
    /// In-place erf GELU on the calling thread (for callers that already split the work).
    fn gelu_erf_chunk(xs: &mut [f32]) => gelu_erf_in_place
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
        let half = Projection::dense(w.to_dtype(DType::F16)?, None)?;
        let x = Tensor::randn(0f32, 1., (1, 5, 12), &dev)?;
        let want = Linear::new(w.clone(), None).forward(&x)?.gelu_erf()?;
        let got = half.forward_gelu(&x.to_dtype(DType::F16)?)?;
        assert!(max_abs(&(got.to_dtype(DType::F32)? - want)?) < 2e-2);
        Ok(())
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

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

    #[test]
    fn gelu_matches_candle() {
        let xs: Vec<f32> = (0..100_000)
            .map(|i| (i as f32 - 50_000.0) / 5000.0)
            .collect();
        let t = Tensor::from_vec(xs, (100, 1000), &Device::Cpu).unwrap();
        let fast = gelu_erf(&t).unwrap();
        let reference = t.gelu_erf().unwrap();
        let diff = max_abs(&(fast - reference).unwrap());
        assert!(diff < 1e-5, "max |diff| {diff}");
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
        let q = dense.quantize(GgmlDType::Q8_0).unwrap();
        assert!(matches!(q, Conv1dLayer::Quantized { .. }));
        let (yd, yq) = (dense.forward(&x).unwrap(), q.forward(&x).unwrap());
        assert_eq!(yd.dims(), yq.dims());
        let rel = max_abs(&(&yd - &yq).unwrap()) / max_abs(&yd);
        assert!(rel < 0.02, "relative error {rel}");
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
