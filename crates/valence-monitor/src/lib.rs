//! `valence monitor`: watches many live streams with one command. One pipeline per source
//! (`uridecodebin → audioconvert → valenceclassify → fakesink`), all sharing the element's
//! inference service; each source restarted with back-off on its own; Prometheus metrics, a
//! JSON API, Server-Sent Events, alert rules, daily JSONL files and a live page over HTTP.
//!
//! The valenceclassify element must be registered (the `valence` command does so) and
//! GStreamer initialised before [`Monitor::start`].

pub mod alerts;
pub mod config;
pub mod http;
pub mod hub;
pub mod jsonl;
pub mod row;
pub mod source;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};

pub use config::Config;
pub use hub::Hub;
pub use source::Supervision;

/// A running monitor: its sources' threads and its HTTP server.
pub struct Monitor {
    pub addr: SocketAddr,
    pub hub: Arc<Hub>,
    stop: Arc<AtomicBool>,
    sources: Vec<JoinHandle<()>>,
    runtime: tokio::runtime::Runtime,
    server: Option<tokio::task::JoinHandle<()>>,
    shutdown: Arc<tokio::sync::Notify>,
    closing: tokio::sync::watch::Sender<bool>,
}

impl Monitor {
    /// Checks everything (every source's element properties, the JSONL directory, the listen
    /// address), then starts the server and the sources. On any error nothing was started.
    pub fn start(config: &Config, sup: Supervision) -> Result<Monitor> {
        if config.sources.is_empty() {
            bail!("no sources: name some in the config ([[source]]) or on the command line");
        }
        for s in &config.sources {
            source::make_classifier(s)?;
        }
        for a in &config.alerts {
            if !["negative", "neutral", "positive"].contains(&a.class.as_str()) {
                bail!(
                    "line {}: alert {:?}: class must be negative, neutral or positive, got {:?}",
                    a.line,
                    a.name,
                    a.class
                );
            }
        }
        if let Some(dir) = &config.jsonl {
            jsonl::Jsonl::prepare(dir)?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("valence-http")
            .enable_all()
            .build()
            .context("cannot start the HTTP runtime")?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(config.listen))
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let hub = Arc::new(Hub::new(&config.sources, config.alerts.clone()));
        let shutdown = Arc::new(tokio::sync::Notify::new());
        let (closing, closing_rx) = tokio::sync::watch::channel(false);
        let app = http::router(hub.clone(), closing_rx);
        let notified = shutdown.clone();
        let server = runtime.spawn(async move {
            let serve = axum::serve(listener, app)
                .with_graceful_shutdown(async move { notified.notified().await });
            if let Err(e) = serve.await {
                eprintln!("valence monitor: HTTP server stopped: {e}");
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut sources = Vec::new();
        for (i, s) in config.sources.iter().enumerate() {
            let (s, hub, stop) = (s.clone(), hub.clone(), stop.clone());
            let jsonl = config.jsonl.as_ref().map(|d| jsonl::Jsonl::new(d, &s.name));
            let handle = std::thread::Builder::new()
                .name(format!("source-{}", s.name))
                .spawn(move || source::supervise(i, s, hub, sup, jsonl, stop))
                .context("cannot start a source thread")?;
            sources.push(handle);
        }
        Ok(Monitor {
            addr,
            hub,
            stop,
            sources,
            runtime,
            server: Some(server),
            shutdown,
            closing,
        })
    }

    /// Stops every pipeline (each gets its end-of-stream, briefly), then the server.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.sources.drain(..) {
            let _ = h.join();
        }
        // notify_one keeps the permit if the server has not started waiting yet.
        self.shutdown.notify_one();
        let _ = self.closing.send(true);
        if let Some(server) = self.server.take() {
            let _ = self.runtime.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(2), server).await
            });
        }
    }

    /// Runs until SIGINT or SIGTERM, then stops cleanly.
    pub fn run_until_signal(self) -> Result<()> {
        let signalled = self.runtime.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            Ok::<_, std::io::Error>(())
        });
        eprintln!("valence monitor: stopping");
        self.stop();
        signalled.context("cannot wait for signals")
    }
}
