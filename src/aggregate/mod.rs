//! The aggregate role: read the bus, turn events into counter increments, and apply them to the
//! store in batches, each atomically with the bus position it covers.
//!
//! `batch` is what every worker shares: the batch policy, counting records into a batch (the one
//! path from the bus to the counter rules) and `apply_batch`. `file` and `kafka` differ only in
//! how they read the bus and move to the position the store records.

pub mod batch;
pub mod file;
pub mod kafka;
pub mod rebuild;
pub mod retention;

use crate::bus::BusError;
use crate::config::{AggregateConfig, BusSettings};
use crate::store::{Store, StoreError};
use crate::ComponentContext;

/// What stops an aggregator (its supervisor restarts it).
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<crate::bus::file::FileBusError> for AggregateError {
    fn from(e: crate::bus::file::FileBusError) -> Self {
        AggregateError::Bus(e.into())
    }
}

impl From<crate::bus::kafka::KafkaBusError> for AggregateError {
    fn from(e: crate::bus::kafka::KafkaBusError) -> Self {
        AggregateError::Bus(e.into())
    }
}

/// What an aggregator is configured with: its section and the bus it reads.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateSettings {
    pub aggregate: AggregateConfig,
    pub bus: BusSettings,
}

/// Builds and runs aggregator `index` on its bus: the supervised unit of the aggregate role.
pub async fn run(
    ctx: ComponentContext<AggregateSettings>,
    store: Store,
    index: usize,
) -> Result<(), AggregateError> {
    match ctx.config.bus.clone() {
        BusSettings::File(files) => {
            file::FileAggregator::new(ctx, files, store, index)
                .run()
                .await
        }
        BusSettings::Kafka(kafka) => {
            kafka::KafkaAggregator::start(ctx, &kafka, store, index)
                .await?
                .run()
                .await
        }
    }
}
