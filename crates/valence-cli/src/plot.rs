//! Pictures: the valence timeline of `classify --plot`, the confusion matrix and per-language
//! bars of `eval --plot`. Text uses DejaVu Sans from the system (Debian: fonts-dejavu-core).

use std::path::Path;
use std::sync::Once;

use anyhow::{Result, bail};
use plotters::prelude::*;

use crate::row::Row;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn ensure_font() -> Result<()> {
    static ONCE: Once = Once::new();
    static mut OK: bool = false;
    ONCE.call_once(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    // SAFETY: written once inside call_once, read only after it.
                    unsafe { OK = true };
                    break;
                }
            }
        }
    });
    // SAFETY: see above.
    if unsafe { OK } {
        Ok(())
    } else {
        bail!("no DejaVu Sans font found for plotting (apt-get install fonts-dejavu-core)")
    }
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting failed: {e:?}")
}

const CLASS_COLORS: [RGBColor; 3] = [
    RGBColor(200, 50, 50),
    RGBColor(120, 120, 120),
    RGBColor(40, 150, 60),
];

/// Probability of each class over time, one panel per file.
pub fn timeline(rows: &[Row], out: &Path) -> Result<()> {
    ensure_font()?;
    let mut files: Vec<&str> = rows.iter().map(|r| r.file.as_str()).collect();
    files.dedup();
    if files.is_empty() {
        bail!("nothing to plot: no windows were classified");
    }
    let root = BitMapBackend::new(out, (1000, 260 * files.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    for (panel, file) in root.split_evenly((files.len(), 1)).iter().zip(&files) {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.file == *file).collect();
        let t_end = rs.iter().map(|r| r.end).fold(1.0, f64::max);
        let name = Path::new(file)
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("valence: {name}"), ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(0.0..t_end, 0.0..1.0)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("time (s, window centre)")
            .y_desc("probability")
            .draw()
            .map_err(err)?;
        // Stretches without a valence: windows without speech and silent ones, shaded.
        let unvalued = |r: &&&Row| r.label == "no-speech" || r.label == "silence";
        chart
            .draw_series(
                rs.iter().filter(unvalued).map(|r| {
                    Rectangle::new([(r.start, 0.0), (r.end, 1.0)], BLACK.mix(0.07).filled())
                }),
            )
            .map_err(err)?
            .label("no speech / silence")
            .legend(|(x, y)| {
                Rectangle::new([(x, y - 5), (x + 18, y + 5)], BLACK.mix(0.2).filled())
            });
        for (c, label) in ["negative", "neutral", "positive"].iter().enumerate() {
            let color = CLASS_COLORS[c];
            let pts: Vec<(f64, f64)> = rs
                .iter()
                .filter(|r| r.label != "silence" && r.label != "no-speech")
                .map(|r| {
                    let p = [r.negative, r.neutral, r.positive][c];
                    ((r.start + r.end) / 2.0, p)
                })
                .collect();
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(err)?;
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(err)?
                .label(*label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Accuracy against confidence per bin (bars), the diagonal of perfect calibration, and each
/// bin's share of the predictions (the gap to the diagonal, weighted so, is the ECE).
fn reliability_diagram<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    bins: &[valence_train::metrics::ReliabilityBin],
) -> Result<()> {
    let n: usize = bins.iter().map(|b| b.n).sum::<usize>().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "reliability (bars: accuracy per confidence bin)",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(40)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("confidence")
        .y_desc("accuracy")
        .draw()
        .map_err(err)?;
    let width = 1.0 / 15.0;
    chart
        .draw_series(bins.iter().map(|b| {
            let x = b.confidence;
            Rectangle::new(
                [(x - width / 2.0, 0.0), (x + width / 2.0, b.accuracy)],
                BLUE.mix(0.5).filled(),
            )
        }))
        .map_err(err)?;
    chart
        .draw_series(
            bins.iter()
                .map(|b| Circle::new((b.confidence, b.n as f64 / n as f64), 4, RED.filled())),
        )
        .map_err(err)?
        .label("share of clips")
        .legend(|(x, y)| Circle::new((x + 9, y), 4, RED.filled()));
    chart
        .draw_series(LineSeries::new(
            [(0.0, 0.0), (1.0, 1.0)],
            BLACK.stroke_width(1),
        ))
        .map_err(err)?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Confusion matrix (rows = actual) beside macro-F1 bars per language and a reliability diagram.
pub fn evaluation(
    confusion: &[Vec<usize>],
    labels: &[&str],
    per_language: &[(String, f64)],
    reliability: &[valence_train::metrics::ReliabilityBin],
    title: &str,
    out: &Path,
) -> Result<()> {
    ensure_font()?;
    let root = BitMapBackend::new(out, (1600, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, rest) = root.split_horizontally(520);
    let (right, diagram) = rest.split_horizontally(560);
    reliability_diagram(&diagram, reliability)?;
    let n = labels.len();
    let left = left
        .titled(
            &format!("{title}: confusion (rows = actual)"),
            ("sans-serif", 18),
        )
        .map_err(err)?;
    let cells = left.margin(30, 30, 90, 10).split_evenly((n, n));
    for (i, cell) in cells.iter().enumerate() {
        let (r, c) = (i / n, i % n);
        let row_total: usize = confusion[r].iter().sum::<usize>().max(1);
        let frac = confusion[r][c] as f64 / row_total as f64;
        let shade = (255.0 * (1.0 - frac)) as u8;
        cell.fill(&RGBColor(shade, shade, 255)).map_err(err)?;
        let (w, h) = cell.dim_in_pixel();
        let color = if frac > 0.5 { WHITE } else { BLACK };
        cell.draw_text(
            &format!("{}  ({:.0}%)", confusion[r][c], frac * 100.0),
            &("sans-serif", 20).into_font().color(&color),
            (w as i32 / 2 - 35, h as i32 / 2 - 10),
        )
        .map_err(err)?;
        if c == 0 {
            cell.draw_text(
                labels[r],
                &("sans-serif", 14).into_font().color(&BLACK),
                (4, 4),
            )
            .map_err(err)?;
        }
        if r == n - 1 {
            cell.draw_text(
                &format!("→ {}", labels[c]),
                &("sans-serif", 14).into_font().color(&BLACK),
                (4, h as i32 - 18),
            )
            .map_err(err)?;
        }
    }
    let mut chart = ChartBuilder::on(&right)
        .caption("macro-F1 per language", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(40)
        .build_cartesian_2d(-0.5..per_language.len().max(1) as f64 - 0.5, 0.0..1.0)
        .map_err(err)?;
    let names: Vec<String> = per_language.iter().map(|(l, _)| l.clone()).collect();
    chart
        .configure_mesh()
        .x_labels(per_language.len().max(1))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(err)?;
    chart
        .draw_series(per_language.iter().enumerate().map(|(i, (_, f1))| {
            Rectangle::new(
                [(i as f64 - 0.35, 0.0), (i as f64 + 0.35, *f1)],
                BLUE.mix(0.6).filled(),
            )
        }))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
