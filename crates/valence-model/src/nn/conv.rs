//! [`FrameConv1d`]: a 1-D convolution over channels-last sequences ([batch, frames, channels]),
//! as Wav2Vec2's feature encoder and positional convolution use it. On the CPU in f32 it runs
//! the in-place window product of [`crate::kernels::conv`] (with the following layer norm and
//! GELU fused into its output pass); other devices and dtypes run candle's `conv1d`,
//! `LayerNorm` and GELU on the transposed input: same results, device-generic.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, LayerNorm};

use crate::kernels::activation::gelu_erf;
use crate::kernels::conv::{PackedConv, frame_conv};
use crate::kernels::epilogue::RowNorm;

/// A 1-D convolution (PyTorch semantics: zero padding, stride, groups; no dilation) taking and
/// returning channels-last tensors.
#[derive(Debug, Clone)]
pub struct FrameConv1d {
    config: Conv1dConfig,
    /// Input channels per group and kernel width.
    in_per_group: usize,
    kernel: usize,
    weights: ConvWeights,
}

/// One copy of the weights: the packed CPU form when they are CPU f32, candle's otherwise.
#[derive(Debug, Clone)]
enum ConvWeights {
    Cpu(Arc<PackedConv>),
    Candle {
        conv: Conv1d,
        /// Applied to each output frame after the convolution (see [`FrameConv1d::with_layer_norm`]).
        norm: Option<LayerNorm>,
        gelu: bool,
    },
}

impl FrameConv1d {
    /// `weight` is PyTorch's [out, in / groups, kernel].
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        config: Conv1dConfig,
    ) -> candle_core::Result<Self> {
        if config.dilation != 1 {
            candle_core::bail!("dilated convolutions are not supported");
        }
        let (out, in_g, kernel) = weight.dims3()?;
        let groups = config.groups;
        if groups == 0 || !out.is_multiple_of(groups) {
            candle_core::bail!("{out} output channels do not split into {groups} groups");
        }
        if let Some(b) = &bias
            && b.dims1()? != out
        {
            candle_core::bail!("conv bias has {} values for {out} channels", b.dims1()?);
        }
        let weights = if weight.device().is_cpu() && weight.dtype() == DType::F32 {
            ConvWeights::Cpu(Arc::new(PackedConv::new(
                &weight,
                bias.as_ref(),
                config.stride,
                groups,
            )?))
        } else {
            ConvWeights::Candle {
                conv: Conv1d::new(weight, bias, config),
                norm: None,
                gelu: false,
            }
        };
        Ok(Self {
            config,
            in_per_group: in_g,
            kernel,
            weights,
        })
    }

    /// Follows the convolution with a layer norm over each output frame's channels.
    pub fn with_layer_norm(
        mut self,
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    ) -> candle_core::Result<Self> {
        match &mut self.weights {
            ConvWeights::Cpu(p) => Arc::make_mut(p).set_layer_norm(RowNorm {
                weight: weight.to_dtype(DType::F32)?.to_vec1()?,
                bias: bias.to_dtype(DType::F32)?.to_vec1()?,
                eps: eps as f32,
            })?,
            ConvWeights::Candle { conv, norm, .. } => {
                let out = conv.weight().dim(0)?;
                if weight.dims1()? != out || bias.dims1()? != out {
                    candle_core::bail!("layer norm size does not match the conv's {out} channels");
                }
                *norm = Some(LayerNorm::new(weight, bias, eps));
            }
        }
        Ok(self)
    }

    /// Runs the product with 8-bit weights on the CPU where a window holds at least 256 values
    /// (see [`crate::kernels::conv::PackedConv::quantize`]); a no-op elsewhere.
    pub fn quantize(
        &mut self,
        kernel: crate::kernels::int8::Int8Kernel,
    ) -> candle_core::Result<()> {
        if let ConvWeights::Cpu(p) = &mut self.weights {
            Arc::make_mut(p).quantize(kernel)?;
        }
        Ok(())
    }

    /// Follows the convolution (and its layer norm, if any) with the erf GELU.
    pub fn with_gelu(mut self) -> Self {
        match &mut self.weights {
            ConvWeights::Cpu(p) => Arc::make_mut(p).set_gelu(),
            ConvWeights::Candle { gelu, .. } => *gelu = true,
        }
        self
    }
}

