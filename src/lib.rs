//! GStreamer plugin `valence`: the `valenceclassify` element tells whether speech sounds
//! negative, neutral or positive, window by window, while audio passes through untouched.
//!
//! The models, the stream resampler and the windower live in the `valence-model` crate, which
//! knows nothing of GStreamer; the `valence` command-line tool is the `valence-cli` crate.

use gst::glib;

pub mod valenceclassify;

/// Name of the custom meta that carries a window's result on buffers.
pub const META_NAME: &str = "ValenceMeta";

/// Registers `ValenceMeta` (tag "audio", so audioconvert and audioresample keep it).
pub fn register_meta() {
    if !gst::meta::CustomMeta::is_registered(META_NAME) {
        gst::meta::CustomMeta::register(META_NAME, &["audio"]);
    }
}

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    register_meta();
    valenceclassify::register(plugin)
}

gst::plugin_define!(
    valence,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MIT/X11",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_REPOSITORY"),
    env!("BUILD_REL_DATE")
);
