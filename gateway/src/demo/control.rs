//! The demo's control API (HTTP, on `<base-ip>:15080`): `GET /demo/state`, and
//! `POST /demo/fail` / `POST /demo/restore` with `{"target": "east"}` (a whole cluster: its
//! gateway is killed, or restarted) or `{"target": "east/east-1"}` (one backend: its
//! listeners are closed, or opened again). CORS lets the gateways' dashboards call it.
//! `fedgate demo fail|restore|state` are thin clients of it ([`Client`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::DemoError;
use super::backends::Backend;
use super::gateways::GatewayProc;
use super::layout::Layout;

/// Largest answer a client reads.
const MAX_BODY: usize = 1 << 20;
/// How long a failed gateway may drain before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(6);
/// How long a restored gateway may take to answer `/readyz` before `restore` answers anyway.
pub const RESTORE_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// What to fail or restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A whole cluster: its gateway process.
    Cluster(String),
    /// One backend of a cluster.
    Backend { cluster: String, backend: String },
}

impl Target {
    /// Parses `cluster` or `cluster/backend`.
    pub fn parse(s: &str) -> Result<Self, DemoError> {
        let bad = || DemoError::BadTarget(s.to_owned());
        let mut parts = s.trim().split('/');
        let cluster = parts.next().filter(|c| !c.is_empty()).ok_or_else(bad)?;
        match (parts.next(), parts.next()) {
            (None, _) => Ok(Self::Cluster(cluster.to_owned())),
            (Some(b), None) if !b.is_empty() => {
                Ok(Self::Backend { cluster: cluster.to_owned(), backend: b.to_owned() })
            }
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cluster(c) => f.write_str(c),
            Self::Backend { cluster, backend } => write!(f, "{cluster}/{backend}"),
        }
    }
}

/// `fail` or `restore`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// A cluster's gateway is stopped (SIGTERM: it drains and tells its peers), or with
    /// `crash` killed (SIGKILL: peers notice only when the connection times out); a backend's
    /// listeners close.
    Fail {
        crash: bool,
    },
    Restore,
}

/// Everything the demo runs, behind one lock (changes are rare and short).
pub struct Demo {
    pub layout: Layout,
    /// By cluster id.
    pub gateways: BTreeMap<String, GatewayProc>,
    /// By (cluster id, backend name).
    pub backends: BTreeMap<(String, String), Backend>,
    /// Readiness checks of restored gateways.
    pub http: Client,
}

impl Demo {
    /// The state as `GET /demo/state` shows it.
    pub fn state(&mut self) -> Value {
        let mut clusters = Vec::new();
        for c in &self.layout.clusters {
            let (up, pid) = match self.gateways.get_mut(c.id) {
                Some(g) => (g.is_running(), g.pid()),
                None => (false, None),
            };
            let backends: Vec<Value> = c
                .backends
                .iter()
                .map(|b| {
                    let up = self
                        .backends
                        .get(&(c.id.to_owned(), b.name.clone()))
                        .is_some_and(Backend::is_up);
                    json!({
                        "name": b.name,
                        "target": format!("{}/{}", c.id, b.name),
                        "address": b.ip,
                        "http": b.http(),
                        "tcp": b.tcp(),
                        "up": up,
                    })
                })
                .collect();
            clusters.push(json!({
                "id": c.id,
                "target": c.id,
                "region": c.region,
                "zone": c.zone,
                "up": up,
                "pid": pid,
                "admin": format!("http://{}/", c.admin()),
                "dns": c.dns(),
                "tunnel": c.tunnel(),
                "clusterSetIPRange": c.vip_range,
                "backends": backends,
            }));
        }
        json!({
            "clusterset": super::layout::CLUSTERSET,
            "control": format!("http://{}/", self.layout.control),
            "clusters": clusters,
        })
    }

    /// Fails or restores `target`; answers what it did.
    pub async fn apply(&mut self, action: Action, target: &Target) -> Result<String, DemoError> {
        match target {
            Target::Cluster(id) => {
                let g = self
                    .gateways
                    .get_mut(id)
                    .ok_or_else(|| DemoError::UnknownTarget(target.to_string()))?;
                match action {
                    Action::Fail { crash: true } => {
                        g.kill().await;
                        Ok(format!(
                            "{id}: gateway killed (SIGKILL); peers notice when the tunnel times out"
                        ))
                    }
                    Action::Fail { crash: false } => {
                        g.stop(STOP_GRACE).await;
                        Ok(format!("{id}: gateway stopped (drained, peers told)"))
                    }
                    Action::Restore => {
                        g.start()?;
                        Ok(format!("{id}: gateway restarted"))
                    }
                }
            }
            Target::Backend { cluster, backend } => {
                let b = self
                    .backends
                    .get_mut(&(cluster.clone(), backend.clone()))
                    .ok_or_else(|| DemoError::UnknownTarget(target.to_string()))?;
                match action {
                    Action::Fail { .. } => {
                        b.stop().await;
                        Ok(format!("{target}: backend stopped ({} and {} closed)", b.http, b.tcp))
                    }
                    Action::Restore => {
                        b.start().await?;
                        Ok(format!("{target}: backend serving again on {} and {}", b.http, b.tcp))
                    }
                }
            }
        }
    }
}

/// The control API server, bound.
pub struct ControlServer {
    listener: TcpListener,
    origins: Vec<HeaderValue>,
}

impl ControlServer {
    /// Binds `addr`; `origins` are the dashboards allowed to call it (CORS).
    pub async fn new(addr: SocketAddr, origins: Vec<String>) -> Result<Self, DemoError> {
        let listener = TcpListener::bind(addr).await.map_err(|e| DemoError::Bind(addr, e))?;
        let origins = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
        Ok(Self { listener, origins })
    }

