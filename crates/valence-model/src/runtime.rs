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
