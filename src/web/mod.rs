//! The web role: the original REST API, all-time totals, day ranges, live updates, the
//! dashboard, and `/healthz` + `/readyz`, served by warp on `web.listen`.

pub mod api;
pub mod assets;
pub mod live;

use crate::config::Config;
use crate::metrics::WebMetrics;
use crate::store::Store;
use crate::ComponentContext;
use api::{Api, JsonReply};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;
use warp::http::StatusCode;
use warp::{Filter, Reply};

/// What stops the web role.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("cannot listen for the web API on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the web server until shutdown.
pub async fn run(ctx: ComponentContext, store: Store) -> Result<(), WebError> {
    let (addr, server) = serve(ctx, store).await?;
    tracing::info!(%addr, "web API and dashboard listening");
    let _ = server.await;
    Ok(())
}

/// Binds `web.listen` and returns the bound address and the running server.
pub async fn serve(
    ctx: ComponentContext,
    store: Store,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), WebError> {
    let addr = ctx.config.web.listen;
    let (listener, bound) = crate::health::bind(addr)
        .await
        .map_err(|source| WebError::Bind { addr, source })?;
    let (tx, rx) = watch::channel(String::new());
    tokio::spawn(live::publish(
        store.clone(),
        ctx.config.web.live_interval,
        tx,
        ctx.shutdown.clone(),
    ));
    let api = Arc::new(Api::new(
        store,
        ctx.metrics.web.clone(),
        ctx.config.web.cache_ttl,
    ));
    let routes = routes(
        api,
        rx,
        ctx.config.clone(),
        ctx.metrics.web.clone(),
        ctx.shutdown.clone(),
    );
    let shutdown = ctx.shutdown.clone();
    let server = warp::serve(routes)
        .incoming(listener)
        .graceful(async move { shutdown.cancelled().await })
        .run();
    Ok((bound, tokio::spawn(server)))
}

fn json(reply: JsonReply) -> warp::reply::Response {
    crate::health::json(reply.status, reply.body)
}

/// The path label of a request: fixed routes as they are, `/api/stats/{day}` folded, anything
/// else `other`, so that labels cannot grow without bound.
pub fn path_label(path: &str) -> &'static str {
    const FIXED: &[&str] = &[
        "/",
        "/app.js",
        "/style.css",
        "/index.html",
        "/api/days",
        "/api/stats",
        "/api/totals",
        "/api/range",
        "/api/live",
        "/healthz",
        "/readyz",
    ];
    if let Some(fixed) = FIXED.iter().find(|p| **p == path) {
        return fixed;
    }
    if path.starts_with("/api/stats/") {
        return "/api/stats/{day}";
    }
    "other"
}

fn routes(
    api: Arc<Api>,
    live: watch::Receiver<String>,
    config: Arc<Config>,
    metrics: WebMetrics,
    shutdown: tokio_util::sync::CancellationToken,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone + Send + Sync + 'static {
    let with_api = {
        let api = api.clone();
        warp::any().map(move || api.clone())
    };
    let days = warp::path!("api" / "days")
        .and(with_api.clone())
        .then(|api: Arc<Api>| async move { json(api.days().await) });
    let today = warp::path!("api" / "stats")
        .and(with_api.clone())
        .then(|api: Arc<Api>| async move { json(api.day(api::today()).await) });
    let stats = warp::path!("api" / "stats" / String)
        .and(with_api.clone())
        .then(|day: String, api: Arc<Api>| async move { json(api.stats(&day).await) });
    let totals = warp::path!("api" / "totals")
        .and(with_api.clone())
        .then(|api: Arc<Api>| async move { json(api.totals().await) });
    let range = warp::path!("api" / "range")
        .and(warp::query::<HashMap<String, String>>())
        .and(with_api.clone())
        .then(|q: HashMap<String, String>, api: Arc<Api>| async move {
            json(
                api.range(
                    q.get("from").map(String::as_str),
                    q.get("to").map(String::as_str),
                )
                .await,
            )
        });
    let live_route = {
        let metrics = metrics.clone();
        warp::path!("api" / "live")
            .map(move || live_stream(live.clone(), metrics.clone(), shutdown.clone()))
    };
    let healthz = warp::path!("healthz").map(crate::health::healthz);
    let readyz = warp::path!("readyz")
        .and(with_api.clone())
        .then(move |api: Arc<Api>| {
            let config = config.clone();
            async move {
                let (status, body) = crate::health::readiness(&config, Some(api.store())).await;
                json(JsonReply { status, body })
            }
        });
    let assets =
        warp::path::tail().map(|tail: warp::path::Tail| match assets::find(tail.as_str()) {
            Some((kind, body)) => {
                let mut response = warp::reply::Response::new(body.into());
                let headers = response.headers_mut();
                headers.insert(
                    warp::http::header::CONTENT_TYPE,
                    warp::http::HeaderValue::from_static(kind),
                );
                headers.insert(
                    warp::http::header::CACHE_CONTROL,
                    warp::http::HeaderValue::from_static("no-cache"),
                );
                response
            }
            None => json(JsonReply::error(StatusCode::NOT_FOUND, "no such page")),
        });
    let api_routes = days
        .or(today)
        .unify()
        .or(stats)
        .unify()
        .or(totals)
        .unify()
        .or(range)
        .unify()
        .or(live_route)
        .unify()
        .or(healthz)
        .unify()
        .or(readyz)
        .unify();
    warp::get()
        .and(api_routes.or(assets).unify())
        .recover(|rejection: warp::Rejection| async move {
            let (status, message) = if rejection.is_not_found() {
                (StatusCode::NOT_FOUND, "no such page")
            } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
                (StatusCode::METHOD_NOT_ALLOWED, "only GET is served here")
            } else {
                (StatusCode::BAD_REQUEST, "bad request")
            };
            Ok::<_, Infallible>(json(JsonReply::error(status, message)))
        })
        .unify()
        .with(warp::log::custom(move |info| {
            let path = path_label(info.path());
            metrics
                .responses
                .with_label_values(&[path, info.status().as_str()])
                .inc();
            metrics
                .duration
                .with_label_values(&[path])
                .observe(info.elapsed().as_secs_f64());
        }))
}

fn live_stream(
    rx: watch::Receiver<String>,
    metrics: WebMetrics,
    shutdown: tokio_util::sync::CancellationToken,
) -> warp::reply::Response {
    struct Client {
        metrics: WebMetrics,
    }
    impl Drop for Client {
        fn drop(&mut self) {
            self.metrics.live_clients.dec();
        }
    }
    metrics.live_clients.inc();
    let client = Client { metrics };
    let updates = tokio_stream_from_watch(rx)
        .take_until(async move { shutdown.cancelled().await })
        .map(move |message| {
            let _keep = &client;
            Ok::<_, Infallible>(warp::sse::Event::default().event("counters").data(message))
        });
    warp::sse::reply(warp::sse::keep_alive().stream(updates)).into_response()
}

/// Every value of the watch channel, starting with the current one; empty values (nothing read
/// yet) are skipped.
fn tokio_stream_from_watch(
    rx: watch::Receiver<String>,
) -> impl futures_util::Stream<Item = String> {
    futures_util::stream::unfold((rx, true), |(mut rx, first)| async move {
        loop {
            if !first || rx.borrow().is_empty() {
                rx.changed().await.ok()?;
            }
            let value = rx.borrow_and_update().clone();
            if !value.is_empty() {
                return Some((value, (rx, false)));
            }
        }
    })
}
