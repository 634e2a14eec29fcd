//! Training and research for gst-plugin-valence's models: the labelled dataset and its cached
//! features, training views (augmentations, Opus/RTP round trips), head training,
//! speaker-independent and leave-one-corpus-out cross-validation, encoder adaptation, and the
//! metrics they report. The `valence` CLI dispatches `train`, `cv` and `adapt` here
//! ([`commands`]); the element and the model crate know nothing of it.
//!
//! `scripts/` beside this crate holds the analysis scripts some experiments used
//! (docs/experiments.md keeps their results).

pub mod adapt;
pub mod augment;
pub mod calibration;
pub mod codec;
pub mod commands;
pub mod dataset;
pub mod decode;
pub mod familiarity;
pub mod metrics;
pub mod training;
