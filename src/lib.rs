//! Pleiades: the live edit stream of every Wikimedia wiki, turned into trustworthy statistics.
//!
//! The library does the work; `main.rs` only parses arguments. See ARCHITECTURE.md for the map.

pub mod aggregate;
pub mod bus;
pub mod config;
pub mod daemon;
pub mod event;
pub mod health;
pub mod ingest;
pub mod metrics;
pub mod replay;
pub mod store;
pub mod supervisor;
pub mod systemd;
pub mod web;

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

/// What every component receives: the configuration, the metrics and the shutdown signal.
#[derive(Clone)]
pub struct ComponentContext {
    pub config: Arc<config::Config>,
    pub metrics: Arc<metrics::Metrics>,
    pub shutdown: CancellationToken,
}
