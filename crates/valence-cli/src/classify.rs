//! `valence classify`: files through a real pipeline (decodebin → valenceclassify).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use gst::prelude::*;

use crate::row::{Row, row_from_structure, write_rows};

pub struct Options {
    pub model: String,
    pub device: String,
    pub window_s: f64,
    pub hop_s: f64,
    pub silence_threshold: f64,
    /// The element's speech gate (`vad`), and its `min-speech` when not the default.
    pub vad: bool,
    pub min_speech: Option<f64>,
    /// The element's `min-confidence` (0: off).
    pub min_confidence: f64,
}

fn secs_to_ns(s: f64) -> Result<u64> {
    if !(s.is_finite() && s > 0.0) {
        bail!("durations must be positive seconds, got {s}");
    }
    Ok((s * 1e9).round() as u64)
}

/// Runs one file and calls `on_row` for each window as its message arrives.
pub fn classify_file(path: &Path, opts: &Options, mut on_row: impl FnMut(Row)) -> Result<()> {
    if !path.is_file() {
        bail!("{} does not exist", path.display());
    }
    let pipeline = gst::Pipeline::new();
    let src = gst::ElementFactory::make("filesrc")
        .property("location", path.to_string_lossy().as_ref())
        .build()?;
    let decode = gst::ElementFactory::make("decodebin").build()?;
    let convert = gst::ElementFactory::make("audioconvert").build()?;
    let mut builder = gst::ElementFactory::make("valenceclassify")
        .property("model", &opts.model)
        .property("device", &opts.device)
        .property("window", secs_to_ns(opts.window_s)?)
        .property("hop", secs_to_ns(opts.hop_s)?)
        .property("silence-threshold", opts.silence_threshold)
        .property("vad", opts.vad)
        .property("min-confidence", opts.min_confidence.clamp(0.0, 1.0))
        .property("attach-meta", false);
    if let Some(m) = opts.min_speech {
        if !(0.0..=1.0).contains(&m) {
            bail!("--min-speech must be between 0 and 1, got {m}");
        }
        builder = builder.property("min-speech", m);
    }
    let classify = builder
        .build()
        .context("the valenceclassify element is not available")?;
    let sink = gst::ElementFactory::make("fakesink")
        .property("sync", false)
        .build()?;
    pipeline.add_many([&src, &decode, &convert, &classify, &sink])?;
    src.link(&decode)?;
    gst::Element::link_many([&convert, &classify, &sink])?;
    valence_train::decode::link_audio_pads(&decode, &convert);

    let progress = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} s ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress.set_message(
        path.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
    );
    let file = path.to_string_lossy().to_string();
    let bus = pipeline.bus().context("no bus")?;
    let result = (|| -> Result<()> {
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|_| anyhow::anyhow!("pipeline failed to start"))
            .or_else(|e| first_error(&bus).map_or(Err(e), Err))?;
        loop {
            let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(250)) else {
                if let Some(dur) = pipeline.query_duration::<gst::ClockTime>() {
                    progress.set_length(dur.seconds());
                }
                if let Some(pos) = pipeline.query_position::<gst::ClockTime>() {
                    progress.set_position(pos.seconds());
                }
                continue;
            };
            match msg.view() {
                gst::MessageView::Element(e) => {
                    if let Some(s) = e.structure()
                        && s.name() == "valence"
                    {
                        on_row(row_from_structure(&file, s)?);
                    }
                }
                gst::MessageView::Eos(_) => return Ok(()),
                gst::MessageView::Error(e) => {
                    bail!(
                        "{}: {}{}",
                        path.display(),
                        e.error(),
                        e.debug().map(|d| format!(" ({d})")).unwrap_or_default()
                    )
                }
                _ => {}
            }
        }
    })();
    progress.finish_and_clear();
    let _ = pipeline.set_state(gst::State::Null);
    result
}

fn first_error(bus: &gst::Bus) -> Option<anyhow::Error> {
    while let Some(msg) = bus.pop() {
        if let gst::MessageView::Error(e) = msg.view() {
            return Some(anyhow::anyhow!(
                "{}{}",
                e.error(),
                e.debug().map(|d| format!(" ({d})")).unwrap_or_default()
            ));
        }
    }
    None
}

pub fn run(files: &[PathBuf], opts: &Options, csv: bool, plot: Option<&Path>) -> Result<()> {
    let stdout = std::io::stdout();
    let mut all = Vec::new();
    let mut failed = 0;
    let mut first = true;
    for f in files {
        let mut rows = Vec::new();
        match classify_file(f, opts, |r| rows.push(r)) {
            Ok(()) => {
                if rows.is_empty() {
                    // Never silent: a file with no window says so.
                    eprintln!("{}: no audio to classify", f.display());
                }
                write_rows(&mut stdout.lock(), &rows, csv, first)?;
                first = first && rows.is_empty();
                all.extend(rows);
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                failed += 1;
            }
        }
    }
    if let Some(p) = plot {
        crate::plot::timeline(&all, p)?;
        eprintln!("timeline written to {}", p.display());
    }
    if failed > 0 {
        bail!("{failed} of {} file(s) failed", files.len());
    }
    Ok(())
}
