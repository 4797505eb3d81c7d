//! The web role: the original REST API, all-time totals, day ranges, live updates, the
//! dashboard, and `/healthz` + `/readyz`, served on `web.listen`.
//!
//! The web role reads only the store (and the readiness checks it is given): it never imports
//! the ingest or aggregate roles. `live` runs as its own supervised component and hands its
//! updates over a watch channel.

pub mod api;
pub mod assets;
pub mod live;
pub mod relay;

use crate::config::WebConfig;
use crate::health::Readiness;
use crate::http::ServeError;
use crate::metrics::{Listener, Route, WebMetrics};
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

/// What the web role serves from: the store, the readiness checks of this host, and the live
/// updates published by [`live::run`].
#[derive(Clone)]
pub struct WebParts {
    pub store: Store,
    pub readiness: Readiness,
    pub live: watch::Receiver<String>,
    /// The relay's hub, when this host serves `/v2/stream/recentchange`.
    pub relay: Option<Arc<relay::Hub>>,
}

/// Runs the web server until shutdown. A listener that fails is returned to the supervisor as
/// an error, so that the server is started again.
pub async fn run(ctx: ComponentContext<WebConfig>, parts: WebParts) -> Result<(), ServeError> {
    let (addr, server) = serve(ctx, parts).await?;
    tracing::info!(%addr, "web API and dashboard listening");
    match server.await {
        Ok(result) => result,
        Err(join) => Err(ServeError::Accept {
            addr,
            source: std::io::Error::other(join.to_string()),
        }),
    }
}

/// Binds `web.listen` and returns the bound address and the running server.
pub async fn serve(
    ctx: ComponentContext<WebConfig>,
    parts: WebParts,
) -> Result<(SocketAddr, tokio::task::JoinHandle<Result<(), ServeError>>), ServeError> {
    let (listener, bound) = crate::http::bind(ctx.config.listen).await?;
    let routes = routes(&ctx, parts);
    let limits = crate::http::Limits::new(
        ctx.config.max_connections,
        ctx.config.header_timeout,
        ctx.metrics.http.listener(Listener::Web),
    );
    let server = tokio::spawn(crate::http::serve(
        listener,
        routes,
        limits,
        ctx.shutdown.clone(),
    ));
    Ok((bound, server))
}

fn json(reply: JsonReply) -> warp::reply::Response {
    crate::health::json(reply.status, reply.body)
}

