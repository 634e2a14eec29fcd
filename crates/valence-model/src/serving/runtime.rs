//! What this CPU runs: its SIMD features, the 8-bit kernel chosen for them and the weight
//! format an encoder loads with.

pub use crate::kernels::int8::Int8Kernel;

/// The SIMD features of this CPU that decide which kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    pub avx512_vnni: bool,
    pub avx_vnni: bool,
}

impl CpuFeatures {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            Self {
                avx2: std::is_x86_feature_detected!("avx2"),
                fma: std::is_x86_feature_detected!("fma"),
                avx512f: std::is_x86_feature_detected!("avx512f"),
                avx512_vnni: std::is_x86_feature_detected!("avx512vnni"),
                avx_vnni: std::is_x86_feature_detected!("avxvnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Self::default()
    }

    /// e.g. "avx2 fma avx512f avx512_vnni".
    pub fn describe(&self) -> String {
        let names = [
            (self.avx2, "avx2"),
            (self.fma, "fma"),
            (self.avx512f, "avx512f"),
            (self.avx512_vnni, "avx512_vnni"),
            (self.avx_vnni, "avx_vnni"),
        ];
        let on: Vec<&str> = names.iter().filter(|(b, _)| *b).map(|(_, n)| *n).collect();
        if on.is_empty() {
            "baseline (no AVX2)".into()
        } else {
            on.join(" ")
        }
    }
}

/// Caps the 8-bit kernel (`avx2`, `avx-vnni`, `avx512-vnni` or `plain`), e.g. `avx2` to measure
/// on a VNNI CPU what an AVX2-only one does. The f32 products (`gemm`, AVX2/FMA kernels) are
/// the same on both kinds of CPU.
pub const INT8_KERNEL_VAR: &str = "VALENCE_INT8_KERNEL";

/// The 8-bit kernel this process runs: the CPU's best, capped by [`INT8_KERNEL_VAR`].
pub fn int8_kernel() -> Int8Kernel {
    let cap = std::env::var(INT8_KERNEL_VAR)
        .ok()
        .and_then(|v| Int8Kernel::parse(&v));
    Int8Kernel::detect(cap)
}

/// The weight format an encoder runs with on the CPU, given what its manifest asks for
/// (`encoder.quantize`) and the 8-bit kernel this CPU has: 8-bit where that kernel is faster
/// than f32 (AVX2 and up), f32 elsewhere. The reason is part of the answer so that loaders can
/// report it (the element's debug log, `valence bench`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightChoice {
    pub int8: Option<Int8Kernel>,
    pub reason: String,
}

pub fn encoder_weight_format(
    asked: Option<&str>,
    kernel: Int8Kernel,
    cpu: &CpuFeatures,
) -> WeightChoice {
    match asked {
        None => WeightChoice {
            int8: None,
            reason: "f32 (the manifest asks for no quantization)".into(),
        },
        Some(q) if kernel.is_fast() => WeightChoice {
            int8: Some(kernel),
            reason: format!("8-bit ({q}; {}; CPU: {})", kernel.name(), cpu.describe()),
        },
        Some(q) => WeightChoice {
            int8: None,
            reason: format!(
                "f32 instead of {q}: without AVX2 the 8-bit product is slower than f32 (CPU: {})",
                cpu.describe()
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_bit_weights_only_where_the_kernel_beats_f32() {
        let cpu = CpuFeatures {
            avx2: true,
            fma: true,
            ..Default::default()
        };
        let q = Some("q8_0");
        for fast in [
            Int8Kernel::Avx2,
            Int8Kernel::AvxVnni,
            Int8Kernel::Avx512Vnni,
        ] {
            assert_eq!(encoder_weight_format(q, fast, &cpu).int8, Some(fast));
            assert_eq!(encoder_weight_format(None, fast, &cpu).int8, None);
        }
        let plain = encoder_weight_format(q, Int8Kernel::Plain, &CpuFeatures::default());
        assert_eq!(plain.int8, None);
        assert!(
            plain.reason.contains("f32 instead of q8_0"),
            "{}",
            plain.reason
        );
        let avx2 = encoder_weight_format(q, Int8Kernel::Avx2, &cpu).reason;
        assert!(avx2.contains("AVX2") && avx2.contains("avx2 fma"), "{avx2}");
    }
}
