//! Reading valenceclassify's messages from Rust.
//!
//! cargo run --release --example messages -- talk.flac [MODEL]

use gst::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    gst::init()?;
    gstvalence::plugin_register_static()?;
    let mut args = std::env::args().skip(1);
    let file = args.next().ok_or("usage: messages FILE [MODEL]")?;
    let model = args.next().unwrap_or_else(|| "default".into());
    let pipeline = gst::parse::launch(&format!(
        "filesrc location=\"{file}\" ! decodebin ! audioconvert ! valenceclassify model=\"{model}\" ! fakesink"
    ))?
    .downcast::<gst::Pipeline>()
    .map_err(|_| "not a pipeline")?;
    pipeline.set_state(gst::State::Playing)?;
    let bus = pipeline.bus().ok_or("no bus")?;
    for msg in bus.iter_timed(gst::ClockTime::NONE) {
        match msg.view() {
            gst::MessageView::Element(e) => {
                if let Some(s) = e.structure().filter(|s| s.name() == "valence") {
                    let start = s.get::<u64>("timestamp")? as f64 / 1e9;
                    let label = s.get::<String>("label")?;
                    let confidence = s.get::<f64>("confidence")?;
                    println!("{start:7.2} s  {label:<8} {confidence:.2}");
                }
            }
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(e) => {
                pipeline.set_state(gst::State::Null)?;
                return Err(format!("{} ({:?})", e.error(), e.debug()).into());
            }
            _ => {}
        }
    }
    pipeline.set_state(gst::State::Null)?;
    Ok(())
}
