//! The daemon: an actix system on a multi-threaded tokio runtime hosting each enabled role as a
//! supervised component, the metrics endpoint, and orderly shutdown on SIGTERM/SIGINT.

use crate::config::Config;
use crate::metrics::{Metrics, MetricsError};
use crate::supervisor::{self, ComponentFactory, RestartPolicy};
use crate::systemd::Notifier;
use crate::ComponentContext;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long components get to flush and persist after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(9);

/// What keeps the daemon from running.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot open the counter store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot listen for {signal}: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the roles `config` enables until SIGTERM/SIGINT or `shutdown` is cancelled, telling
/// systemd through `notifier` when it is ready, alive and stopping.
pub fn run(
    config: Config,
    notifier: Notifier,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("pleiades")
        .build()
        .map_err(DaemonError::Runtime)?;
    let system = actix_rt::System::with_tokio_rt(move || runtime);
    system.block_on(run_roles(Arc::new(config), notifier, shutdown))
}

/// The body of [`run`], inside the actix system.
pub async fn run_roles(
    config: Arc<Config>,
    notifier: Notifier,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let metrics = Arc::new(Metrics::new()?);
    // One store handle for the whole process: the embedded database allows one opener.
    let store = if config.aggregate.enabled || config.web.enabled {
        Some(crate::store::Store::open(&config).await?)
    } else {
        None
    };
    let (metrics_addr, metrics_server) = crate::health::serve(
        config.metrics.listen,
        metrics.clone(),
        config.clone(),
        store.clone(),
        shutdown.clone(),
    )
    .await?;
    spawn_signal_listener(shutdown.clone())?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        metrics = %metrics_addr,
        roles = ?config.roles(),
        "pleiades started"
    );

    let context = ComponentContext {
        config: config.clone(),
        metrics,
        shutdown: shutdown.clone(),
    };
    let mut running = Vec::new();
    if config.ingest.enabled {
        let factory: ComponentFactory = Arc::new(|ctx| {
            Box::pin(async move { crate::ingest::run(ctx).await.map_err(Into::into) })
        });
        running.push(supervisor::start(
            "ingest",
            factory,
            context.clone(),
            RestartPolicy::default(),
        ));
    }
    if let Some(store) = store.clone().filter(|_| config.aggregate.enabled) {
        for index in 0..config.aggregate.workers {
            let store = store.clone();
            let factory: ComponentFactory = Arc::new(move |ctx| {
                let store = store.clone();
                Box::pin(async move {
                    crate::aggregate::run(ctx, store, index)
                        .await
                        .map_err(Into::into)
                })
            });
            running.push(supervisor::start(
                "aggregate",
                factory,
                context.clone(),
                RestartPolicy::default(),
            ));
        }
    }
    if let Some(store) = store.filter(|_| config.web.enabled) {
        let factory: ComponentFactory = Arc::new(move |ctx| {
            let store = store.clone();
            Box::pin(async move { crate::web::run(ctx, store).await.map_err(Into::into) })
        });
        running.push(supervisor::start(
            "web",
            factory,
            context.clone(),
            RestartPolicy::default(),
        ));
    }

    let roles = format!("{:?}", config.roles());
    notify(&notifier, &format!("READY=1\nSTATUS=running {roles}"));
    if let Some(interval) = notifier.watchdog_interval() {
        // Taken here, on the system's own thread: tokio's workers have no current actix system.
        let arbiter = actix_rt::System::current().arbiter().clone();
        tokio::spawn(watchdog(
            notifier.clone(),
            arbiter,
            interval,
            shutdown.clone(),
        ));
    }

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    notify(&notifier, "STOPPING=1");
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    for component in running {
        match tokio::time::timeout_at(deadline, component.done).await {
            Ok(_) => {}
            Err(_) => tracing::error!(
                component = component.name,
                "did not stop within the grace period"
            ),
        }
        drop(component.addr);
    }
    let _ = tokio::time::timeout_at(deadline, metrics_server).await;
    tracing::info!("stopped");
    Ok(())
}

fn notify(notifier: &Notifier, state: &str) {
    if let Err(error) = notifier.notify(state) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

/// Pings the systemd watchdog only while the actor system answers: each ping first runs a task
/// on the actix arbiter that hosts every supervisor, so a wedged system stops the pings and
/// systemd restarts the service.
async fn watchdog(
    notifier: Notifier,
    arbiter: actix_rt::ArbiterHandle,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let posted = arbiter.spawn(async move {
            let _ = tx.send(());
        });
        match tokio::time::timeout(interval, rx).await {
            Ok(Ok(())) if posted => notify(&notifier, "WATCHDOG=1"),
            _ => tracing::error!("the actor system did not answer; withholding the watchdog ping"),
        }
    }
}

fn spawn_signal_listener(shutdown: CancellationToken) -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|source| DaemonError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| DaemonError::Signal {
        signal: "SIGINT",
        source,
    })?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
            _ = shutdown.cancelled() => {}
        }
        shutdown.cancel();
    });
    Ok(())
}
