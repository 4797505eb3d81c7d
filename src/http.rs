//! The HTTP server every listener uses (the web role, and `/metrics` with the health endpoints):
//! our own accept loop around hyper, so that a listener that stops working is an error returned
//! to the supervisor rather than a loop that retries forever, and shutdown drains connections.

use std::convert::Infallible;
use std::net::SocketAddr;
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

/// Binds a listener and tells which address it got (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let bind = |source| ServeError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind)?;
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

/// Serves `filter` on `listener` until `shutdown`, then lets open connections finish (for a
/// few seconds at most). Returns an error only when the listener itself fails.
pub async fn serve<F, R>(
    listener: TcpListener,
    filter: F,
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
    let result = loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            accepted = listener.accept() => accepted,
        };
        let (stream, _peer) = match accepted {
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
        let service = hyper_util::service::TowerToHyperService::new(warp::service(filter.clone()));
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
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
