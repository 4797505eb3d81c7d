//! Supervision: each component runs under an actix actor that restarts it, with exponential
//! backoff, whenever it fails, and counts every restart.
//!
//! The component itself is a plain `async fn` returning `Result`. It runs as its own tokio task,
//! so a panic inside it surfaces here as a failed join (a restart), never as the end of the
//! actor system. Actix restarts an actor only when the actor stops itself, so a failure stops
//! the actor and `restarting` + `started` run the component again after the backoff.

use crate::metrics::{Component, SupervisorMetrics};
use actix::prelude::*;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// The error a component returns to its supervisor.
pub type ComponentError = Box<dyn std::error::Error + Send + Sync>;

/// A component's error after which running it again cannot help: another process owns what it
/// needs (a second ingester refused the event files' lock, or fenced on Kafka). The supervisor
/// does not restart it; it stops the whole process, which exits 2 with this message, so that a
/// service manager does not start it again in a loop either.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StopForGood(pub ComponentError);

/// How a supervised component ended for good.
#[derive(Debug)]
pub enum Ended {
    /// It stopped on shutdown.
    Stopped,
    /// It returned [`StopForGood`]: the process must stop.
    Refused(String),
}
/// A running component.
pub type ComponentFuture = Pin<Box<dyn Future<Output = Result<(), ComponentError>> + Send>>;
/// Builds a fresh run of a component; called once per (re)start. It carries its own context.
pub type ComponentFactory = Arc<dyn Fn() -> ComponentFuture + Send + Sync>;

/// How quickly a failing component is restarted.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Delay before the first restart; it doubles with every further failure.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// A run at least this long counts as stable: the next failure starts the backoff afresh.
    pub stable_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            stable_after: Duration::from_secs(60),
        }
    }
}

impl RestartPolicy {
    /// The wait before run number `failures + 1`, after `failures` failures in a row.
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(30));
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// The actor that owns one component's lifecycle.
pub struct Supervised {
    component: Component,
    name: &'static str,
    factory: ComponentFactory,
    shutdown: CancellationToken,
    metrics: SupervisorMetrics,
    policy: RestartPolicy,
    failures: u32,
    started_at: Instant,
    done: Option<oneshot::Sender<Ended>>,
}

/// A started component: keep `addr` alive as long as it should be restarted; `done` resolves
/// once it has stopped for good (after shutdown, or refused).
pub struct Running {
    pub name: &'static str,
    pub addr: Addr<Supervised>,
    pub done: oneshot::Receiver<Ended>,
}

/// Starts `factory` under supervision on the current actix arbiter; it runs until `shutdown`.
pub fn start(
    component: Component,
    factory: ComponentFactory,
    shutdown: CancellationToken,
    metrics: SupervisorMetrics,
    policy: RestartPolicy,
) -> Running {
    let (tx, rx) = oneshot::channel();
    let name = component.as_str();
    let addr = actix::Supervisor::start(move |_| Supervised {
        component,
        name,
        factory,
        shutdown,
        metrics,
        policy,
        failures: 0,
        started_at: Instant::now(),
        done: Some(tx),
    });
    Running {
        name,
        addr,
        done: rx,
    }
}

impl Supervised {
    fn finish(&mut self) {
        self.end(Ended::Stopped);
    }

    fn end(&mut self, ended: Ended) {
        if let Some(done) = self.done.take() {
            let _ = done.send(ended);
        }
    }

