//! The monitor's TOML configuration: sources, element properties, the listen address, alert
//! rules. Every error names the line it comes from; nothing starts until all of it is valid.
//!
//! ```toml
//! listen = "127.0.0.1:9750"      # optional; --listen overrides
//! jsonl = "/var/log/valence"     # optional; one JSONL file per stream, rotated daily
//!
//! [element]                      # valenceclassify properties for every source
//! min-confidence = 0.6
//!
//! [[source]]
//! name = "news"                  # letters, digits, '-', '_', '.'
//! uri = "srt://10.0.0.5:9000"
//! [source.element]               # this source's own properties (override [element])
//! window = "4000000000"
//!
//! [[source]]
//! name = "studio"
//! uri = "file:///srv/jingles.wav"
//! loop = true                    # play a file again at its end
//!
//! [[alert]]
//! name = "sustained-negative"
//! class = "negative"             # a class of the model
//! above = 0.7                    # raised when the mean probability reaches this...
//! over = 10.0                    # ...over the last 10 s of speech
//! clear = 0.6                    # cleared below this (default: above - 0.1)
//! sources = ["news"]             # default: every source
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use toml::Spanned;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9750";

/// A valenceclassify property as written in the config: checked against the element before
/// anything starts, applied with GStreamer's own parser (as `gst-launch-1.0` does).
#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    pub name: String,
    pub value: String,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub name: String,
    pub uri: String,
    pub looping: bool,
    /// `[element]` then the source's own, later ones win.
    pub properties: Vec<Property>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AlertRule {
    pub name: String,
    pub class: String,
    pub above: f64,
    pub clear: f64,
    pub over_s: f64,
    /// Empty: every source.
    pub sources: Vec<String>,
    pub line: usize,
}

