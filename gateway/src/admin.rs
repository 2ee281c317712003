//! Admin HTTP: health, readiness, Prometheus metrics, JSON debug views and the dashboard.
//!
//! The server knows nothing of the parts it shows: the composition root hands it one closure
//! per debug view, each reading the latest immutable snapshot when a request comes in. So a
//! scrape never blocks a data-plane or discovery task.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query as QueryParams, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Query parameters of a debug request (e.g. `?service=ns/name` to narrow a view).
pub type Query = BTreeMap<String, String>;

/// Produces the JSON of one debug view from the latest snapshots. An answer
/// `{"error": "...", "code": "not_found" | "bad_request"}` is sent with HTTP 404 / 400.
pub type DebugView = Arc<dyn Fn(&Query) -> serde_json::Value + Send + Sync>;

/// One part's rows of `/debug/problems`, read when a request comes in.
pub type ProblemRows = Box<dyn Fn() -> Vec<serde_json::Value> + Send + Sync>;

/// `/debug/problems`: every part's rows, in the order given (each part renders its own).
pub fn problems_view(parts: Vec<ProblemRows>) -> DebugView {
    Arc::new(move |_: &Query| {
        serde_json::Value::Array(parts.iter().flat_map(|rows| rows()).collect())
    })
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot bind admin HTTP on {0}: {1} (is another gateway using admin.listen?)")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("admin HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// What the admin server shows.
#[derive(Clone)]
pub struct AdminState {
    /// The readiness registry: `/readyz` is 200 when no part is pending (discovery synced,
    /// every listener bound).
    pub ready: crate::readiness::Ready,
    /// Renders `/metrics`; `None` when no recorder is installed (in-process tests).
    pub metrics: Option<PrometheusHandle>,
    /// Views under `/debug/<name>`, e.g. `exports`, `imports`, `endpoints`, `peers`.
    pub views: Arc<BTreeMap<&'static str, DebugView>>,
    /// Page served at `/`.
    pub dashboard: &'static str,
}

pub struct AdminServer {
    listener: TcpListener,
    state: AdminState,
}

impl AdminServer {
    /// Binds at once, so a port in use fails start-up with a clear error.
    pub async fn new(listen: SocketAddr, state: AdminState) -> Result<Self, AdminError> {
        let listener = TcpListener::bind(listen).await.map_err(|e| AdminError::Bind(listen, e))?;
        Ok(Self { listener, state })
    }

    pub fn address(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound TCP listener has a local address")
    }

    pub fn router(state: AdminState) -> Router {
        Router::new()
            .route("/", get(dashboard))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/debug", get(debug_index))
            .route("/debug/{view}", get(debug_view))
            .with_state(state)
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AdminError> {
        let app = Self::router(self.state);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(AdminError::Serve)
    }
}

async fn dashboard(State(state): State<AdminState>) -> Html<&'static str> {
    Html(state.dashboard)
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let pending = state.ready.pending();
    if pending.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let body = format!("not ready: waiting for {}\n", pending.join(", "));
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match &state.metrics {
        Some(handle) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render())
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "no metrics recorder installed\n").into_response(),
    }
}

async fn debug_index(State(state): State<AdminState>) -> axum::Json<Vec<String>> {
    axum::Json(state.views.keys().map(|k| format!("/debug/{k}")).collect())
}

async fn debug_view(
    State(state): State<AdminState>,
    Path(view): Path<String>,
    QueryParams(query): QueryParams<Query>,
) -> Response {
    match state.views.get(view.as_str()) {
        Some(f) => {
            let value = f(&query);
            // A view answers a bad query with `{"error": ..., "code": ...}`.
            let status = match value.get("code").and_then(|c| c.as_str()) {
                Some("not_found") if value.get("error").is_some() => StatusCode::NOT_FOUND,
                Some("bad_request") if value.get("error").is_some() => StatusCode::BAD_REQUEST,
                _ => StatusCode::OK,
            };
            (status, axum::Json(value)).into_response()
        }
        None => {
            (StatusCode::NOT_FOUND, format!("no debug view {view:?}; see /debug\n")).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_views_readiness_and_404s() {
        let ready = crate::readiness::Ready::new();
        let mut discovery = ready.register("discovery");
        let mut views: BTreeMap<&'static str, DebugView> = BTreeMap::new();
        views.insert(
            "imports",
            Arc::new(|q: &Query| serde_json::json!({"services": 3, "q": q.get("service")})),
        );
        views.insert(
            "explain",
            Arc::new(|q: &Query| match q.get("service") {
                Some(_) => serde_json::json!({"error": "no such service", "code": "not_found"}),
                None => serde_json::json!({"error": "service= is required", "code": "bad_request"}),
            }),
        );
        let state = AdminState {
            ready,
            metrics: None,
            views: Arc::new(views),
            dashboard: "<html>dash</html>",
        };
        let server = AdminServer::new("127.0.0.1:0".parse().unwrap(), state).await.unwrap();
        let addr = server.address();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));

        let get = |path: &str| {
            let url = format!("http://{addr}{path}");
            async move { http_get(&url).await }
        };
        assert_eq!(get("/healthz").await.0, 200);
        assert_eq!(get("/readyz").await.0, 503);
        assert!(get("/readyz").await.1.contains("waiting for discovery"));
        discovery.set_ready(true);
        assert_eq!(get("/readyz").await.0, 200);
        let (code, body) = get("/debug/imports").await;
        assert_eq!(code, 200);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["services"], 3);
        let (_, body) = get("/debug/imports?service=ns/a").await;
        assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["q"], "ns/a");
        assert_eq!(get("/debug/nope").await.0, 404);
        assert_eq!(get("/debug/explain?service=a/b").await.0, 404);
        let (code, body) = get("/debug/explain").await;
        assert_eq!(code, 400);
        assert!(body.contains("service= is required"), "{body}");
        assert_eq!(get("/metrics").await.0, 404);
        assert!(get("/").await.1.contains("dash"));
        shutdown.cancel();
        task.await.unwrap().unwrap();
    }

    /// A minimal HTTP/1.0 GET over a raw socket, so the test needs no HTTP client crate.
    async fn http_get(url: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
        s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        let code = buf[9..12].parse().unwrap();
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (code, body)
    }
}
