//! Health: `/healthz` (the process answers) and `/readyz` (this host's roles reach their store and
//! bus), served with `/metrics` on `metrics.listen` on every host, and by the web role.
//!
//! The web listener may face the public, so its `/readyz` names the failing checks only; why
//! they fail (addresses, paths, broker names) goes to the log, to
//! `pleiades_ready_check_failures_total` and to the `/readyz` of `metrics.listen`, which is the
//! operator's.

use crate::bus::kafka::Probe;
use crate::bus::Trouble;
use crate::http::ServeError;
use crate::metrics::{Listener, Metrics, ReadyCheck};
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
    /// Where failed checks are counted; none in tests that do not look.
    pub failures: Option<crate::metrics::LabelledCounter<ReadyCheck>>,
    /// The checks failing at the last look, so that a change is logged once, not every probe.
    pub failing: Arc<std::sync::Mutex<std::collections::HashSet<&'static str>>>,
    /// Set while the bus refuses the ingester's writes (ingest is paused).
    pub bus_writes: Option<Trouble>,
    /// Set while uncounted segments keep the event files past their limits.
    pub retention: Option<Trouble>,
}

/// How much a `/readyz` answer tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Check names and outcomes only (the public web listener).
    Public,
    /// With each failure's reason (the operator's metrics listener).
    Operator,
}

impl Readiness {
    /// Runs every check: 200 with `{"ready": true, "checks": […]}` when all pass, else 503;
    /// with `Detail::Operator`, each failing check carries its error.
    pub async fn check(&self, detail: Detail) -> (StatusCode, Bytes) {
        let mut checks = Vec::new();
        if let Some(store) = &self.store {
            let result = store.ping().await;
            checks.push((ReadyCheck::Store, result.err().map(|e| e.to_string())));
        }
        if let Some(dir) = &self.event_files {
            let ok = dir.is_dir();
            checks.push((
                ReadyCheck::EventFiles,
                (!ok).then(|| format!("{} is not a directory", dir.display())),
            ));
        }
        if let Some(probe) = &self.kafka {
            let result = probe.check().await;
            checks.push((ReadyCheck::Kafka, result.err().map(|e| e.to_string())));
        }
        if let Some(trouble) = &self.bus_writes {
            checks.push((ReadyCheck::BusWrites, trouble.reason()));
        }
        if let Some(trouble) = &self.retention {
            checks.push((ReadyCheck::Retention, trouble.reason()));
        }
        for (check, error) in &checks {
            self.record(*check, error.as_deref());
        }
        let ready = checks.iter().all(|(_, error)| error.is_none());
        let body = serde_json::json!({
            "ready": ready,
            "checks": checks
                .iter()
                .map(|(check, error)| match detail {
                    Detail::Operator => serde_json::json!({ "name": check.as_str(), "ok": error.is_none(), "error": error }),
                    Detail::Public => serde_json::json!({ "name": check.as_str(), "ok": error.is_none() }),
                })
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

impl Readiness {
    /// Counts a failed check, and logs when a check starts or stops failing.
    fn record(&self, check: ReadyCheck, error: Option<&str>) {
        if error.is_some() {
            if let Some(failures) = &self.failures {
                failures.inc(check);
            }
        }
        let Ok(mut failing) = self.failing.lock() else {
            return;
        };
        match error {
            Some(error) if failing.insert(check.as_str()) => {
                tracing::warn!(check = check.as_str(), error, "readiness check failing");
            }
            None if failing.remove(check.as_str()) => {
                tracing::info!(check = check.as_str(), "readiness check passing again");
            }
            _ => {}
        }
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

/// The `/healthz` and `/readyz` routes, telling as much as `detail` allows.
pub fn routes(
    readiness: Readiness,
    detail: Detail,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection>
       + Clone
       + Send
       + Sync
       + 'static {
    let healthz = warp::path!("healthz").map(healthz);
    let readyz = warp::path!("readyz").then(move || {
        let readiness = readiness.clone();
        async move {
            let (status, body) = readiness.check(detail).await;
            json(status, body)
        }
    });
    healthz.or(readyz).unify()
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`, within the
/// `[metrics]` section's connection limits.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    config: crate::config::MetricsConfig,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let limits = crate::http::Limits::new(
        config.max_connections,
        config.header_timeout,
        metrics.http.listener(Listener::Metrics),
    );
    let scrape = warp::path!("metrics").map(move || {
        warp::reply::with_header(
            metrics.render(),
            "content-type",
            "text/plain; version=0.0.4; charset=utf-8",
        )
        .into_response()
    });
    let routes = warp::get()
        .and(scrape.or(routes(readiness, Detail::Operator)).unify())
        .recover(|_: warp::Rejection| async {
            Ok::<_, Infallible>(json(
                StatusCode::NOT_FOUND,
                Bytes::from_static(b"{\"error\":\"no such page\"}"),
            ))
        })
        .unify()
        .with(warp::reply::with::header(
            "x-content-type-options",
            "nosniff",
        ));
    crate::http::serve(listener, routes, limits, shutdown).await
}
