//! Helpers of the CLI's integration tests: the model crate's helpers and fixtures, plus the
//! shared data and this crate's own recorded expectations.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};

#[path = "../../../valence-model/tests/common/mod.rs"]
mod model_common;
pub use model_common::{fixtures, max_abs_diff, read_wav_i16, rms};

/// The default model's recorded predictions on shared clips (this crate's own fixture).
pub fn expectations_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/default_model_expectations.json")
}

/// `../shared/data` beside the checkout, if present (CI has it; a user's clone does not).
pub fn shared_data() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if p.join("manifest.csv").is_file() {
        Some(p)
    } else {
        eprintln!("SKIPPED: ../shared/data is not present beside the checkout (CI provides it)");
        None
    }
}
