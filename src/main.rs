//! The `pleiades` binary: parses arguments, loads the configuration, runs the library.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use pleiades::config::{self, ConfigError, LogFormat, Overrides, Role, Sources};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Turns the live edit stream of every Wikimedia wiki into trustworthy statistics.
#[derive(Debug, Parser)]
#[command(name = "pleiades", version = pleiades::build::LONG_VERSION, about)]
struct Cli {
    /// Configuration file (default: $PLEIADES_CONFIG if set, else ./pleiades.toml if present,
    /// else built-in defaults). The container image sets PLEIADES_CONFIG to its own file.
    #[arg(long, short = 'c', global = true, env = "PLEIADES_CONFIG")]
    config: Option<PathBuf>,
    /// Log errors only.
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
    /// Log debug detail.
    #[arg(long, short = 'v', global = true)]
    verbose: bool,
    /// Log line format: "text" or "json" (one JSON object per line); overrides log.format.
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// When stderr is not a terminal, how often long work (a replay, a backfill, a recording)
    /// logs its progress; on a terminal a progress bar shows it instead.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    progress_interval: std::time::Duration,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration: exit 0 when usable, else print every problem and exit 2.
    CheckConfig,
    /// Run only the ingest role (the original personality and flags).
    Ingest(LegacyFlags),
    /// Run only the aggregate role (the original personality and flags).
    Aggregate(AggregateFlags),
    /// Run only the web role (the original personality and flags).
    Frontend(FrontendFlags),
    /// Serve recorded events as an EventStreams-compatible SSE endpoint.
    Replay(pleiades::replay::ReplayOptions),
    /// Recount the counters from the bus into a fresh counter space and switch to it
    /// atomically; the daemon may keep running (with the embedded store it must be stopped:
    /// one process holds the database file).
    Reaggregate(ReaggregateFlags),
    /// Capture the upstream stream, with its real ids, into a file `replay` serves back.
    Record(pleiades::record::RecordOptions),
}

/// Which days `reaggregate` rebuilds; the others keep their counters.
#[derive(Debug, Args)]
struct ReaggregateFlags {
    /// The first day to rebuild: YYYY-MM-DD (UTC) or a number of days since 1970-01-01.
    #[arg(long, value_name = "DAY", value_parser = parse_day)]
    from: Option<i64>,
    /// The last day to rebuild, in the same forms.
    #[arg(long, value_name = "DAY", value_parser = parse_day)]
    to: Option<i64>,
}

/// A day as `YYYY-MM-DD` or as the epoch day the API uses.
fn parse_day(text: &str) -> Result<i64, String> {
    if let Ok(day) = text.parse::<i64>() {
        return Ok(day);
    }
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map(|date| {
            date.signed_duration_since(chrono::NaiveDate::default())
                .num_days()
        })
        .map_err(|_| {
            format!("{text:?} is not a day: give YYYY-MM-DD or a number of days since 1970-01-01")
        })
}

/// The original command-line flags; each overrides its configuration key.
#[derive(Debug, Args)]
struct LegacyFlags {
    /// Enable the filesystem publisher (ingest.publisher = "file").
    #[arg(long = "file.enable")]
    file_enable: bool,
    /// The directory to publish events to (file.dir).
    #[arg(long = "file.publishDir")]
    file_publish_dir: Option<PathBuf>,
    /// Enable the Kafka publisher (ingest.publisher = "kafka").
    #[arg(long = "kafka.enable")]
    kafka_enable: bool,
    /// The Kafka broker to connect to (kafka.brokers).
    #[arg(long = "kafka.broker")]
    kafka_broker: Option<String>,
    /// The Kafka topic to publish to (kafka.topic).
    #[arg(long = "kafka.topic")]
    kafka_topic: Option<String>,
    /// The port to serve Prometheus metrics on (the port of metrics.listen).
    #[arg(long = "metricsPort")]
    metrics_port: Option<u16>,
    /// Resume from the last delivered event id (ingest.resume); `-r=false` starts at "now".
    #[arg(short = 'r', long = "resume", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    resume: Option<bool>,
}

/// The original `aggregate` flags.
#[derive(Debug, Args)]
struct AggregateFlags {
    #[command(flatten)]
    common: LegacyFlags,
    /// The Redis server to write aggregated stats to (the host and port of redis.url; selects
    /// store.kind = "redis"). With --redis-use-sentinel alone: localhost:6379.
    #[arg(long = "redis-addr", value_name = "HOST:PORT")]
    redis_addr: Option<String>,
    /// Find the Redis master through Sentinel: --redis-addr is a sentinel's address
    /// (redis.sentinels), the master is redis.master_name.
    #[arg(long = "redis-use-sentinel")]
    redis_use_sentinel: bool,
}

