//! The monitor's HTTP side (axum): `/metrics` (Prometheus), `/api/streams`,
//! `/api/streams/NAME` (status and the last minutes of windows), Server-Sent Events per stream
//! (`/api/streams/NAME/events`) and for all (`/api/events`), and the live page at `/`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;

use crate::hub::Hub;

const PAGE: &str = include_str!("page/index.html");

/// The router; event streams end when `closing` turns true, so that a graceful shutdown does not
/// wait on clients that never hang up.
pub fn router(hub: Arc<Hub>, closing: tokio::sync::watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/api/streams", get(streams))
        .route("/api/streams/{name}", get(stream))
        .route("/api/streams/{name}/events", get(stream_events))
        .route("/api/events", get(all_events))
        .fallback(not_found)
        .with_state(AppState { hub, closing })
}

#[derive(Clone)]
struct AppState {
    hub: Arc<Hub>,
    closing: tokio::sync::watch::Receiver<bool>,
}

impl axum::extract::FromRef<AppState> for Arc<Hub> {
    fn from_ref(s: &AppState) -> Arc<Hub> {
        s.hub.clone()
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        hub.metrics_text(),
    )
        .into_response()
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such resource".into())
}

async fn streams(State(hub): State<Arc<Hub>>) -> Response {
    Json(hub.streams()).into_response()
}

fn unknown(name: &str) -> Response {
    error(StatusCode::NOT_FOUND, format!("no stream named {name:?}"))
}

async fn stream(State(hub): State<Arc<Hub>>, Path(name): Path<String>) -> Response {
    match hub.index(&name) {
        Some(i) => {
            let (status, history) = hub.stream(i);
            Json(serde_json::json!({ "status": status, "history": history })).into_response()
        }
        None => unknown(&name),
    }
}

fn events(
    hub: &Hub,
    mut closing: tokio::sync::watch::Receiver<bool>,
    only: Option<String>,
) -> Response {
    let closed = async move {
        let _ = closing.wait_for(|c| *c).await;
    };
    let stream = BroadcastStream::new(hub.subscribe()).filter_map(move |e| {
        // A client that fell behind misses what it missed and goes on.
        let e = e.ok()?;
        if only.as_deref().is_some_and(|n| n != e.stream()) {
            return None;
        }
        let data = serde_json::to_string(&e).ok()?;
        Some(Ok::<_, Infallible>(
            SseEvent::default().event(e.kind()).data(data),
        ))
    });
    let stream = futures_util::StreamExt::take_until(stream, closed);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

async fn stream_events(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    match app.hub.index(&name) {
        Some(_) => events(&app.hub, app.closing, Some(name)),
        None => unknown(&name),
    }
}

async fn all_events(State(app): State<AppState>) -> Response {
    events(&app.hub, app.closing, None)
}
