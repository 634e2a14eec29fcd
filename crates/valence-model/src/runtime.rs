//! Process-wide settings of candle's CPU runtime that the plugin and the CLI both apply.

use std::sync::Once;

/// candle's CPU worker pool reads this once, when the pool starts (at the first parallel CPU
/// op), and spins that many times after each op before it parks. Its default (25,000) keeps a
/// worker spinning while `gemm`'s rayon threads run the next product, which on a 2-core
/// machine takes a core from the product; a short spin measurably speeds up the Whisper-sized
/// f32 products (figures in MODEL_CARD.md) and leaves the 8-bit path unchanged.
pub const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
const SPIN_LIMIT: &str = "1000";

/// Sets [`SPIN_LIMIT_VAR`] unless the user already set it. Call it before the first candle
/// operation: the plugin does in `plugin_init`, the CLI first thing in `main`.
///
/// candle 0.11 has no API for the limit and reads only the environment, so the choice is to
/// set the variable once, before any candle thread exists (a thread-local cannot reach the
/// pool's threads). Writing the environment while another thread reads it is what makes
/// `set_var` unsafe; glibc's `setenv` takes its own lock and never frees a replaced
/// environment array, so a concurrent `getenv` elsewhere in a GStreamer application sees the
/// old or the new environment, never freed memory. `Once` keeps this to one write per process.
pub fn configure_cpu_pool() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os(SPIN_LIMIT_VAR).is_none() {
            // SAFETY: see above: one write, before candle's pool starts; glibc keeps readers
            // on other threads memory-safe.
            unsafe { std::env::set_var(SPIN_LIMIT_VAR, SPIN_LIMIT) };
        }
    });
}

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

/// candle's environment override that makes its 8-bit x86 kernels run as on an AVX2-only CPU;
/// the weight-format choice below follows it, so one variable emulates such a CPU.
pub const FORCE_AVX2_VAR: &str = "MISTRALRS_FORCE_AVX2";

/// Which 8-bit matrix product candle 0.11 runs for Q8_0 weights on this CPU. It repacks Q8_0
/// weights into tiles for a VNNI (`vpdpbusd`) GEMM only with AVX512-VNNI or AVX-VNNI; without
/// VNNI it runs a row-by-row dot product that is several times slower than the f32 GEMM
/// (MODEL_CARD.md), which is why [`encoder_weight_format`] keeps f32 there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    Avx512Vnni,
    AvxVnni,
    RowDot,
}

impl Int8Kernel {
    pub fn for_cpu(cpu: &CpuFeatures) -> Self {
        let force_avx2 = std::env::var(FORCE_AVX2_VAR).as_deref() == Ok("1");
        if !force_avx2 && cpu.avx512f && cpu.avx512_vnni {
            Self::Avx512Vnni
        } else if !force_avx2 && cpu.avx2 && cpu.avx_vnni {
            Self::AvxVnni
        } else {
            Self::RowDot
        }
    }

    pub fn is_fast(self) -> bool {
        self != Self::RowDot
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512Vnni => "q8_0 tiles, AVX512-VNNI",
            Self::AvxVnni => "q8_0 tiles, AVX-VNNI",
            Self::RowDot => "q8_0 row-by-row dot product",
        }
    }
}

/// The weight format an encoder runs with on the CPU, given what its manifest asks for
/// (`encoder.quantize`) and this CPU: the 8-bit format only where candle has a fast 8-bit
/// product for it, f32 elsewhere. The reason is part of the answer so that loaders can report
/// it (the element's debug log, `valence bench`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightChoice {
    pub quantize: bool,
    pub reason: String,
}

pub fn encoder_weight_format(asked: Option<&str>, cpu: &CpuFeatures) -> WeightChoice {
    let kernel = Int8Kernel::for_cpu(cpu);
    match asked {
        None => WeightChoice {
            quantize: false,
            reason: "f32 (the manifest asks for no quantization)".into(),
        },
        Some(q) if kernel.is_fast() => WeightChoice {
            quantize: true,
            reason: format!("{q} ({}; CPU: {})", kernel.name(), cpu.describe()),
        },
        Some(q) => WeightChoice {
            quantize: false,
            reason: format!(
                "f32 instead of {q}: without VNNI candle's 8-bit product is slower than f32 \
                 (CPU: {}{})",
                cpu.describe(),
                if std::env::var(FORCE_AVX2_VAR).as_deref() == Ok("1") {
                    format!(", {FORCE_AVX2_VAR}=1")
                } else {
                    String::new()
                }
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_bit_weights_only_where_candle_has_a_vnni_product() {
        let avx2 = CpuFeatures {
            avx2: true,
            fma: true,
            ..Default::default()
        };
        let vnni512 = CpuFeatures {
            avx512f: true,
            avx512_vnni: true,
            ..avx2
        };
        let avx_vnni = CpuFeatures {
            avx_vnni: true,
            ..avx2
        };
        // The tests never set FORCE_AVX2_VAR, so the CPU alone decides here.
        if std::env::var_os(FORCE_AVX2_VAR).is_some() {
            return;
        }
        assert!(!encoder_weight_format(Some("q8_0"), &avx2).quantize);
        assert!(encoder_weight_format(Some("q8_0"), &vnni512).quantize);
        assert!(encoder_weight_format(Some("q8_0"), &avx_vnni).quantize);
        assert!(!encoder_weight_format(None, &vnni512).quantize);
        assert!(!encoder_weight_format(Some("q8_0"), &CpuFeatures::default()).quantize);
        let r = encoder_weight_format(Some("q8_0"), &avx2).reason;
        assert!(
            r.contains("f32 instead of q8_0") && r.contains("avx2 fma"),
            "{r}"
        );
    }
}
