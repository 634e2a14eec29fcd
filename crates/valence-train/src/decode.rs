//! Decoding any audio file GStreamer can read into 16 kHz mono f32 samples (for the CLI's
//! `embed`, `train` and `eval`, which work on whole clips rather than streams).

use std::path::Path;

use anyhow::{Context, Result, bail};
use gst::prelude::*;

/// Decodes `path` with `decodebin`, converted and resampled by GStreamer to 16 kHz mono.
pub fn decode_to_16k_mono(path: &Path) -> Result<Vec<f32>> {
    gst::init()?;
    if !path.is_file() {
        bail!("{} does not exist", path.display());
    }
    let pipeline = gst::Pipeline::new();
    let src = gst::ElementFactory::make("filesrc")
        .property("location", path.to_string_lossy().as_ref())
        .build()?;
    let decode = gst::ElementFactory::make("decodebin").build()?;
    let convert = gst::ElementFactory::make("audioconvert").build()?;
    let resample = gst::ElementFactory::make("audioresample").build()?;
    let caps = gst_audio::AudioCapsBuilder::new_interleaved()
        .format(gst_audio::AudioFormat::F32le)
        .rate(16000)
        .channels(1)
        .build();
    let sink = gst_app::AppSink::builder().caps(&caps).sync(false).build();
    pipeline.add_many([&src, &decode, &convert, &resample, sink.upcast_ref()])?;
    src.link(&decode)?;
    gst::Element::link_many([&convert, &resample, sink.upcast_ref()])?;
    link_audio_pads(&decode, &convert);
    pipeline.set_state(gst::State::Playing)?;
    let result = drain_f32(&pipeline, &sink, &path.display().to_string());
    pipeline.set_state(gst::State::Null)?;
    let samples = result?;
    if samples.is_empty() {
        bail!("{}: no audio decoded", path.display());
    }
    Ok(samples)
}

/// Every F32LE sample `sink` receives until EOS or an error, then the first error on
/// `pipeline`'s bus, if any, as `what: error`.
pub(crate) fn drain_f32(
    pipeline: &gst::Pipeline,
    sink: &gst_app::AppSink,
    what: &str,
) -> Result<Vec<f32>> {
    let mut samples = Vec::new();
    // pull_sample fails at EOS or on error; errors are read from the bus below.
    while let Ok(s) = sink.pull_sample() {
        let buf = s.buffer().context("sample without buffer")?;
        let map = buf.map_readable()?;
        samples.extend(
            map.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    let bus = pipeline.bus().context("pipeline without bus")?;
    while let Some(msg) = bus.pop() {
        if let gst::MessageView::Error(e) = msg.view() {
            bail!("{what}: {}", e.error());
        }
    }
    Ok(samples)
}

/// Links `decodebin`'s first audio pad, when it appears, to `next`'s sink pad.
pub fn link_audio_pads(decodebin: &gst::Element, next: &gst::Element) {
    let next_weak = next.downgrade();
    decodebin.connect_pad_added(move |_, pad| {
        let Some(next) = next_weak.upgrade() else {
            return;
        };
        let is_audio = pad
            .current_caps()
            .and_then(|c| c.structure(0).map(|s| s.name().starts_with("audio/")))
            .unwrap_or(false);
        if let Some(sinkpad) = next.static_pad("sink")
            && is_audio
            && !sinkpad.is_linked()
        {
            let _ = pad.link(&sinkpad);
        }
    });
}
