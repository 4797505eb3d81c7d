//! Health: `/healthz` (the process answers) and `/readyz` (this host's roles reach their store and
//! bus), served with `/metrics` on `metrics.listen` on every host, and by the web role.

use crate::config::{BusKind, Config};
use crate::metrics::{Metrics, MetricsError};
use crate::store::Store;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::Filter;

/// Ready when every enabled role can reach what it needs: the store (when this host uses one),
/// the event-file directory (for ingest and aggregate on the file bus) and the Kafka topic (on
/// the Kafka bus).
pub async fn readiness(config: &Config, store: Option<&Store>) -> (StatusCode, Bytes) {
    let mut checks = Vec::new();
    if let Some(store) = store {
        let result = store.ping().await;
        checks.push(("store", result.as_ref().err().map(ToString::to_string)));
    }
    let uses_files = (config.ingest.enabled && config.ingest.publisher == BusKind::File)
        || (config.aggregate.enabled
            && config.aggregate.source_or(config.ingest.publisher) == BusKind::File);
    if uses_files {
        let ok = config.file.dir.is_dir();
        checks.push((
            "event_files",
            (!ok).then(|| format!("{} is not a directory", config.file.dir.display())),
        ));
    }
    if config.uses_kafka() {
        let result = crate::bus::kafka::probe(&config.kafka).await;
        checks.push(("kafka", result.err().map(|e| e.to_string())));
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

/// Binds a listener and tells which address it got (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown`; returns at once with
/// the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    config: Arc<Config>,
    store: Option<Store>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
    let (listener, bound) = bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let scrape = warp::path!("metrics").map(move || {
        warp::reply::with_header(
            metrics.render(),
            "content-type",
            "text/plain; version=0.0.4; charset=utf-8",
        )
    });
    let healthz = warp::path!("healthz").map(healthz);
    let readyz = warp::path!("readyz").then(move || {
        let config = config.clone();
        let store = store.clone();
        async move {
            let (status, body) = readiness(&config, store.as_ref()).await;
            json(status, body)
        }
    });
    let routes = warp::get().and(
        scrape
            .map(warp::Reply::into_response)
            .or(healthz)
            .unify()
            .or(readyz)
            .unify(),
    );
    let server = warp::serve(routes)
        .incoming(listener)
        .graceful(async move { shutdown.cancelled().await })
        .run();
    Ok((bound, tokio::spawn(server)))
}
