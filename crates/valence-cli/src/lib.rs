//! The library side of the `valence` tool: the export of models for Triton Inference Server
//! and a local Triton server for tests and benchmarks. The subcommands themselves are in the
//! binary (`main.rs`); training and its research tools are the `valence-train` crate.

pub mod export;
pub mod triton_serve;
