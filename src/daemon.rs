//! The daemon: an actix system on a multi-threaded tokio runtime hosting each enabled role as a
//! supervised component, the metrics endpoint, and orderly shutdown on SIGTERM/SIGINT.

use crate::aggregate::AggregateSettings;
use crate::bus::Trouble;
use crate::config::BusKind;
use crate::config::{Config, Problem};
use crate::health::Readiness;
use crate::ingest::IngestSettings;
use crate::metrics::{Component, Metrics, MetricsError};
use crate::store::Store;
use crate::supervisor::{self, ComponentFactory, Ended, RestartPolicy, Running, StopForGood};
use crate::systemd::Notifier;
use crate::web::WebParts;
use crate::ComponentContext;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Intake requests that may wait for the ingester at once.
const INTAKE_QUEUE: usize = 64;

/// How long components get to flush and persist after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(9);

/// What keeps the daemon from running.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Listen(#[from] crate::http::ServeError),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot open the counter store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A component found that it cannot run here (another ingester owns the bus); the process
    /// stopped rather than restart it. `main` exits 2.
    #[error("{component} stopped for good: {message}")]
    Refused {
        component: &'static str,
        message: String,
    },
    #[error("cannot listen for {signal}: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The checks beyond the configuration's own keys, made before anything starts (and by
/// `check-config`): what librdkafka says of `[kafka.properties]` on a host that uses Kafka.
pub fn preflight(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    if config.needs_kafka() {
        problems.extend(crate::bus::kafka::check_properties(&config.kafka));
    }
    // The Redis URL as the client reads it (with its TLS authorities), never printed with its
    // password.
    let stores = config.aggregate.enabled || config.web.enabled;
    if stores && config.store.kind == crate::config::StoreKind::Redis {
        let ca_file = config.redis.ca_file.as_deref();
        if let Err(error) = crate::store::redis::connection_info(&config.redis.url, ca_file) {
            let message = match &error {
                crate::store::redis::SettingsError::Url(_) => {
                    format!("{}: {error}", crate::config::redact_url(&config.redis.url))
                }
                crate::store::redis::SettingsError::CaFile { .. } => error.to_string(),
            };
            problems.push(Problem {
                key: error.key().into(),
                message,
            });
        }
    }
    problems
}

/// Raises the soft limit on open files to the hard one, as network daemons do: every
/// listener's connection limit, the bus, the store and upstream share this budget. Returns the
/// limit in force.
fn raise_open_file_limit() -> Option<libc::rlim_t> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Some(limit.rlim_cur)
}

/// Runs the roles `config` enables until SIGTERM/SIGINT or `shutdown` is cancelled, telling
/// systemd through `notifier` when it is ready, alive and stopping.
pub fn run(
    config: Config,
    notifier: Notifier,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    raise_open_files_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("pleiades")
        .build()
        .map_err(DaemonError::Runtime)?;
    let system = actix_rt::System::with_tokio_rt(move || runtime);
    system.block_on(run_roles(Arc::new(config), notifier, shutdown))
}

/// Raises the soft limit of open files to the hard one: every relay client, dashboard and API
/// connection is a file, and a service's soft limit (1,024 under systemd) is below what
/// `web.relay_max_clients` allows by default.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) and setrlimit(2) with a pointer to a live rlimit of this frame.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0
            && limit.rlim_cur < limit.rlim_max
            && {
                let soft = limit.rlim_cur;
                limit.rlim_cur = limit.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 && soft < limit.rlim_max
            }
    };
    if raised {
        tracing::debug!(open_files = limit.rlim_cur, "raised the open-files limit");
    }
}

/// Starts `run` under supervision with the default restart policy; `run` is called again for
/// every restart.
fn supervise<F, Fut, E>(
    component: Component,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    run: F,
) -> Running
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: Into<supervisor::ComponentError>,
{
    let factory: ComponentFactory = Arc::new(move || {
        let running = run();
        Box::pin(async move { running.await.map_err(Into::into) })
    });
    supervisor::start(
        component,
        factory,
        shutdown.clone(),
        metrics.supervisor.clone(),
        RestartPolicy::default(),
    )
}

