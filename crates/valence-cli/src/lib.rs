//! The library side of the `valence` tool: decoding files, the labelled dataset and its cached
//! features, training augmentations (with Opus/RTP round trips), training of heads, evaluation metrics, and the export of models
//! for Triton Inference Server. The subcommands themselves are in the
//! binary (`main.rs`).

pub mod adapt;
pub mod augment;
pub mod codec;
pub mod dataset;
pub mod decode;
pub mod export;
pub mod metrics;
pub mod training;
pub mod triton_serve;
