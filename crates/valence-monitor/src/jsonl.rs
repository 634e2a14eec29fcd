//! `--jsonl DIR`: one JSON-lines file per stream and UTC day (`DIR/NAME-YYYY-MM-DD.jsonl`), rows
//! in the `valence classify` schema plus the wall-clock `time` each result arrived.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::row::Row;

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    row: &'a Row,
}

pub struct Jsonl {
    dir: PathBuf,
    name: String,
    open: Option<(String, BufWriter<File>)>,
    /// Set after the first failed write, so that a full disk logs once, not once a window.
    failing: bool,
}

impl Jsonl {
    /// Checks that `dir` exists or can be made, and is writable.
    pub fn prepare(dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let probe = dir.join(".valence-monitor-write-test");
        File::create(&probe).with_context(|| format!("cannot write in {}", dir.display()))?;
        let _ = std::fs::remove_file(probe);
        Ok(())
    }

    pub fn new(dir: &Path, name: &str) -> Jsonl {
        Jsonl {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            open: None,
            failing: false,
        }
    }

    pub fn path_for(&self, day: &str) -> PathBuf {
        self.dir.join(format!("{}-{day}.jsonl", self.name))
    }

    /// Appends a row stamped now.
    pub fn write(&mut self, row: &Row) {
        self.write_at(row, Utc::now());
    }

    pub fn write_at(&mut self, row: &Row, now: DateTime<Utc>) {
        let day = now.format("%Y-%m-%d").to_string();
        let line = Line {
            time: now.to_rfc3339_opts(SecondsFormat::Millis, true),
            row,
        };
        let result = (|| -> Result<()> {
            if self.open.as_ref().is_none_or(|(d, _)| *d != day) {
                if let Some((_, mut w)) = self.open.take() {
                    w.flush()?;
                }
                let path = self.path_for(&day);
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                self.open = Some((day, BufWriter::new(f)));
            }
            if let Some((_, w)) = self.open.as_mut() {
                serde_json::to_writer(&mut *w, &line)?;
                w.write_all(b"\n")?;
                w.flush()?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                self.failing = true;
                eprintln!("valence monitor: {}: JSONL not written: {e:#}", self.name);
            }
            Err(_) => {}
        }
    }

    pub fn flush(&mut self) {
        if let Some((_, w)) = self.open.as_mut() {
            let _ = w.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(start: f64) -> Row {
        Row {
            file: "news".into(),
            start,
            end: start + 3.0,
            label: "neutral".into(),
            confidence: 0.6,
            negative: 0.2,
            neutral: 0.6,
            positive: 0.2,
            speech: Some(0.9),
        }
    }

    #[test]
    fn one_file_per_day() {
        let dir = std::env::temp_dir().join(format!("valence-jsonl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Jsonl::prepare(&dir).unwrap();
        let mut j = Jsonl::new(&dir, "news");
        let t1: DateTime<Utc> = "2026-12-04T23:59:59Z".parse().unwrap();
        let t2: DateTime<Utc> = "2026-12-05T00:00:01Z".parse().unwrap();
        j.write_at(&row(0.0), t1);
        j.write_at(&row(1.0), t1);
        j.write_at(&row(2.0), t2);
        let a = std::fs::read_to_string(dir.join("news-2026-12-04.jsonl")).unwrap();
        let b = std::fs::read_to_string(dir.join("news-2026-12-05.jsonl")).unwrap();
        assert_eq!(a.lines().count(), 2);
        assert_eq!(b.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(b.lines().next().unwrap()).unwrap();
        assert_eq!(v["time"], "2026-12-05T00:00:01.000Z");
        assert_eq!(v["start"], 2.0);
        assert_eq!(v["label"], "neutral");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
