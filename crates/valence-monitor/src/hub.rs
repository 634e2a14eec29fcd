//! What the monitor knows of its streams: their status and recent windows (for the API and the
//! page), their Prometheus metrics, their alerts, and the event feed behind Server-Sent Events.
//! Source threads write here; HTTP handlers read. Each lock is held only to copy or update a
//! stream's fields: nothing waits, posts or sends while holding one.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::alerts::{AlertState, Transition};
use crate::config::{AlertRule, Source};
use crate::row::Row;

/// How much of each stream's past the page can draw.
pub const HISTORY_S: f64 = 600.0;
/// Events a slow SSE client may fall behind by before it misses some.
const EVENT_BUFFER: usize = 4096;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One window as the API and the page see it.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Wall-clock time the result arrived, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Seconds from the window's end (in the pipeline's running time) to its result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<f64>,
    #[serde(flatten)]
    pub row: Row,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event {
    Window {
        stream: String,
        #[serde(flatten)]
        window: Window,
    },
    Alert {
        stream: String,
        rule: String,
        class: String,
        /// `raised` or `cleared`.
        state: &'static str,
        mean: f64,
        time_ms: u64,
    },
    Status {
        stream: String,
        up: bool,
        state: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        time_ms: u64,
    },
}

impl Event {
    pub fn stream(&self) -> &str {
        match self {
            Event::Window { stream, .. }
            | Event::Alert { stream, .. }
            | Event::Status { stream, .. } => stream,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Event::Window { .. } => "window",
            Event::Alert { .. } => "alert",
            Event::Status { .. } => "status",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    stream: String,
    class: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LabelLabels {
    stream: String,
    label: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    stream: String,
    rule: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
}

struct Metrics {
    probability: Family<ClassLabels, Gauge<f64, AtomicU64>>,
    speech: Family<StreamLabels, Gauge<f64, AtomicU64>>,
    windows: Family<LabelLabels, Counter>,
    skipped: Family<StreamLabels, Counter>,
    latency: Family<StreamLabels, Histogram, fn() -> Histogram>,
    up: Family<StreamLabels, Gauge>,
    restarts: Family<StreamLabels, Counter>,
    batch_size: Family<StreamLabels, Gauge<f64, AtomicU64>>,
    inference: Family<StreamLabels, Gauge<f64, AtomicU64>>,
    alert_active: Family<RuleLabels, Gauge>,
    alerts: Family<RuleLabels, Counter>,
}

/// A stream's status as `/api/streams` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    pub name: String,
    pub uri: String,
    pub up: bool,
    /// `starting`, `playing`, `restarting` or `stopped`.
    pub state: &'static str,
    pub restarts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Windows by label since the monitor started.
    pub windows: BTreeMap<String, u64>,
    pub skipped: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<Window>,
    /// Alert rules raised now.
    pub alerts: Vec<String>,
}

struct Stream {
    status: StreamStatus,
    history: VecDeque<Window>,
    /// One per rule (index in the hub's rules), for the rules that apply to this stream.
    alerts: Vec<(usize, AlertState)>,
}

pub struct Hub {
    names: Vec<String>,
    streams: Vec<Mutex<Stream>>,
    rules: Vec<AlertRule>,
    registry: Registry,
    metrics: Metrics,
    events: broadcast::Sender<Event>,
}

impl Hub {
    pub fn new(sources: &[Source], rules: Vec<AlertRule>) -> Hub {
        let mut registry = Registry::with_prefix("valence");
        let metrics = Metrics {
            probability: Family::default(),
            speech: Family::default(),
            windows: Family::default(),
            skipped: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            up: Family::default(),
            restarts: Family::default(),
            batch_size: Family::default(),
            inference: Family::default(),
            alert_active: Family::default(),
            alerts: Family::default(),
        };
        let m = &metrics;
        registry.register(
            "window_probability",
            "The last classified window's probability of each class",
            m.probability.clone(),
        );
        registry.register(
            "window_speech_ratio",
            "Share of the last window the speech detector called speech",
            m.speech.clone(),
        );
        registry.register(
            "windows",
            "Windows by label (the classes, uncertain, silence, no-speech)",
            m.windows.clone(),
        );
        registry.register(
            "windows_skipped",
            "Windows the element skipped because inference fell behind",
            m.skipped.clone(),
        );
        registry.register(
            "window_latency_seconds",
            "From a window's end (running time) to its result on the bus",
            m.latency.clone(),
        );
        registry.register(
            "up",
            "1 while the source plays and its audio arrives",
            m.up.clone(),
        );
        registry.register(
            "source_restarts",
            "Times the source was restarted after a failure, an end or a stall",
            m.restarts.clone(),
        );
        registry.register(
            "service_batch_size_average",
            "Mean batch size the shared inference service ran this stream's windows in",
            m.batch_size.clone(),
        );
        registry.register(
            "service_inference_seconds_average",
            "Mean inference time of a batch holding this stream's windows",
            m.inference.clone(),
        );
        registry.register(
            "alert_active",
            "1 while the alert rule is raised on the stream",
            m.alert_active.clone(),
        );
        registry.register(
            "alerts",
            "Times the alert rule was raised on the stream",
            m.alerts.clone(),
        );
        let mut streams = Vec::new();
        for s in sources {
            let labels = StreamLabels {
                stream: s.name.clone(),
            };
            metrics.up.get_or_create(&labels).set(0);
            let _ = metrics.restarts.get_or_create(&labels);
            let _ = metrics.skipped.get_or_create(&labels);
            let alerts: Vec<(usize, AlertState)> = rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.applies_to(&s.name))
                .map(|(i, r)| {
                    let l = RuleLabels {
                        stream: s.name.clone(),
                        rule: r.name.clone(),
                    };
                    metrics.alert_active.get_or_create(&l).set(0);
                    let _ = metrics.alerts.get_or_create(&l);
                    (i, AlertState::default())
                })
                .collect();
            streams.push(Mutex::new(Stream {
                status: StreamStatus {
                    name: s.name.clone(),
                    uri: s.uri.clone(),
                    up: false,
                    state: "starting",
                    restarts: 0,
                    error: None,
                    windows: BTreeMap::new(),
                    skipped: 0,
                    last: None,
                    alerts: Vec::new(),
                },
                history: VecDeque::new(),
                alerts,
            }));
        }
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Hub {
            names: sources.iter().map(|s| s.name.clone()).collect(),
            streams,
            rules,
            registry,
            metrics,
            events,
        }
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    fn labels(&self, i: usize) -> StreamLabels {
        StreamLabels {
            stream: self.names[i].clone(),
        }
    }

    fn lock(&self, i: usize) -> std::sync::MutexGuard<'_, Stream> {
        self.streams[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn send(&self, e: Event) {
        // No subscriber is not an error.
        let _ = self.events.send(e);
    }

    /// A window's result from stream `i`; returns the alert events it raised or cleared (already
    /// sent to subscribers and counted), for the log.
    pub fn window(&self, i: usize, row: Row, latency: Option<f64>) -> Vec<Event> {
        let name = self.names[i].clone();
        let labels = self.labels(i);
        let time_ms = now_ms();
        let window = Window {
            time_ms,
            latency,
            row,
        };
        let classified = !matches!(window.row.label.as_str(), "silence" | "no-speech");
        let mut transitions = Vec::new();
        {
            let mut st = self.lock(i);
            *st.status
                .windows
                .entry(window.row.label.clone())
                .or_default() += 1;
            st.status.last = Some(window.clone());
            st.history.push_back(window.clone());
            while st
                .history
                .front()
                .is_some_and(|w| time_ms.saturating_sub(w.time_ms) as f64 > HISTORY_S * 1000.0)
            {
                st.history.pop_front();
            }
            if classified {
                let (start, end) = (window.row.start, window.row.end);
                for (rule_i, state) in st.alerts.iter_mut() {
                    let rule = &self.rules[*rule_i];
                    let Some(p) = class_probability(&window.row, &rule.class) else {
                        continue;
                    };
                    if let Some(t) = state.push(rule, start, end, p) {
                        transitions.push((*rule_i, t));
                    }
                }
                st.status.alerts = st
                    .alerts
                    .iter()
                    .filter(|(_, a)| a.active)
                    .map(|(r, _)| self.rules[*r].name.clone())
                    .collect();
            }
        }
        let m = &self.metrics;
        m.windows
            .get_or_create(&LabelLabels {
                stream: name.clone(),
                label: window.row.label.clone(),
            })
            .inc();
        if classified {
            for (class, p) in [
                ("negative", window.row.negative),
                ("neutral", window.row.neutral),
                ("positive", window.row.positive),
            ] {
                m.probability
                    .get_or_create(&ClassLabels {
                        stream: name.clone(),
                        class: class.into(),
                    })
                    .set(p);
            }
        }
        if let Some(s) = window.row.speech {
            m.speech.get_or_create(&labels).set(s);
        }
        if let Some(l) = latency {
            m.latency.get_or_create(&labels).observe(l);
        }
        self.send(Event::Window {
            stream: name.clone(),
            window,
        });
        let mut out = Vec::new();
        for (rule_i, t) in transitions {
            let rule = &self.rules[rule_i];
            let l = RuleLabels {
                stream: name.clone(),
                rule: rule.name.clone(),
            };
            let (state, mean) = match t {
                Transition::Raised { mean } => {
                    m.alerts.get_or_create(&l).inc();
                    m.alert_active.get_or_create(&l).set(1);
                    ("raised", mean)
                }
                Transition::Cleared { mean } => {
                    m.alert_active.get_or_create(&l).set(0);
                    ("cleared", mean)
                }
            };
            let e = Event::Alert {
                stream: name.clone(),
                rule: rule.name.clone(),
                class: rule.class.clone(),
                state,
                mean,
                time_ms,
            };
            self.send(e.clone());
            out.push(e);
        }
        out
    }

    /// The source's state changed (`up`: its audio arrives; `state`: see [`StreamStatus`]).
    pub fn status(&self, i: usize, up: bool, state: &'static str, error: Option<String>) {
        let changed = {
            let mut st = self.lock(i);
            let changed = st.status.up != up || st.status.state != state || error.is_some();
            st.status.up = up;
            st.status.state = state;
            if error.is_some() {
                st.status.error = error.clone();
            }
            changed
        };
        self.metrics
            .up
            .get_or_create(&self.labels(i))
            .set(up as i64);
        if changed {
            self.send(Event::Status {
                stream: self.names[i].clone(),
                up,
                state,
                error,
                time_ms: now_ms(),
            });
        }
    }

    /// The source is being started again: its timeline restarts.
    pub fn restarted(&self, i: usize) {
        {
            let mut st = self.lock(i);
            st.status.restarts += 1;
            for (_, a) in st.alerts.iter_mut() {
                a.restart();
            }
        }
        self.metrics.restarts.get_or_create(&self.labels(i)).inc();
    }

    /// The element's own counters, read about once a second: skipped windows since the last
    /// read, and the service's mean batch size and inference time for this stream.
    pub fn element_figures(&self, i: usize, new_skipped: u64, batch: f64, inference_s: f64) {
        let labels = self.labels(i);
        if new_skipped > 0 {
            self.lock(i).status.skipped += new_skipped;
            self.metrics
                .skipped
                .get_or_create(&labels)
                .inc_by(new_skipped);
        }
        if batch > 0.0 {
            self.metrics.batch_size.get_or_create(&labels).set(batch);
            self.metrics
                .inference
                .get_or_create(&labels)
                .set(inference_s);
        }
    }

    pub fn streams(&self) -> Vec<StreamStatus> {
        (0..self.streams.len())
            .map(|i| self.lock(i).status.clone())
            .collect()
    }

    /// A stream's status and its windows of the last [`HISTORY_S`] seconds.
    pub fn stream(&self, i: usize) -> (StreamStatus, Vec<Window>) {
        let st = self.lock(i);
        (st.status.clone(), st.history.iter().cloned().collect())
    }

    /// `/metrics` in the OpenMetrics text format.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            out = format!("# encoding failed: {e}\n# EOF\n");
        }
        out
    }
}

fn class_probability(row: &Row, class: &str) -> Option<f64> {
    match class {
        "negative" => Some(row.negative),
        "neutral" => Some(row.neutral),
        "positive" => Some(row.positive),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(name: &str) -> Source {
        Source {
            name: name.into(),
            uri: format!("file:///{name}.wav"),
            looping: false,
            properties: vec![],
        }
    }

    fn row(start: f64, label: &str, negative: f64) -> Row {
        let rest = (1.0 - negative) / 2.0;
        Row {
            file: "a".into(),
            start,
            end: start + 3.0,
            label: label.into(),
            confidence: negative.max(rest),
            negative,
            neutral: rest,
            positive: rest,
            speech: Some(0.9),
        }
    }

    #[test]
    fn windows_feed_metrics_events_and_alerts() {
        let rule = AlertRule {
            name: "neg".into(),
            class: "negative".into(),
            above: 0.7,
            clear: 0.5,
            over_s: 5.0,
            sources: vec!["a".into()],
            line: 1,
        };
        let hub = Hub::new(&[source("a"), source("b")], vec![rule]);
        let mut rx = hub.subscribe();
        hub.status(0, true, "playing", None);
        let mut raised = Vec::new();
        for i in 0..6 {
            raised.extend(hub.window(0, row(i as f64, "negative", 0.9), Some(0.2)));
        }
        hub.window(0, row(6.0, "no-speech", 0.0), None);
        assert_eq!(raised.len(), 1, "raised once after 5 s of speech");
        let text = hub.metrics_text();
        for want in [
            "valence_windows_total{stream=\"a\",label=\"negative\"} 6",
            "valence_windows_total{stream=\"a\",label=\"no-speech\"} 1",
            "valence_alerts_total{stream=\"a\",rule=\"neg\"} 1",
            "valence_alert_active{stream=\"a\",rule=\"neg\"} 1",
            "valence_up{stream=\"a\"} 1",
            "valence_up{stream=\"b\"} 0",
            "valence_window_latency_seconds_count{stream=\"a\"} 6",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        assert!(text.contains("valence_window_probability{stream=\"a\",class=\"negative\"} 0.9"));
        assert!(!text.contains("rule=\"neg\",stream=\"b\"") && !text.contains("stream=\"b\",rule"));
        let (status, history) = hub.stream(0);
        assert_eq!(status.alerts, ["neg"]);
        assert_eq!(history.len(), 7);
        assert_eq!(
            status.last.as_ref().map(|w| w.row.label.as_str()),
            Some("no-speech")
        );
        let mut kinds = Vec::new();
        while let Ok(e) = rx.try_recv() {
            kinds.push(e.kind());
        }
        assert_eq!(kinds.iter().filter(|k| **k == "window").count(), 7);
        assert_eq!(kinds.iter().filter(|k| **k == "alert").count(), 1);
        assert_eq!(kinds[0], "status");
        // Calm speech clears it.
        let cleared: Vec<Event> = (10..20)
            .flat_map(|i| hub.window(0, row(i as f64, "neutral", 0.1), None))
            .collect();
        assert!(matches!(
            &cleared[..],
            [Event::Alert {
                state: "cleared",
                ..
            }]
        ));
        assert!(
            hub.metrics_text()
                .contains("valence_alert_active{stream=\"a\",rule=\"neg\"} 0")
        );
    }
}