/// Every route of the web role, with request metrics.
pub fn routes(
    ctx: &ComponentContext<WebConfig>,
    parts: WebParts,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone + Send + Sync + 'static {
    let metrics = ctx.metrics.web.clone();
    let api = Arc::new(Api::new(parts.store, metrics.clone(), ctx.config.cache_ttl));
    let with_api = warp::any().map(move || api.clone());
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
    let coverage = warp::path!("api" / "coverage")
        .and(warp::query::<HashMap<String, String>>())
        .and(with_api.clone())
        .then(|q: HashMap<String, String>, api: Arc<Api>| async move {
            json(
                api.coverage(
                    q.get("from").map(String::as_str),
                    q.get("to").map(String::as_str),
                )
                .await,
            )
        });
    let hours = warp::path!("api" / "hours" / String)
        .and(with_api.clone())
        .then(|day: String, api: Arc<Api>| async move { json(api.hours(&day).await) });
    let editors = warp::path!("api" / "editors" / String)
        .and(warp::query::<HashMap<String, String>>())
        .and(with_api.clone())
        .then(
            |day: String, q: HashMap<String, String>, api: Arc<Api>| async move {
                json(api.editors(&day, &sketch_query(&q)).await)
            },
        );
    let top = warp::path!("api" / "top" / String)
        .and(warp::query::<HashMap<String, String>>())
        .and(with_api.clone())
        .then(
            |day: String, q: HashMap<String, String>, api: Arc<Api>| async move {
                json(api.top(&day, &sketch_query(&q)).await)
            },
        );
    let live_route = {
        let metrics = metrics.clone();
        let shutdown = ctx.shutdown.clone();
        let live = parts.live;
        let max = ctx.config.live_max_clients;
        warp::path!("api" / "live")
            .map(move || live_stream(live.clone(), metrics.clone(), max, shutdown.clone()))
    };
    let relay_route = match parts.relay {
        Some(hub) => relay::route(hub, ctx.config.relay_heartbeat, ctx.shutdown.clone()).boxed(),
        None => warp::path!("v2" / "stream" / "recentchange")
            .map(|| {
                json(JsonReply::error(
                    StatusCode::NOT_FOUND,
                    "the relay is off on this host (web.relay_max_clients = 0)",
                ))
            })
            .boxed(),
    };
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
    // Each route is boxed: one small response type at every level of the chain keeps the
    // futures shallow (a chain of concrete types overflows the stack of a debug build).
    let api_routes = days
        .boxed()
        .or(today.boxed())
        .unify()
        .or(stats.boxed())
        .unify()
        .or(totals.boxed())
        .unify()
        .or(range.boxed())
        .unify()
        .or(coverage.boxed())
        .unify()
        .or(hours.boxed())
        .unify()
        .or(editors.boxed())
        .unify()
        .or(top.boxed())
        .unify()
        .or(live_route.boxed())
        .unify()
        .or(relay_route)
        .unify()
        .or(crate::health::routes(parts.readiness, crate::health::Detail::Public).boxed())
        .unify()
        .or(assets.boxed())
        .unify()
        .boxed();
    warp::get()
        .and(api_routes)
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
        .with(security_headers())
        .with(warp::log::custom(move |info| {
            metrics.responded(
                Route::of(info.path()),
                info.status().as_u16(),
                info.elapsed().as_secs_f64(),
            );
        }))
}

/// The parameters of the editor and top-list routes, as given.
fn sketch_query(q: &HashMap<String, String>) -> api::SketchQuery<'_> {
    api::SketchQuery {
        family: q.get("family").map(String::as_str),
        exclude: q.get("exclude").map(String::as_str),
        what: q.get("what").map(String::as_str),
        limit: q.get("limit").map(String::as_str),
    }
}

/// Headers on every answer of the web role: the dashboard loads only its own files and may not
/// be framed (clickjacking), and no answer is sniffed into another type.
fn security_headers() -> warp::filters::reply::WithHeaders {
    let mut headers = warp::http::HeaderMap::new();
    headers.insert(
        "content-security-policy",
        warp::http::HeaderValue::from_static(
            "default-src 'self'; connect-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        "x-content-type-options",
        warp::http::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "x-frame-options",
        warp::http::HeaderValue::from_static("DENY"),
    );
    headers.insert(
        "referrer-policy",
        warp::http::HeaderValue::from_static("no-referrer"),
    );
    warp::reply::with::headers(headers)
}

/// One `/api/live` stream, or 503 when `max` are open already: each holds a connection for as
/// long as the viewer stays, so their number is bounded on its own.
fn live_stream(
    rx: watch::Receiver<String>,
    metrics: WebMetrics,
    max: usize,
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
    // Counted first and checked after, so that concurrent requests cannot both take the last
    // place (at worst both are refused).
    metrics.live_clients.inc();
    if metrics.live_clients.get() > max as i64 {
        metrics.live_clients.dec();
        metrics.live_refused.inc();
        return json(JsonReply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many live viewers; try again later",
        ));
    }
    let client = Client { metrics };
    let updates = stream_from_watch(rx)
        .take_until(async move { shutdown.cancelled().await })
        .map(move |message| {
            let _keep = &client;
            Ok::<_, Infallible>(warp::sse::Event::default().event("counters").data(message))
        });
    warp::sse::reply(warp::sse::keep_alive().stream(updates)).into_response()
}

/// Every value of the watch channel, starting with the current one; empty values (nothing read
/// yet) are skipped.
fn stream_from_watch(rx: watch::Receiver<String>) -> impl futures_util::Stream<Item = String> {
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
