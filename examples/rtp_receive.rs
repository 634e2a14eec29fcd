//! Analysing an RTP stream: udpsrc on loopback, jitter buffer, L16 depayloader, valenceclassify.
//!
//! cargo run --release --example rtp_receive -- [PORT] [MODEL]
//! Send something:  gst-launch-1.0 audiotestsrc is-live=true ! audioconvert ! rtpL16pay ! \
//!                  udpsink host=127.0.0.1 port=5004
//! (tests/element.rs sends a real stream over loopback to the same receiver.)

use gst::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    gst::init()?;
    gstvalence::plugin_register_static()?;
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().map(|p| p.parse()).transpose()?.unwrap_or(5004);
    let model = args.next().unwrap_or_else(|| "default".into());
    let pipeline = gst::parse::launch(&format!(
        "udpsrc address=127.0.0.1 port={port} \
           caps=\"application/x-rtp,media=audio,clock-rate=44100,encoding-name=L16,channels=2\" ! \
         rtpjitterbuffer latency=50 ! rtpL16depay ! audioconvert ! \
         valenceclassify model=\"{model}\" ! fakesink sync=true"
    ))?
    .downcast::<gst::Pipeline>()
    .map_err(|_| "not a pipeline")?;
    pipeline.set_state(gst::State::Playing)?;
    eprintln!("listening for RTP L16 on 127.0.0.1:{port}; Ctrl-C to stop");
    let bus = pipeline.bus().ok_or("no bus")?;
    for msg in bus.iter_timed(gst::ClockTime::NONE) {
        match msg.view() {
            gst::MessageView::Element(e) => {
                if let Some(s) = e.structure().filter(|s| s.name() == "valence") {
                    println!(
                        "running-time {:7.2} s  {:<8} negative {:.2} neutral {:.2} positive {:.2}",
                        s.get::<u64>("running-time")? as f64 / 1e9,
                        s.get::<String>("label")?,
                        s.get::<f64>("negative")?,
                        s.get::<f64>("neutral")?,
                        s.get::<f64>("positive")?
                    );
                }
            }
            gst::MessageView::Qos(_) => eprintln!("inference behind: a window was skipped"),
            gst::MessageView::Error(e) => {
                pipeline.set_state(gst::State::Null)?;
                return Err(format!("{} ({:?})", e.error(), e.debug()).into());
            }
            _ => {}
        }
    }
    Ok(())
}
