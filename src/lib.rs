//! Pleiades: the live edit stream of every Wikimedia wiki, turned into trustworthy statistics.
//!
//! The library does the work; `main.rs` only parses arguments. See ARCHITECTURE.md for the map.

pub mod aggregate;
pub mod bus;
pub mod config;
pub mod daemon;
pub mod event;
pub mod ingest;
pub mod metrics;
pub mod replay;
pub mod store;
pub mod supervisor;
pub mod web;

use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What every component receives: the configuration, the metrics and the shutdown signal.
#[derive(Clone)]
pub struct ComponentContext {
    pub config: Arc<config::Config>,
    pub metrics: Arc<metrics::Metrics>,
    pub shutdown: CancellationToken,
}
