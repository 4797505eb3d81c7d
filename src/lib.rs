//! Pleiades: the live edit stream of every Wikimedia wiki, turned into trustworthy statistics.
//!
//! The library does the work; `main.rs` only parses arguments. See ARCHITECTURE.md for the map.

// The domain layer: pure, no I/O (the event, its schemas, the counter rules).
pub mod counters;
pub mod coverage;
pub mod event;
pub mod project;
pub mod schema;
pub mod sketch;
// The base layer: configuration, metrics, the display of progress, work split over cores.
pub mod config;
pub mod metrics;
pub mod parts;
pub mod progress;
// Infrastructure: the bus, the store, the HTTP server.
pub mod bus;
pub mod http;
pub mod store;
// The roles, and the health checks they answer.
pub mod aggregate;
pub mod health;
pub mod ingest;
pub mod intake;
pub mod web;
// The process: supervision, systemd, the daemon; and the tools that capture and replay the
// stream.
pub mod capture;
pub mod daemon;
pub mod record;
pub mod replay;
pub mod supervisor;
pub mod systemd;

use std::sync::Arc;

/// Build information, as `--version` and `pleiades_build_info` report it.
pub mod build {
    pub const VERSION: &str = env!("CARGO_PKG_VERSION");
    pub const COMMIT: &str = env!("BUILD_GIT_COMMIT");
    pub const RUSTC: &str = env!("BUILD_RUSTC_VERSION");
    pub const TARGET: &str = env!("BUILD_TARGET");
    /// `0.1.0 (commit abc123, rustc 1.95.0 (…), x86_64-unknown-linux-gnu)`.
    pub const LONG_VERSION: &str = concat!(
        env!("CARGO_PKG_VERSION"),
        " (commit ",
        env!("BUILD_GIT_COMMIT"),
        ", ",
        env!("BUILD_RUSTC_VERSION"),
        ", ",
        env!("BUILD_TARGET"),
        ")"
    );
}
use tokio_util::sync::CancellationToken;

/// What every component receives: its own configuration section (never the whole file), the
/// metrics and the shutdown signal.
#[derive(Clone)]
pub struct ComponentContext<C> {
    pub config: C,
    pub metrics: Arc<metrics::Metrics>,
    pub shutdown: CancellationToken,
}

impl<C> ComponentContext<C> {
    /// The same metrics and shutdown signal with another component's configuration.
    pub fn with<D>(&self, config: D) -> ComponentContext<D> {
        ComponentContext {
            config,
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}