/// The original `frontend` flags.
#[derive(Debug, Args)]
struct FrontendFlags {
    #[command(flatten)]
    common: LegacyFlags,
    /// The Redis server to read stats from (the host and port of redis.url; selects
    /// store.kind = "redis"). With --frontend-redis-use-sentinel alone: localhost:6379.
    #[arg(long = "frontend-redis-addr", value_name = "HOST:PORT")]
    frontend_redis_addr: Option<String>,
    /// Find the Redis master through Sentinel: --frontend-redis-addr is a sentinel's address
    /// (redis.sentinels), the master is redis.master_name.
    #[arg(long = "frontend-redis-use-sentinel")]
    frontend_redis_use_sentinel: bool,
    /// The address to serve the API and the dashboard on (web.listen): ":8080" is every
    /// interface, "localhost:8080" or "IP:PORT" one. Without it, web.listen (127.0.0.1:8080).
    #[arg(long = "listen-addr", value_name = "ADDR")]
    listen_addr: Option<String>,
}

impl LegacyFlags {
    /// Sets the overrides these flags stand for.
    fn apply(self, overrides: &mut Overrides) {
        overrides.file_enable = self.file_enable;
        overrides.kafka_enable = self.kafka_enable;
        overrides.file_dir = self.file_publish_dir;
        overrides.kafka_broker = self.kafka_broker;
        overrides.kafka_topic = self.kafka_topic;
        overrides.metrics_port = self.metrics_port;
        overrides.resume = self.resume;
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("pleiades: {error:#}");
            ExitCode::from(1)
        }
    }
}

/// glibc gives each thread that allocates under contention an arena of its own, up to eight
/// per core, and keeps what is freed in each for reuse. A batch is built on a runtime thread
/// and freed on a blocking one, so over weeks every arena fills with freed batches and resident
/// memory climbs (a synthetic month grew it by half and more). Two arenas hold it where it settles
/// after the first day, at no measurable cost: the threads that allocate much are few.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tuning parameter of the allocator; it is called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    pleiades::progress::init(cli.progress_interval);
    let log_format = cli.log_format.as_deref().map(|f| match f {
        "json" => LogFormat::Json,
        _ => LogFormat::Text,
    });
    // The original's store and listen flags, of `aggregate` or `frontend`.
    let mut store_flags = (None, false, None);
    let mut rebuild = None;
    let mut record = None;
    let (role, flags, check_only) = match cli.command {
        Some(Command::Replay(options)) => {
            return run_replay(options, cli.quiet, cli.verbose, log_format)
        }
        Some(Command::CheckConfig) => (None, None, true),
        Some(Command::Record(options)) => {
            record = Some(options);
            (None, None, false)
        }
        Some(Command::Ingest(f)) => (Some(Role::Ingest), Some(f), false),
        Some(Command::Aggregate(f)) => {
            store_flags = (f.redis_addr, f.redis_use_sentinel, None);
            (Some(Role::Aggregate), Some(f.common), false)
        }
        Some(Command::Frontend(f)) => {
            store_flags = (
                f.frontend_redis_addr,
                f.frontend_redis_use_sentinel,
                f.listen_addr,
            );
            (Some(Role::Web), Some(f.common), false)
        }
        Some(Command::Reaggregate(f)) => {
            rebuild = Some(pleiades::aggregate::rebuild::RebuildOptions {
                from: f.from,
                to: f.to,
            });
            (None, None, false)
        }
        None => (None, None, false),
    };
    let (redis_addr, redis_use_sentinel, listen_addr) = store_flags;
    let mut overrides = Overrides {
        only_role: role,
        quiet: cli.quiet,
        verbose: cli.verbose,
        log_format,
        redis_addr,
        redis_use_sentinel,
        listen_addr,
        ..Overrides::default()
    };
    if let Some(f) = flags {
        f.apply(&mut overrides);
    }
    let default_file = Path::new("pleiades.toml");
    let file = cli
        .config
        .clone()
        .or_else(|| default_file.exists().then(|| default_file.to_owned()));
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let notifier = pleiades::systemd::Notifier::from_env(&env);
    // systemd's LoadCredential= hands secrets over in $CREDENTIALS_DIRECTORY, readable by this
    // service alone: a `secrets.toml` there is merged over the configuration file.
    let secrets = env
        .get("CREDENTIALS_DIRECTORY")
        .map(|dir| Path::new(dir).join("secrets.toml"))
        .filter(|path| path.exists());
    let sources = Sources {
        file: file.as_deref(),
        secrets: secrets.as_deref(),
        env,
        overrides,
    };
    let origin = file
        .as_deref()
        .map_or("built-in defaults".to_owned(), |p| p.display().to_string());
    let loaded = config::load(&sources).and_then(|config| {
        // The checks that need the bus's own libraries run after the keys are known good.
        let problems = pleiades::daemon::preflight(&config);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    });
    let config = match loaded {
        Ok(config) => config,
        Err(error) => {
            match &error {
                ConfigError::Invalid(problems) => {
                    eprintln!(
                        "pleiades: {} problem(s) in the configuration ({origin}):",
                        problems.len()
                    );
                    for problem in problems {
                        eprintln!("  {problem}");
                    }
                }
                ConfigError::Unreadable { .. } => eprintln!("pleiades: {error}"),
            }
            return Ok(ExitCode::from(2));
        }
    };
    if check_only {
        println!("configuration OK ({origin}); roles: {:?}", config.roles());
        return Ok(ExitCode::SUCCESS);
    }
    init_logging(&config.log.level, config.log.format);
    if let Some(options) = rebuild {
        return run_reaggregate(config, options);
    }
    if let Some(options) = record {
        return run_record(options, &config.ingest);
    }
    match pleiades::daemon::run(config, notifier, CancellationToken::new()) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // Another ingester owns the bus: a deployment error, like a bad configuration, that
        // running again cannot fix (the systemd unit does not restart on exit 2).
        Err(refused @ pleiades::daemon::DaemonError::Refused { .. }) => {
            eprintln!("pleiades: {refused}");
            Ok(ExitCode::from(2))
        }
        Err(error) => Err(error).context("pleiades stopped"),
    }
}

