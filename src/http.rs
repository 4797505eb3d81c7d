//! The HTTP server every listener uses (the web role, and `/metrics` with the health endpoints):
//! our own accept loop around hyper, so that a listener that stops working is an error returned
//! to the supervisor rather than a loop that retries forever, shutdown drains connections, and
//! every listener has a header timeout and a connection limit.
//!
//! At the limit the oldest connection with no request in progress is closed to make room: idle
//! connections, however many a peer opens, cannot lock out a client that sends a request, and
//! the file descriptors every role shares (bus, store, upstream) stay bounded.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::Filter;

/// How long open connections get to finish after shutdown begins.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// How long to wait before accepting again after a resource error (too many open files).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Why a server stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the listener on {addr} failed: {source}")]
    Accept {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What one listener allows, and where it counts what it does.
#[derive(Clone)]
pub struct Limits {
    /// Connections held open at most.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, from connecting or from its previous
    /// answer; hyper closes the connection after it.
    pub header_timeout: Duration,
    /// Connections open now.
    pub open: prometheus::IntGauge,
    /// Connections closed to make room at the limit.
    pub shed: prometheus::IntCounter,
    /// Connections closed by the header timeout.
    pub header_timeouts: prometheus::IntCounter,
}

impl Limits {
    /// The limits of one listener, counted into that listener's series.
    pub fn new(
        max_connections: usize,
        header_timeout: Duration,
        counted: crate::metrics::ListenerMetrics,
    ) -> Self {
        Limits {
            max_connections,
            header_timeout,
            open: counted.open,
            shed: counted.shed,
            header_timeouts: counted.header_timeouts,
        }
    }
}

/// Connections the kernel queues for `accept` (capped by `net.core.somaxconn`): a burst of
/// connections waits there instead of having its SYNs dropped and retried a second later.
const BACKLOG: u32 = 4096;

/// Binds a listener and tells which address it got (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let bind = |source| ServeError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(bind)?;
    socket.set_reuseaddr(true).map_err(bind)?;
    socket.bind(addr).map_err(bind)?;
    let listener = socket.listen(BACKLOG).map_err(bind)?;
    let bound = listener.local_addr().map_err(bind)?;
    Ok((listener, bound))
}

/// Accept errors that concern one connection or a passing shortage, after which the listener
/// still works; any other error means the listener itself is broken.
fn is_transient(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionAborted
            | ErrorKind::ConnectionReset
            | ErrorKind::Interrupted
            | ErrorKind::WouldBlock
            | ErrorKind::OutOfMemory
    ) || matches!(
        error.raw_os_error(),
        // EMFILE, ENFILE, ENOBUFS, ENOMEM, EPROTO, EPERM (a firewall refused one connection)
        Some(24 | 23 | 105 | 12 | 71 | 1)
    )
}

/// One open connection: how many of its requests are being answered, and how to close it.
struct Tracked {
    in_flight: Arc<AtomicUsize>,
    close: CancellationToken,
}

/// The open connections of one listener, oldest first (ids only grow).
#[derive(Default)]
struct Open {
    next: u64,
    connections: BTreeMap<u64, Tracked>,
}

impl Open {
    /// Makes room for one more connection under `limit`: closes the oldest connection with no
    /// request in progress. False when every open connection is busy.
    fn make_room(&mut self, limit: usize) -> bool {
        if self.connections.len() < limit {
            return true;
        }
        let idle = self
            .connections
            .iter()
            .find(|(_, c)| c.in_flight.load(Ordering::Acquire) == 0)
            .map(|(id, _)| *id);
        match idle.and_then(|id| self.connections.remove(&id)) {
            Some(oldest) => {
                oldest.close.cancel();
                true
            }
            None => false,
        }
    }
}

/// Serves `filter` on `listener` within `limits` until `shutdown`, then lets open connections
/// finish (for a few seconds at most). Returns an error only when the listener itself fails.
pub async fn serve<F, R>(
    listener: TcpListener,
    filter: F,
    limits: Limits,
    shutdown: CancellationToken,
) -> Result<(), ServeError>
where
    F: Filter<Extract = (R,), Error = Infallible> + Clone + Send + Sync + 'static,
    R: warp::Reply,
{
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(Mutex::new(Open::default()));
    // One permit per open socket, given back only once the socket is closed: a connection
    // closed to make room must be gone before the next one is served, so the descriptors in
    // use never exceed the limit, however fast connections arrive.
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let result = loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) if is_transient(&e) => {
                tracing::warn!(%addr, error = %e, "accepting a connection failed; going on");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
            Err(source) => break Err(ServeError::Accept { addr, source }),
        };
        // Streams (the relay, live updates) write small pieces that must leave at once rather
        // than wait for the peer's acknowledgement of the previous ones.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot disable Nagle's algorithm on a connection");
        }
        let in_flight = Arc::new(AtomicUsize::new(0));
        let close = CancellationToken::new();
        let made_room = open
            .lock()
            .map(|mut open| open.make_room(limits.max_connections))
            .unwrap_or(false);
        if !made_room {
            // Every connection is answering a request: this one waits for nothing.
            limits.shed.inc();
            tracing::debug!(%addr, %peer, "connection limit reached with every connection busy; closed the new one");
            continue;
        }
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break Ok(()),
            },
        };
        let id = {
            let Ok(mut open) = open.lock() else {
                break Ok(());
            };
            let id = open.next;
            open.next += 1;
            open.connections.insert(
                id,
                Tracked {
                    in_flight: in_flight.clone(),
                    close: close.clone(),
                },
            );
            id
        };
        let service = InFlight {
            inner: hyper_util::service::TowerToHyperService::new(warp::service(filter.clone())),
            in_flight,
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        limits.open.inc();
        let (open, limits) = (open.clone(), limits.clone());
        tokio::spawn(async move {
            tokio::select! {
                ended = connection => if let Err(error) = ended {
                    if error.is_timeout() {
                        limits.header_timeouts.inc();
                    }
                    tracing::debug!(%error, "HTTP connection ended with an error");
                },
                // Dropping the connection closes its socket.
                _ = close.cancelled() => limits.shed.inc(),
            }
            if let Ok(mut open) = open.lock() {
                open.connections.remove(&id);
            }
            limits.open.dec();
            drop(permit);
        });
    };
    drop(listener);
    if tokio::time::timeout(DRAIN_LIMIT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!(%addr, "connections still open after the drain limit");
    }
    result
}

/// A service that counts its requests in progress: from the request's headers until the last
/// byte of its answer left (a live stream is in progress as long as it streams), so that only
/// connections waiting for a request are ever closed to make room.
struct InFlight<S> {
    inner: S,
    in_flight: Arc<AtomicUsize>,
}

/// Decrements the count when the answer's body is done with (sent, or its connection gone).
struct Guard(Arc<AtomicUsize>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body, holding its request's place in the count.
pub struct Counted<B> {
    body: B,
    _guard: Guard,
}

impl<B: http_body::Body + Unpin> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl<S, Req, B> hyper::service::Service<Req> for InFlight<S>
where
    S: hyper::service::Service<Req, Response = warp::http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = warp::http::Response<Counted<B>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, request: Req) -> Self::Future {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = Guard(self.in_flight.clone());
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| Counted {
                body,
                _guard: guard,
            }))
        })
    }
}