    fn on_exit(
        &mut self,
        result: Result<Result<(), ComponentError>, tokio::task::JoinError>,
        ctx: &mut Context<Self>,
    ) {
        let error = match result {
            Ok(Ok(())) => {
                tracing::info!(component = self.name, "component stopped");
                self.finish();
                return;
            }
            Ok(Err(e)) if e.is::<StopForGood>() => {
                let message = e.to_string();
                tracing::error!(component = self.name, error = %message, "component cannot run here; stopping the process instead of restarting it");
                self.end(Ended::Refused(message));
                // Every other component stops too: the process exits with this error.
                self.shutdown.cancel();
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(join) if join.is_panic() => format!("panicked: {join}"),
            Err(join) => format!("was cancelled: {join}"),
        };
        if self.shutdown.is_cancelled() {
            tracing::warn!(component = self.name, %error, "component failed while shutting down");
            self.finish();
            return;
        }
        if self.started_at.elapsed() >= self.policy.stable_after {
            self.failures = 0;
        }
        self.failures += 1;
        self.metrics.restarts.inc(self.component);
        tracing::error!(
            component = self.name,
            %error,
            failures = self.failures,
            restart_in = ?self.policy.delay(self.failures),
            "component failed; restarting"
        );
        ctx.stop();
    }
}

impl Actor for Supervised {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.shutdown.is_cancelled() {
            self.finish();
            return;
        }
        let delay = self.policy.delay(self.failures);
        let run = (self.factory)();
        let shutdown = self.shutdown.clone();
        self.started_at = Instant::now();
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
            run.await
        });
        ctx.spawn(
            task.into_actor(self)
                .map(|result, act, ctx| act.on_exit(result, ctx)),
        );
    }
}

impl actix::Supervised for Supervised {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        tracing::debug!(component = self.name, "restarting");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RestartPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            stable_after: Duration::from_secs(60),
        };
        let delays: Vec<u64> = (0..7).map(|f| p.delay(f).as_millis() as u64).collect();
        assert_eq!(delays, vec![0, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(1));
    }

    /// Runs `test` inside an actix system on a multi-threaded runtime, as the daemon does.
    fn on_actix_system(test: impl std::future::Future<Output = ()>) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        actix_rt::System::with_tokio_rt(move || runtime).block_on(test);
    }

    /// Metrics, a shutdown token and a run counter for one supervised component.
    fn fixture() -> (Metrics, CancellationToken, Arc<AtomicU32>) {
        (
            Metrics::new(1).unwrap(),
            CancellationToken::new(),
            Arc::new(AtomicU32::new(0)),
        )
    }

    #[test]
    fn failures_and_panics_are_restarted_and_counted() {
        on_actix_system(async {
            let (metrics, shutdown, runs) = fixture();
            let counter = runs.clone();
            let stop = shutdown.clone();
            let factory: ComponentFactory = Arc::new(move || {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let stop = stop.clone();
                Box::pin(async move {
                    match n {
                        0 => Err("first run fails".into()),
                        1 => panic!("second run panics"),
                        _ => {
                            stop.cancel();
                            Ok(())
                        }
                    }
                })
            });
            let policy = RestartPolicy {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(50),
                stable_after: Duration::from_secs(60),
            };
            let running = start(
                Component::Live,
                factory,
                shutdown,
                metrics.supervisor.clone(),
                policy,
            );
            tokio::time::timeout(Duration::from_secs(10), running.done)
                .await
                .expect("the component finished")
                .unwrap();
            assert_eq!(runs.load(Ordering::SeqCst), 3);
            assert_eq!(metrics.supervisor.restarts.get(Component::Live), 2);
        });
    }

    #[test]
    fn a_component_that_stops_for_good_is_not_restarted_and_stops_the_rest() {
        on_actix_system(async {
            let (metrics, shutdown, runs) = fixture();
            let counter = runs.clone();
            let factory: ComponentFactory = Arc::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                Box::pin(async {
                    Err(Box::new(StopForGood("held by pid 7".into())) as ComponentError)
                })
            });
            let running = start(
                Component::Ingest,
                factory,
                shutdown.clone(),
                metrics.supervisor.clone(),
                RestartPolicy::default(),
            );
            let ended = tokio::time::timeout(Duration::from_secs(10), running.done)
                .await
                .expect("the component ended")
                .unwrap();
            assert!(
                matches!(&ended, Ended::Refused(m) if m == "held by pid 7"),
                "{ended:?}"
            );
            assert!(shutdown.is_cancelled(), "the process is told to stop");
            assert_eq!(runs.load(Ordering::SeqCst), 1);
            assert_eq!(metrics.supervisor.restarts.get(Component::Ingest), 0);
        });
    }
}
