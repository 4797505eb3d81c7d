//! Health: `/healthz` (the process answers) and `/readyz` (this host's roles reach their store and
//! bus), served with `/metrics` on `metrics.listen` on every host, and by the web role.

use crate::bus::kafka::Probe;
use crate::bus::Trouble;
use crate::http::ServeError;
use crate::metrics::Metrics;
use crate::store::Store;
use bytes::Bytes;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::{Filter, Reply as _};

/// What this host's roles need, checked on every `/readyz`: the store (when a role uses one),
/// the event-file directory (ingest or aggregate on the file bus) and the Kafka topic (on the
/// Kafka bus). Built once by the daemon; cheap to clone.
#[derive(Clone, Default)]
pub struct Readiness {
    pub store: Option<Store>,
    pub event_files: Option<PathBuf>,
    pub kafka: Option<Probe>,
    /// Set while the bus refuses the ingester's writes (ingest is paused).
    pub bus_writes: Option<Trouble>,
    /// Set while uncounted segments keep the event files past their limits.
    pub retention: Option<Trouble>,
}

impl Readiness {
    /// Runs every check: 200 with `{"ready": true, "checks": […]}` when all pass, else 503 with
    /// the failing check's error.
    pub async fn check(&self) -> (StatusCode, Bytes) {
        let mut checks = Vec::new();
        if let Some(store) = &self.store {
            let result = store.ping().await;
            checks.push(("store", result.err().map(|e| e.to_string())));
        }
        if let Some(dir) = &self.event_files {
            let ok = dir.is_dir();
            checks.push((
                "event_files",
                (!ok).then(|| format!("{} is not a directory", dir.display())),
            ));
        }
        if let Some(probe) = &self.kafka {
            let result = probe.check().await;
            checks.push(("kafka", result.err().map(|e| e.to_string())));
        }
        if let Some(trouble) = &self.bus_writes {
            checks.push(("bus_writes", trouble.reason()));
        }
        if let Some(trouble) = &self.retention {
            checks.push(("retention", trouble.reason()));
        }
        let ready = checks.iter().all(|(_, error)| error.is_none());
        let body = serde_json::json!({
            "ready": ready,
            "checks": checks
                .iter()
                .map(|(name, error)| serde_json::json!({ "name": name, "ok": error.is_none(), "error": error }))
                .collect::<Vec<_>>(),
        });
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, Bytes::from(body.to_string()))
    }
}

/// `/healthz`: the process answers.
pub fn healthz() -> warp::reply::Response {
    json(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}"))
}

/// A JSON response with `status`.
pub fn json(status: StatusCode, body: Bytes) -> warp::reply::Response {
    let mut response = warp::reply::Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("application/json"),
    );
    response
}

/// The `/healthz` and `/readyz` routes.
pub fn routes(
    readiness: Readiness,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection>
       + Clone
       + Send
       + Sync
       + 'static {
    let healthz = warp::path!("healthz").map(healthz);
    let readyz = warp::path!("readyz").then(move || {
        let readiness = readiness.clone();
        async move {
            let (status, body) = readiness.check().await;
            json(status, body)
        }
    });
    healthz.or(readyz).unify()
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let scrape = warp::path!("metrics").map(move || {
        warp::reply::with_header(
            metrics.render(),
            "content-type",
            "text/plain; version=0.0.4; charset=utf-8",
        )
        .into_response()
    });
    let routes = warp::get()
        .and(scrape.or(routes(readiness)).unify())
        .recover(|_: warp::Rejection| async {
            Ok::<_, Infallible>(json(
                StatusCode::NOT_FOUND,
                Bytes::from_static(b"{\"error\":\"no such page\"}"),
            ))
        })
        .unify();
    crate::http::serve(listener, routes, shutdown).await
}
