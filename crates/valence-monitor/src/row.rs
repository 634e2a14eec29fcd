//! One window's result as `valence classify` and `valence monitor` write it (JSON lines or CSV),
//! read from a `valence` element message.

use std::io::Write;

use anyhow::Result;

/// One window's result as the CLI prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub file: String,
    pub start: f64,
    pub end: f64,
    pub label: String,
    pub confidence: f64,
    pub negative: f64,
    pub neutral: f64,
    pub positive: f64,
    /// Share of the window's frames the speech detector called speech (when it ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speech: Option<f64>,
}

/// A row from a `valence` element message.
pub fn row_from_structure(file: &str, s: &gst::StructureRef) -> Result<Row> {
    let ts: u64 = s.get("timestamp")?;
    let dur: u64 = s.get("duration")?;
    Ok(Row {
        file: file.to_string(),
        start: ts as f64 / 1e9,
        end: (ts + dur) as f64 / 1e9,
        label: s.get("label")?,
        confidence: s.get("confidence")?,
        negative: s.get("negative").unwrap_or(0.0),
        neutral: s.get("neutral").unwrap_or(0.0),
        positive: s.get("positive").unwrap_or(0.0),
        speech: s.get("speech").ok(),
    })
}

/// Writes rows as JSON lines, or as CSV (with a header when `header`).
pub fn write_rows(out: &mut dyn Write, rows: &[Row], csv: bool, header: bool) -> Result<()> {
    for (i, r) in rows.iter().enumerate() {
        if csv {
            if header && i == 0 {
                writeln!(
                    out,
                    "file,start,end,label,confidence,negative,neutral,positive,speech"
                )?;
            }
            let file = if r.file.contains([',', '"']) {
                format!("\"{}\"", r.file.replace('"', "\"\""))
            } else {
                r.file.clone()
            };
            writeln!(
                out,
                "{file},{:.3},{:.3},{},{:.4},{:.4},{:.4},{:.4},{}",
                r.start,
                r.end,
                r.label,
                r.confidence,
                r.negative,
                r.neutral,
                r.positive,
                r.speech.map(|s| format!("{s:.3}")).unwrap_or_default()
            )?;
        } else {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
    }
    Ok(())
}
