//! The readiness check of Kafka roles: one client, made on first use and kept, asks the
//! brokers for the topic's metadata.

use super::{client_config, client_err, ClientLog, KafkaBusError};
use crate::config::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long one readiness probe may wait for the brokers.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Checks that the brokers answer and the topic exists; cheap to clone.
#[derive(Clone)]
pub struct Probe {
    config: Arc<KafkaConfig>,
    client: Arc<Mutex<Option<Arc<BaseConsumer<ClientLog>>>>>,
}

impl Probe {
    pub fn new(config: &KafkaConfig) -> Self {
        Probe {
            config: Arc::new(config.clone()),
            client: Arc::default(),
        }
    }

    /// The shared client, created the first time it is needed (and again after a failure to
    /// create it).
    fn client(&self) -> Result<Arc<BaseConsumer<ClientLog>>, KafkaBusError> {
        let mut slot = self.client.lock().map_err(|_| KafkaBusError::Broker {
            brokers: self.config.brokers.clone(),
            message: "the probe client lock is poisoned".into(),
        })?;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let client: Arc<BaseConsumer<ClientLog>> = Arc::new(
            client_config(&self.config)
                .create_with_context(ClientLog::new(&self.config.brokers))
                .map_err(client_err(&self.config.brokers, "create a client"))?,
        );
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Asks the brokers for the topic's metadata.
    pub async fn check(&self) -> Result<(), KafkaBusError> {
        let client = self.client()?;
        let config = self.config.clone();
        let result = tokio::task::spawn_blocking(move || {
            let metadata = client
                .fetch_metadata(Some(&config.topic), PROBE_TIMEOUT)
                .map_err(client_err(&config.brokers, "fetch topic metadata"))?;
            match metadata.topics().iter().find(|t| t.name() == config.topic) {
                Some(t) if t.error().is_none() => Ok(()),
                Some(t) => Err(KafkaBusError::Broker {
                    brokers: config.brokers.clone(),
                    message: format!("topic {}: {:?}", config.topic, t.error()),
                }),
                None => Err(KafkaBusError::Broker {
                    brokers: config.brokers.clone(),
                    message: format!("topic {} is missing", config.topic),
                }),
            }
        })
        .await;
        result.unwrap_or_else(|e| {
            Err(KafkaBusError::Broker {
                brokers: self.config.brokers.clone(),
                message: e.to_string(),
            })
        })
    }
}