/// `pleiades reaggregate`: the rebuild, then what it did on stdout. Exit 1 when it stopped
/// before the switch (the live counters are then unchanged).
fn run_reaggregate(
    config: config::Config,
    options: pleiades::aggregate::rebuild::RebuildOptions,
) -> anyhow::Result<ExitCode> {
    use pleiades::aggregate::{rebuild, AggregateSettings};
    if options
        .from
        .zip(options.to)
        .is_some_and(|(from, to)| from > to)
    {
        eprintln!("pleiades: --from is after --to");
        return Ok(ExitCode::from(2));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let metrics = std::sync::Arc::new(pleiades::metrics::Metrics::new(1)?);
        let store = pleiades::store::Store::open(&config.store_settings(), metrics.store.clone())
            .await
            .context("opening the store (with the embedded store, stop the daemon first)")?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.cancel();
            }
        });
        let ctx = pleiades::ComponentContext {
            config: AggregateSettings {
                aggregate: config.aggregate.clone(),
                bus: config.bus(config.aggregate_source()),
            },
            metrics,
            shutdown,
        };
        let report = rebuild::run(ctx, store, options).await?;
        let seconds = report.elapsed.as_secs_f64();
        println!(
            "reaggregate: {} records read, {} events counted in {seconds:.1} s ({:.0} records/s), {} round(s)",
            report.records,
            report.events,
            report.records as f64 / seconds.max(1e-3),
            report.rounds
        );
        println!(
            "rebuilt {} day(s): {}",
            report.rebuilt_days.len(),
            days_text(&report.rebuilt_days)
        );
        if !report.lost_days.is_empty() {
            println!(
                "kept {} day(s) whose events the bus no longer holds: {}",
                report.lost_days.len(),
                days_text(&report.lost_days)
            );
        }
        if report.outside_days > 0 {
            println!(
                "kept {} day(s) outside --from/--to",
                report.outside_days
            );
        }
        if !report.lost_sources.is_empty() {
            println!(
                "no longer on the bus: {}",
                report.lost_sources.join(", ")
            );
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Epoch days as `YYYY-MM-DD`, comma-separated.
fn days_text(days: &[i64]) -> String {
    let date = |day: i64| {
        chrono::NaiveDate::default()
            .checked_add_signed(chrono::TimeDelta::days(day))
            .map_or(day.to_string(), |d| d.to_string())
    };
    days.iter().map(|d| date(*d)).collect::<Vec<_>>().join(", ")
}

fn run_replay(
    options: pleiades::replay::ReplayOptions,
    quiet: bool,
    verbose: bool,
    format: Option<LogFormat>,
) -> anyhow::Result<ExitCode> {
    if quiet && verbose {
        eprintln!("pleiades: -q and -v both given; choose one");
        return Ok(ExitCode::from(2));
    }
    let level = if quiet {
        "error"
    } else if verbose {
        "debug"
    } else {
        "info"
    };
    init_logging(level, format.unwrap_or(LogFormat::Text));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let server = pleiades::replay::serve(options, shutdown.clone()).await?;
        println!(
            "replay listening on http://{}/v2/stream/recentchange",
            server.addr
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("listening for SIGTERM")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        shutdown.cancel();
        let _ = server.task.await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Records until the limit, the duration, SIGTERM or Ctrl-C; the capture is synced either way.
fn run_record(
    options: pleiades::record::RecordOptions,
    ingest: &pleiades::config::IngestConfig,
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let recorded = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("listening for SIGTERM")?;
        let signals = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            signals.cancel();
        });
        pleiades::record::run(options, ingest, shutdown)
            .await
            .context("recording")
    })?;
    println!(
        "recorded {} events ({} new)",
        recorded.events, recorded.appended
    );
    Ok(ExitCode::SUCCESS)
}

/// Logs go to stderr: coloured only when it is a terminal, so that the journal and log files get
/// plain text (or JSON, where escapes are part of the format).
fn init_logging(level: &str, format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(pleiades::progress::LogWriter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