/// The body of [`run`], inside the actix system.
pub async fn run_roles(
    config: Arc<Config>,
    notifier: Notifier,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let metrics = Arc::new(Metrics::new(config.aggregate.workers)?);
    if let Some(limit) = raise_open_file_limit() {
        let listeners = config.metrics.max_connections
            + if config.web.enabled {
                config.web.max_connections
            } else {
                0
            };
        // What the bus, the store, upstream and the runtime need beside the listeners.
        const RESERVE: u64 = 256;
        if (listeners as u64).saturating_add(RESERVE) > limit {
            tracing::warn!(
                open_file_limit = limit,
                listeners,
                "web.max_connections + metrics.max_connections leave fewer than {RESERVE} file descriptors for the bus, the store and upstream; lower them or raise LimitNOFILE"
            );
        }
    }
    // One store handle for the whole process: the embedded database allows one opener.
    let store = if config.aggregate.enabled || config.web.enabled {
        Some(Store::open(&config.store_settings(), metrics.store.clone()).await?)
    } else {
        None
    };
    // Retention runs where the event files are aggregated: that host has the store whose
    // positions prove a segment counted.
    let retention_here = config.aggregate.enabled && config.aggregate_source() == BusKind::File;
    let write_blocked = Trouble::default();
    let retention_blocked = Trouble::default();
    let readiness = Readiness {
        store: store.clone(),
        event_files: config.uses_files().then(|| config.file.dir.clone()),
        kafka: config
            .uses_kafka()
            .then(|| crate::bus::kafka::Probe::new(&config.kafka)),
        failures: Some(metrics.http.ready_failures.clone()),
        failing: Arc::default(),
        bus_writes: config.ingest.enabled.then(|| write_blocked.clone()),
        retention: retention_here.then(|| retention_blocked.clone()),
    };
    let (metrics_listener, metrics_addr) = crate::http::bind(config.metrics.listen).await?;
    let metrics_server = tokio::spawn(crate::health::serve(
        metrics_listener,
        metrics.clone(),
        readiness.clone(),
        config.metrics.clone(),
        shutdown.clone(),
    ));
    spawn_signal_listener(shutdown.clone())?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        metrics = %metrics_addr,
        roles = ?config.roles(),
        "pleiades started"
    );

    let base = ComponentContext {
        config: (),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    };
    let mut running = Vec::new();
    // The intake hands what it accepts to this host's ingester, the one writer of the bus
    // (configuration checks refuse an intake without the ingest role).
    let intake = config
        .intake
        .listen
        .filter(|_| config.ingest.enabled)
        .map(|_| crate::bus::handoff::handoff(INTAKE_QUEUE));
    if config.ingest.enabled {
        let ctx = base.with(IngestSettings {
            ingest: config.ingest.clone(),
            bus: config.bus(config.ingest.publisher),
        });
        let blocked = write_blocked.clone();
        let handoff = intake.as_ref().map(|(_, rx)| rx.clone());
        running.push(supervise(
            Component::Ingest,
            &metrics,
            &shutdown,
            move || {
                let run = crate::ingest::run(ctx.clone(), blocked.clone(), handoff.clone());
                async move {
                    // A second ingester must stop, not retry until it wins.
                    run.await.map_err(|e| -> supervisor::ComponentError {
                        if e.is_refusal() {
                            Box::new(StopForGood(e.into()))
                        } else {
                            e.into()
                        }
                    })
                }
            },
        ));
    }
    if let Some((tx, _)) = intake {
        let ctx = base.with(config.intake.clone());
        running.push(supervise(
            Component::Intake,
            &metrics,
            &shutdown,
            move || crate::intake::run(ctx.clone(), tx.clone()),
        ));
    }
    if let Some(store) = store.clone().filter(|_| retention_here) {
        let ctx = base.with(config.file.clone());
        let blocked = retention_blocked.clone();
        running.push(supervise(
            Component::Retention,
            &metrics,
            &shutdown,
            move || crate::aggregate::retention::run(ctx.clone(), store.clone(), blocked.clone()),
        ));
    }
    if let Some(store) = store.clone().filter(|_| config.aggregate.enabled) {
        let settings = AggregateSettings {
            aggregate: config.aggregate.clone(),
            bus: config.bus(config.aggregate_source()),
        };
        for index in 0..config.aggregate.workers {
            let (ctx, store) = (base.with(settings.clone()), store.clone());
            running.push(supervise(
                Component::Aggregate,
                &metrics,
                &shutdown,
                move || crate::aggregate::run(ctx.clone(), store.clone(), index),
            ));
        }
    }
    if let Some(store) = store.filter(|_| config.web.enabled) {
        let ctx = base.with(config.web.clone());
        let (tx, rx) = watch::channel(String::new());
        let tx = Arc::new(tx);
        let (live_ctx, live_store) = (ctx.clone(), store.clone());
        running.push(supervise(Component::Live, &metrics, &shutdown, move || {
            crate::web::live::run(live_ctx.clone(), live_store.clone(), tx.clone())
        }));
        let relay = config.relay_bus().map(|kind| {
            crate::web::relay::Hub::new(
                config.bus(kind),
                config.web.relay_buffer_events,
                config.web.relay_max_clients,
                metrics.relay.clone(),
            )
        });
        if let Some(hub) = relay.clone() {
            let (poll, stop) = (config.web.relay_poll_interval, shutdown.clone());
            running.push(supervise(
                Component::Relay,
                &metrics,
                &shutdown,
                move || crate::web::relay::run(hub.clone(), poll, stop.clone()),
            ));
        }
        let parts = WebParts {
            store,
            readiness: readiness.clone(),
            live: rx,
            relay,
        };
        running.push(supervise(Component::Web, &metrics, &shutdown, move || {
            crate::web::run(ctx.clone(), parts.clone())
        }));
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
    let mut refused = None;
    for component in running {
        match tokio::time::timeout_at(deadline, component.done).await {
            Ok(Ok(Ended::Refused(message))) => {
                refused.get_or_insert((component.name, message));
            }
            Ok(_) => {}
            Err(_) => tracing::error!(
                component = component.name,
                "did not stop within the grace period"
            ),
        }
        drop(component.addr);
    }
    if let Ok(Ok(Err(error))) = tokio::time::timeout_at(deadline, metrics_server).await {
        tracing::warn!(%error, "the metrics listener failed");
    }
    tracing::info!("stopped");
    match refused {
        Some((component, message)) => Err(DaemonError::Refused { component, message }),
        None => Ok(()),
    }
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
