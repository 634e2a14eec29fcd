//! Running models for many streams: one loaded copy per model and device ([`registry`]), one
//! batching inference service per model ([`service`]), and what this CPU runs ([`runtime`]).

pub mod registry;
pub mod runtime;
pub mod service;