    pub fn address(&self) -> Result<SocketAddr, DemoError> {
        self.listener.local_addr().map_err(|e| DemoError::Io("<control listener>".into(), e))
    }

    /// Serves until `shutdown`.
    pub async fn run(self, demo: Arc<Mutex<Demo>>, shutdown: CancellationToken) {
        let cors = CorsLayer::new()
            .allow_origin(AllowOrigin::list(self.origins))
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::CONTENT_TYPE]);
        let app = Router::new()
            .route("/demo/state", get(state))
            .route("/demo/fail", post(fail))
            .route("/demo/restore", post(restore))
            .layer(cors)
            .with_state(demo);
        let serve = axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "demo control API failed");
        }
    }
}

/// Body of `POST /demo/fail` and `/demo/restore`.
#[derive(Debug, Deserialize, Serialize)]
pub struct TargetBody {
    pub target: String,
    /// `fail` of a cluster: SIGKILL instead of a graceful stop.
    #[serde(default)]
    pub crash: bool,
}

async fn state(State(demo): State<Arc<Mutex<Demo>>>) -> Json<Value> {
    Json(demo.lock().await.state())
}

async fn fail(demo: State<Arc<Mutex<Demo>>>, body: Json<TargetBody>) -> Response {
    let crash = body.crash;
    act(demo, Action::Fail { crash }, body).await
}

async fn restore(demo: State<Arc<Mutex<Demo>>>, body: Json<TargetBody>) -> Response {
    act(demo, Action::Restore, body).await
}

async fn act(
    State(demo): State<Arc<Mutex<Demo>>>,
    action: Action,
    Json(body): Json<TargetBody>,
) -> Response {
    let target = match Target::parse(&body.target) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let mut guard = demo.lock().await;
    match guard.apply(action, &target).await {
        Ok(mut message) => {
            // A restarted gateway: answer once it is ready, without holding the lock meanwhile.
            if let (Action::Restore, Target::Cluster(id)) = (action, &target) {
                let admin = guard.layout.cluster(id).map(|c| c.admin());
                let http = guard.http.clone();
                drop(guard);
                if let Some(admin) = admin {
                    match http.wait_ready(admin, RESTORE_READY_TIMEOUT).await {
                        Ok(()) => message.push_str(" and ready"),
                        Err(e) => message.push_str(&format!(", not ready yet: {e}")),
                    }
                }
                guard = demo.lock().await;
            }
            tracing::info!(?action, %target, "{message}");
            let mut state = guard.state();
            state["message"] = Value::String(message);
            Json(state).into_response()
        }
        Err(e @ DemoError::UnknownTarget(_)) => error(StatusCode::NOT_FOUND, &e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

fn error(code: StatusCode, e: &DemoError) -> Response {
    (code, Json(json!({ "error": e.to_string() }))).into_response()
}

/// A small HTTP client for the gateways' admin endpoints and the control API.
#[derive(Clone)]
pub struct Client {
    inner: HyperClient<HttpConnector, Body>,
    timeout: Duration,
}

impl Default for Client {
    fn default() -> Self {
        Self::new(Duration::from_secs(3))
    }
}

impl Client {
    pub fn new(timeout: Duration) -> Self {
        Self { inner: HyperClient::builder(TokioExecutor::new()).build_http(), timeout }
    }

    /// One request; answers (status, body).
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, String), DemoError> {
        let err = |reason: String| DemoError::Http { url: url.to_owned(), reason };
        let mut req = Request::builder().method(method).uri(url);
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let req = req.body(body).map_err(|e| err(e.to_string()))?;
        let exchange = async {
            let resp = self.inner.request(req).await.map_err(|e| err(error_chain(&e)))?;
            let status = resp.status();
            let bytes = axum::body::to_bytes(Body::new(resp.into_body()), MAX_BODY)
                .await
                .map_err(|e| err(e.to_string()))?;
            Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| err(format!("no answer within {:?}", self.timeout)))?
    }

    /// GET a JSON document (any status but 200 is an error).
    pub async fn get_json(&self, url: &str) -> Result<Value, DemoError> {
        let (status, body) = self.request(Method::GET, url, None).await?;
        if status != StatusCode::OK {
            return Err(DemoError::Http {
                url: url.to_owned(),
                reason: format!("HTTP {status}: {body}"),
            });
        }
        serde_json::from_str(&body).map_err(|e| DemoError::Http {
            url: url.to_owned(),
            reason: format!("not JSON ({e}): {body}"),
        })
    }

    /// Waits until `admin`'s `/readyz` answers 200.
    pub async fn wait_ready(&self, admin: SocketAddr, timeout: Duration) -> Result<(), DemoError> {
        let url = format!("http://{admin}/readyz");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let last = match self.request(Method::GET, &url, None).await {
                Ok((StatusCode::OK, _)) => return Ok(()),
                Ok((status, body)) => format!("HTTP {status}: {}", body.trim()),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(DemoError::Timeout {
                    what: format!("{url} (last: {last})"),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// An error with its sources, `a: b: c` (hyper's top-level messages alone say little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_or_are_refused() {
        let ok: &[(&str, Target)] = &[
            ("east", Target::Cluster("east".into())),
            (" west ", Target::Cluster("west".into())),
            ("east/east-1", Target::Backend { cluster: "east".into(), backend: "east-1".into() }),
        ];
        for (s, want) in ok {
            assert_eq!(&Target::parse(s).expect(s), want, "{s}");
        }
        for bad in ["", "/", "east/", "/east-1", "a/b/c"] {
            let err = Target::parse(bad).expect_err(bad);
            assert!(matches!(err, DemoError::BadTarget(_)), "{bad}: {err}");
        }
        assert_eq!(Target::parse("north/db-0").expect("parses").to_string(), "north/db-0");
    }
}