impl Module for FrameConv1d {
    /// `x` is [batch, frames, in]; the result is [batch, frames_out, out].
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (in_g, kernel) = (self.in_per_group, self.kernel);
        let (_, frames, channels) = x.dims3()?;
        if channels != in_g * cfg.groups {
            candle_core::bail!(
                "conv expects {} input channels, got {channels}",
                in_g * cfg.groups
            );
        }
        if frames + 2 * cfg.padding < kernel {
            candle_core::bail!("conv input of {frames} frames is shorter than its kernel {kernel}");
        }
        match &self.weights {
            ConvWeights::Cpu(p) => {
                if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 {
                    candle_core::bail!(
                        "conv weights are f32 on the CPU, the input is {:?} on {:?}",
                        x.dtype(),
                        x.device()
                    );
                }
                let x = if cfg.padding > 0 {
                    x.pad_with_zeros(1, cfg.padding, cfg.padding)?
                } else {
                    x.clone()
                };
                let (b, t, _) = x.dims3()?;
                // Group-major [batch, groups, frames, in_g] so that each group's windows are
                // contiguous; a no-op copy-free reshape for one group.
                let x = if cfg.groups == 1 {
                    x.contiguous()?
                } else {
                    x.reshape((b, t, cfg.groups, in_g))?
                        .transpose(1, 2)?
                        .contiguous()?
                };
                frame_conv(&x, p)
            }
            ConvWeights::Candle { conv, norm, gelu } => {
                let mut y = conv.forward(&x.transpose(1, 2)?)?.transpose(1, 2)?;
                if let Some(norm) = norm {
                    y = norm.forward(&y.contiguous()?)?;
                }
                if *gelu {
                    y = gelu_erf(&y)?;
                }
                Ok(y)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The in-place window product against candle's conv1d, for the shapes the encoders use
    /// (strided, kernel wider than stride, one input channel, padded and grouped) and odd ones.
    #[test]
    fn matches_candle_conv1d() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // (batch, in, out, kernel, stride, padding, groups, frames)
        let cases = [
            (1, 1, 8, 10, 5, 0, 1, 403),
            (2, 6, 5, 3, 2, 0, 1, 50),
            (1, 8, 8, 2, 2, 0, 1, 33),
            (2, 12, 12, 7, 1, 3, 4, 29),
            (1, 16, 16, 8, 1, 4, 4, 40),
            (1, 4, 6, 3, 1, 1, 1, 3),
        ];
        for (b, cin, cout, k, s, pad, groups, t) in cases {
            let w = Tensor::randn(0f32, 1., (cout, cin / groups, k), &dev)?;
            let bias = Tensor::randn(0f32, 1., cout, &dev)?;
            let x = Tensor::randn(0f32, 1., (b, t, cin), &dev)?;
            let cfg = Conv1dConfig {
                padding: pad,
                stride: s,
                groups,
                ..Default::default()
            };
            for bias in [Some(bias), None] {
                let conv = FrameConv1d::new(w.clone(), bias.clone(), cfg)?;
                assert!(matches!(conv.weights, ConvWeights::Cpu(_)));
                let got = conv.forward(&x)?;
                let want = Conv1d::new(w.clone(), bias, cfg)
                    .forward(&x.transpose(1, 2)?)?
                    .transpose(1, 2)?;
                assert_eq!(got.dims(), want.dims());
                let d = max_abs_diff(&got, &want);
                assert!(
                    d < 1e-4,
                    "case {:?}: max diff {d}",
                    (b, cin, cout, k, s, pad, groups, t)
                );
            }
        }
        Ok(())
    }

    /// Bias, layer norm and GELU fused into the CPU pass against candle's separate ops.
    #[test]
    fn fused_norm_and_gelu_match_candle_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (cin, cout, k, s, t) in [(1, 24, 10, 5, 300), (8, 20, 3, 2, 41)] {
            let w = Tensor::randn(0f32, 1., (cout, cin, k), &dev)?;
            let bias = Tensor::randn(0f32, 1., cout, &dev)?;
            let ln_w = Tensor::randn(1f32, 0.2, cout, &dev)?;
            let ln_b = Tensor::randn(0f32, 0.2, cout, &dev)?;
            let x = Tensor::randn(0f32, 1., (2, t, cin), &dev)?;
            let cfg = Conv1dConfig {
                stride: s,
                ..Default::default()
            };
            let plain = Conv1d::new(w.clone(), Some(bias.clone()), cfg)
                .forward(&x.transpose(1, 2)?)?
                .transpose(1, 2)?
                .contiguous()?;
            let normed = LayerNorm::new(ln_w.clone(), ln_b.clone(), 1e-5).forward(&plain)?;
            // The device-generic path (any non-CPU-f32 tensor; here f16) fuses nothing.
            let generic = FrameConv1d::new(
                w.to_dtype(DType::F16)?,
                Some(bias.to_dtype(DType::F16)?),
                cfg,
            )?
            .with_layer_norm(ln_w.to_dtype(DType::F16)?, ln_b.to_dtype(DType::F16)?, 1e-5)?
            .with_gelu();
            assert!(matches!(generic.weights, ConvWeights::Candle { .. }));
            let generic = generic
                .forward(&x.to_dtype(DType::F16)?)?
                .to_dtype(DType::F32)?;
            let conv = FrameConv1d::new(w.clone(), Some(bias.clone()), cfg)?;
            let d = max_abs_diff(&generic, &normed.gelu_erf()?);
            assert!(d < 2e-2, "f16 {:?}: max diff {d}", (cin, cout, k, s, t));
            for (got, want) in [
                (conv.clone().with_gelu().forward(&x)?, plain.gelu_erf()?),
                (
                    conv.clone()
                        .with_layer_norm(ln_w.clone(), ln_b.clone(), 1e-5)?
                        .forward(&x)?,
                    normed.clone(),
                ),
                (
                    conv.with_layer_norm(ln_w, ln_b, 1e-5)?
                        .with_gelu()
                        .forward(&x)?,
                    normed.gelu_erf()?,
                ),
            ] {
                let d = max_abs_diff(&got, &want);
                assert!(d < 1e-4, "{:?}: max diff {d}", (cin, cout, k, s, t));
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_wrong_channels_and_short_input() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let conv = FrameConv1d::new(
            Tensor::zeros((4, 3, 5), DType::F32, &dev)?,
            None,
            Conv1dConfig::default(),
        )?;
        let err = conv
            .forward(&Tensor::zeros((1, 10, 2), DType::F32, &dev)?)
            .unwrap_err();
        assert!(err.to_string().contains("3 input channels"), "{err}");
        let err = conv
            .forward(&Tensor::zeros((1, 4, 3), DType::F32, &dev)?)
            .unwrap_err();
        assert!(err.to_string().contains("shorter than its kernel"), "{err}");
        let err = conv
            .forward(&Tensor::zeros((1, 10, 3), DType::F16, &dev)?)
            .unwrap_err();
        assert!(err.to_string().contains("f32 on the CPU"), "{err}");
        Ok(())
    }
}