impl AlertRule {
    pub fn applies_to(&self, source: &str) -> bool {
        self.sources.is_empty() || self.sources.iter().any(|s| s == source)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub jsonl: Option<PathBuf>,
    /// `[element]`: properties for every source, those named on the command line too.
    pub element: Vec<Property>,
    pub sources: Vec<Source>,
    pub alerts: Vec<AlertRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Spanned<String>>,
    jsonl: Option<PathBuf>,
    #[serde(default)]
    element: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    #[serde(default)]
    source: Vec<Spanned<RawSource>>,
    #[serde(default)]
    alert: Vec<Spanned<RawAlert>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: Spanned<String>,
    uri: Spanned<String>,
    #[serde(default, rename = "loop")]
    looping: bool,
    #[serde(default)]
    element: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlert {
    name: String,
    class: Spanned<String>,
    above: Spanned<f64>,
    over: Spanned<f64>,
    clear: Option<Spanned<f64>>,
    #[serde(default)]
    sources: Vec<Spanned<String>>,
}

/// Line (1-based) of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A stream name usable in URLs, metric labels and file names.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || name.starts_with('.')
    {
        bail!(
            "source name {name:?}: use 1-64 letters, digits, '-', '_' or '.' (not first), \
             it names URLs, metrics and files"
        );
    }
    Ok(())
}

/// A URI GStreamer can open, or a path of an existing file made into a `file://` URI.
pub fn to_uri(s: &str) -> Result<String> {
    if let Some((scheme, rest)) = s.split_once("://") {
        let scheme_ok = !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !scheme_ok || rest.is_empty() {
            bail!("{s:?} is not a URI (scheme://...)");
        }
        return Ok(s.to_string());
    }
    let p = Path::new(s);
    if !p.is_file() {
        bail!("{s:?} is neither a URI (scheme://...) nor an existing file");
    }
    let abs = p
        .canonicalize()
        .with_context(|| format!("cannot resolve {s:?}"))?;
    gst::glib::filename_to_uri(&abs, None)
        .map(|u| u.to_string())
        .map_err(|e| anyhow::anyhow!("cannot make a URI of {}: {e}", abs.display()))
}

fn property_value(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn properties(
    text: &str,
    table: &BTreeMap<Spanned<String>, Spanned<toml::Value>>,
) -> Result<Vec<Property>> {
    let mut out = Vec::new();
    for (k, v) in table {
        let line = line_of(text, k.span().start);
        let Some(value) = property_value(v.get_ref()) else {
            bail!(
                "line {line}: property {:?} must be a string, number or boolean",
                k.get_ref()
            );
        };
        out.push(Property {
            name: k.get_ref().clone(),
            value,
            line,
        });
    }
    Ok(out)
}

impl Config {
    /// Parses a config file's text; `listen` from the command line wins over the file's.
    pub fn parse(text: &str) -> Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            anyhow::anyhow!(
                "{}{}",
                line.map(|l| format!("line {l}: ")).unwrap_or_default(),
                e.message()
            )
        })?;
        let listen = match &raw.listen {
            Some(l) => l.get_ref().parse().map_err(|e| {
                anyhow::anyhow!(
                    "line {}: listen {:?}: {e} (want ADDRESS:PORT)",
                    line_of(text, l.span().start),
                    l.get_ref()
                )
            })?,
            None => DEFAULT_LISTEN.parse()?,
        };
        let common = properties(text, &raw.element)?;
        let mut sources: Vec<Source> = Vec::new();
        for s in &raw.source {
            let line = line_of(text, s.span().start);
            let name = s.get_ref().name.get_ref().clone();
            check_name(&name).map_err(|e| {
                anyhow::anyhow!("line {}: {e}", line_of(text, s.get_ref().name.span().start))
            })?;
            if sources.iter().any(|o| o.name == name) {
                bail!("line {line}: a second source named {name:?}");
            }
            let uri_line = line_of(text, s.get_ref().uri.span().start);
            let uri = to_uri(s.get_ref().uri.get_ref())
                .map_err(|e| anyhow::anyhow!("line {uri_line}: {e}"))?;
            let mut props = common.clone();
            props.extend(properties(text, &s.get_ref().element)?);
            sources.push(Source {
                name,
                uri,
                looping: s.get_ref().looping,
                properties: props,
            });
        }
        let mut alerts = Vec::new();
        for a in &raw.alert {
            let line = line_of(text, a.span().start);
            let r = a.get_ref();
            check_name(&r.name).map_err(|e| anyhow::anyhow!("line {line}: alert {e}"))?;
            let above = *r.above.get_ref();
            let clear = r
                .clear
                .as_ref()
                .map(|c| *c.get_ref())
                .unwrap_or(above - 0.1);
            let over = *r.over.get_ref();
            if !(0.0..=1.0).contains(&above) {
                bail!(
                    "line {}: above must be a probability (0-1), got {above}",
                    line_of(text, r.above.span().start)
                );
            }
            if !(0.0..=above).contains(&clear) {
                bail!("line {line}: clear must be between 0 and above ({above}), got {clear}");
            }
            if !(over.is_finite() && over > 0.0 && over <= 3600.0) {
                bail!(
                    "line {}: over must be seconds of speech (0-3600], got {over}",
                    line_of(text, r.over.span().start)
                );
            }
            for s in &r.sources {
                if !sources.iter().any(|o| &o.name == s.get_ref()) {
                    bail!(
                        "line {}: alert {:?} names source {:?}, which the config does not define",
                        line_of(text, s.span().start),
                        r.name,
                        s.get_ref()
                    );
                }
            }
            if alerts.iter().any(|o: &AlertRule| o.name == r.name) {
                bail!("line {line}: a second alert named {:?}", r.name);
            }
            alerts.push(AlertRule {
                name: r.name.clone(),
                class: r.class.get_ref().clone(),
                above,
                clear,
                over_s: over,
                sources: r.sources.iter().map(|s| s.get_ref().clone()).collect(),
                line: line_of(text, r.class.span().start),
            });
        }
        Ok(Config {
            listen,
            jsonl: raw.jsonl,
            element: common,
            sources,
            alerts,
        })
    }

    pub fn read(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("{}", path.display()))
    }

    /// Adds `NAME=VALUE` element properties (from the command line) to every source.
    pub fn set_properties(&mut self, assignments: &[String]) -> Result<()> {
        for a in assignments {
            let Some((name, value)) = a.split_once('=') else {
                bail!("--set {a:?}: want NAME=VALUE");
            };
            for s in &mut self.sources {
                s.properties.push(Property {
                    name: name.trim().to_string(),
                    value: value.trim().to_string(),
                    line: 0,
                });
            }
        }
        Ok(())
    }

    /// Adds sources given on the command line, named after their file or host (made unique).
    pub fn add_uris(&mut self, uris: &[String], looping: bool) -> Result<()> {
        for u in uris {
            let uri = to_uri(u)?;
            let stem = uri
                .trim_end_matches('/')
                .rsplit(['/', ':', '@'])
                .next()
                .unwrap_or("stream")
                .split('.')
                .next()
                .unwrap_or("stream");
            let mut base: String = stem
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .take(48)
                .collect();
            if base.is_empty() {
                base = "stream".into();
            }
            let mut name = base.clone();
            let mut n = 2;
            while self.sources.iter().any(|s| s.name == name) {
                name = format!("{base}-{n}");
                n += 1;
            }
            self.sources.push(Source {
                name,
                uri,
                looping,
                properties: self.element.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:9999"

[element]
min-confidence = 0.6

[[source]]
name = "news"
uri = "udp://127.0.0.1:5004"
[source.element]
hop = "500000000"

[[source]]
name = "hold"
uri = "http://127.0.0.1:8000/a.wav"
loop = true

[[alert]]
name = "neg"
class = "negative"
above = 0.7
over = 10
sources = ["news"]
"#;

    #[test]
    fn a_full_config_reads() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(c.sources.len(), 2);
        assert_eq!(c.sources[0].properties.len(), 2);
        assert_eq!(c.sources[0].properties[1].name, "hop");
        assert_eq!(c.sources[0].properties[1].line, 11);
        assert!(c.sources[1].looping);
        let a = &c.alerts[0];
        assert!((a.clear - 0.6).abs() < 1e-9 && a.over_s == 10.0);
        assert!(a.applies_to("news") && !a.applies_to("hold"));
    }

    fn err(text: &str) -> String {
        format!("{:#}", Config::parse(text).unwrap_err())
    }

    #[test]
    fn errors_name_their_line() {
        let e = err(&GOOD.replace("name = \"hold\"", "name = \"news\""));
        assert!(e.contains("line 13") && e.contains("second source"), "{e}");
        let e = err(&GOOD.replace("over = 10", "over = -1"));
        assert!(e.contains("line 22") && e.contains("over"), "{e}");
        let e = err(&GOOD.replace("sources = [\"news\"]", "sources = [\"nope\"]"));
        assert!(e.contains("line 23") && e.contains("nope"), "{e}");
        let e = err(&GOOD.replace("uri = \"udp", "uri = \"/no/such/file\"\n#\""));
        assert!(e.contains("line 9") && e.contains("neither a URI"), "{e}");
        let e = err(&GOOD.replace("loop = true", "lopo = true"));
        assert!(e.contains("line 16") && e.contains("lopo"), "{e}");
        let e = err(&GOOD.replace("127.0.0.1:9999", "localhost"));
        assert!(e.contains("line 2") && e.contains("listen"), "{e}");
        let e = err(&GOOD.replace("name = \"news\"", "name = \"a b\""));
        assert!(e.contains("line 8") && e.contains("letters"), "{e}");
        let e = err(&GOOD.replace("above = 0.7", "above = 7"));
        assert!(e.contains("line 21") && e.contains("probability"), "{e}");
        let e = err("[[source]\nname=1");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn command_line_uris_get_unique_names() {
        let mut c = Config::parse("").unwrap();
        c.add_uris(
            &[
                "rtsp://cam.local/live/ch1".into(),
                "srt://10.0.0.1:9000".into(),
                "rtsp://other/ch1".into(),
            ],
            false,
        )
        .unwrap();
        let names: Vec<_> = c.sources.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["ch1", "9000", "ch1-2"]);
        assert!(c.add_uris(&["not a uri".into()], false).is_err());
    }
}
