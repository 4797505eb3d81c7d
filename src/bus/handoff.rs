//! Events handed to the bus writer by another part of the process. The bus has one writer, the
//! ingester: the intake passes the events it accepted over this channel, and the ingester
//! publishes them through the same dedupe by `meta.id` as upstream events, then answers.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Mutex, OwnedMutexGuard};

/// One event to publish: its data exactly as received, its `meta.id` and `meta.dt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub data: String,
    pub id: String,
    pub time_ms: i64,
}

/// What became of one submitted event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Published, and safe on the bus (Kafka: acknowledged).
    Published,
    /// Its `meta.id` was delivered before: it is on the bus already and was not written again.
    Repeat,
    /// The bus refused it (too large for a Kafka message), with the reason.
    Refused(String),
}

/// A batch of events and where to send what became of them (or why the bus failed).
#[derive(Debug)]
pub struct Submission {
    pub events: Vec<Submitted>,
    reply: oneshot::Sender<Result<Vec<Outcome>, String>>,
}

impl Submission {
    /// Answers the submitter: one outcome per event, in order, or why none could be published.
    pub fn answer(self, result: Result<Vec<Outcome>, String>) {
        // A submitter that gave up waiting no longer listens; nothing is lost by that, since a
        // published event stays published and a re-sent one is a repeat.
        let _ = self.reply.send(result);
    }
}

/// Why a submission has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoffError {
    #[error("the ingester did not publish the events within {0:?}")]
    Timeout(Duration),
    #[error("the ingester is not running")]
    Closed,
    #[error("the bus failed: {0}")]
    Bus(String),
}

/// The submitting side; cheap to clone.
#[derive(Debug, Clone)]
pub struct HandoffSender {
    tx: mpsc::Sender<Submission>,
}

impl HandoffSender {
    /// Hands `events` over and waits at most `timeout` for what became of them.
    pub async fn submit(
        &self,
        events: Vec<Submitted>,
        timeout: Duration,
    ) -> Result<Vec<Outcome>, HandoffError> {
        let (reply, answer) = oneshot::channel();
        let exchange = async {
            self.tx
                .send(Submission { events, reply })
                .await
                .map_err(|_| HandoffError::Closed)?;
            match answer.await {
                Ok(Ok(outcomes)) => Ok(outcomes),
                Ok(Err(error)) => Err(HandoffError::Bus(error)),
                Err(_) => Err(HandoffError::Closed),
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(HandoffError::Timeout(timeout)))
    }
}

/// The publishing side. It outlives restarts of the ingester: each run takes it for as long as
/// it runs, and submissions wait in the channel in between.
#[derive(Debug, Clone)]
pub struct HandoffReceiver {
    rx: Arc<Mutex<mpsc::Receiver<Submission>>>,
}

impl HandoffReceiver {
    /// Takes the receiving end for one run of the ingester.
    pub async fn take(&self) -> OwnedMutexGuard<mpsc::Receiver<Submission>> {
        self.rx.clone().lock_owned().await
    }
}

/// A channel holding at most `capacity` waiting submissions.
pub fn handoff(capacity: usize) -> (HandoffSender, HandoffReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        HandoffSender { tx },
        HandoffReceiver {
            rx: Arc::new(Mutex::new(rx)),
        },
    )
}
