//! Loading: the TOML file, then `PLEIADES_<SECTION>__<KEY>` environment variables, then
//! command-line flags, each winning over the one before; every problem is collected, named by
//! its key, before anything runs.

use super::validate::Problem;
use super::{BusKind, Config, Role, StoreKind};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// Settings given on the command line; they win over the file and the environment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// Run only this role (the original `ingest|aggregate|frontend` personalities).
    pub only_role: Option<Role>,
    pub file_enable: bool,
    pub kafka_enable: bool,
    pub file_dir: Option<PathBuf>,
    pub kafka_broker: Option<String>,
    pub kafka_topic: Option<String>,
    pub metrics_port: Option<u16>,
    pub resume: Option<bool>,
    /// `--redis-addr` / `--frontend-redis-addr`: the Redis at `HOST:PORT` (the host and port of
    /// `redis.url`), or with `redis_use_sentinel` a sentinel's address (`redis.sentinels`).
    /// Either flag selects `store.kind = "redis"`.
    pub redis_addr: Option<String>,
    /// `--redis-use-sentinel` / `--frontend-redis-use-sentinel`.
    pub redis_use_sentinel: bool,
    /// `--listen-addr`: `web.listen` in the original's form, where `:8080` means every interface.
    pub listen_addr: Option<String>,
    pub quiet: bool,
    pub verbose: bool,
    /// `--log-format`: overrides `log.format`.
    pub log_format: Option<super::LogFormat>,
}

/// Where the configuration comes from.
#[derive(Debug, Clone, Default)]
pub struct Sources<'a> {
    /// The TOML file, if any.
    pub file: Option<&'a Path>,
    /// A second TOML file merged over the first, for secrets kept out of it (systemd's
    /// `secrets.toml` credential); its keys win over the file's, the environment's win over it.
    pub secrets: Option<&'a Path>,
    /// The process environment (only `PLEIADES_*` variables are read).
    pub env: HashMap<String, String>,
    pub overrides: Overrides,
}

/// Keys whose contents are free-form and passed through unchecked.
const FREE_FORM: &[&str] = &["kafka.properties"];

/// Reads, merges and validates the configuration, reporting every problem found.
pub fn load(sources: &Sources<'_>) -> Result<Config, ConfigError> {
    let mut builder = config::Config::builder();
    for path in sources.file.into_iter().chain(sources.secrets) {
        // Read the file ourselves so that a missing or unreadable file names its path.
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Unreadable {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
    }
    // Only PLEIADES_<SECTION>__<KEY> names configure Pleiades; other variables that happen to
    // start with PLEIADES_ belong to someone else and are left alone.
    let env: HashMap<String, String> = sources
        .env
        .iter()
        .filter(|(k, _)| {
            k.strip_prefix("PLEIADES_")
                .and_then(|rest| rest.split_once("__"))
                .is_some_and(|(section, key)| !section.is_empty() && !key.is_empty())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix("PLEIADES")
            .prefix_separator("_")
            .separator("__")
            .source(Some(env)),
    );
    let merged = builder.build().map_err(|e| {
        ConfigError::Invalid(vec![Problem {
            key: sources
                .file
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "environment".to_owned()),
            message: e.to_string(),
        }])
    })?;

    let mut problems = unknown_keys(&merged);
    let config = Config {
        ingest: section(&merged, "ingest", &mut problems),
        file: section(&merged, "file", &mut problems),
        kafka: section(&merged, "kafka", &mut problems),
        aggregate: section(&merged, "aggregate", &mut problems),
        store: section(&merged, "store", &mut problems),
        redis: section(&merged, "redis", &mut problems),
        web: section(&merged, "web", &mut problems),
        intake: section(&merged, "intake", &mut problems),
        metrics: section(&merged, "metrics", &mut problems),
        log: section(&merged, "log", &mut problems),
    };
    let mut config = config;
    problems.extend(apply_overrides(&mut config, &sources.overrides));
    problems.extend(config.validate());
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// Reads one section. Each key is first checked on its own (the others at their defaults), so
/// that every bad value is reported, not only the first one serde meets in a map of random order.
fn section<T: serde::de::DeserializeOwned + Default>(
    merged: &config::Config,
    name: &str,
    problems: &mut Vec<Problem>,
) -> T {
    let Ok(value) = merged.get::<config::Value>(name) else {
        return T::default();
    };
    let table = match value.into_table() {
        Ok(table) => table,
        Err(e) => {
            problems.push(Problem {
                key: name.to_owned(),
                message: format!("must be a table of keys: {e}"),
            });
            return T::default();
        }
    };
    let as_value = |entries: Vec<(String, config::Value)>| {
        config::Value::new(
            None,
            config::ValueKind::Table(entries.into_iter().collect()),
        )
    };
    let entries: Vec<(String, config::Value)> = table.into_iter().collect();
    let before = problems.len();
    for entry in &entries {
        if let Err(e) = serde_path_to_error::deserialize::<_, T>(as_value(vec![entry.clone()])) {
            problems.extend(type_problem(name, e));
        }
    }
    if problems.len() > before {
        return T::default();
    }
    match serde_path_to_error::deserialize(as_value(entries)) {
        Ok(section) => section,
        Err(e) => {
            problems.extend(type_problem(name, e));
            T::default()
        }
    }
}

/// Turns a deserialisation error into a problem named by its full key. Unknown keys are left
/// out: [`unknown_keys`] reports all of them, not just the first of each section.
fn type_problem(
    section: &str,
    error: serde_path_to_error::Error<config::ConfigError>,
) -> Option<Problem> {
    let message = error.inner().to_string();
    if message.starts_with("unknown field") {
        return None;
    }
    let path = error.path().to_string();
    let key = if path.is_empty() || path == "." {
        section.to_owned()
    } else {
        format!("{section}.{path}")
    };
    // The config crate sometimes appends its own idea of the key; ours is more precise.
    let message = match message.rsplit_once(" for key `") {
        Some((m, _)) => m.to_owned(),
        None => message,
    };
    Some(Problem { key, message })
}

/// Every key present in `merged` that the configuration does not define, with its full path.
fn unknown_keys(merged: &config::Config) -> Vec<Problem> {
    let known = match serde_json::to_value(Config::default()) {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    let given: serde_json::Value = match merged.clone().try_deserialize() {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    let mut problems = Vec::new();
    walk_unknown(&given, &known, "", &mut problems);
    problems
}

fn walk_unknown(
    given: &serde_json::Value,
    known: &serde_json::Value,
    prefix: &str,
    out: &mut Vec<Problem>,
) {
    let (Some(given), Some(known)) = (given.as_object(), known.as_object()) else {
        return;
    };
    for (key, value) in given {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match known.get(key) {
            None => {
                let expected: Vec<&str> = known.keys().map(String::as_str).collect();
                out.push(Problem {
                    key: path,
                    message: format!("unknown key (expected one of: {})", expected.join(", ")),
                });
            }
            Some(_) if FREE_FORM.contains(&path.as_str()) => {}
            Some(known_value) => walk_unknown(value, known_value, &path, out),
        }
    }
}

fn apply_overrides(config: &mut Config, o: &Overrides) -> Vec<Problem> {
    let mut problems = Vec::new();
    if let Some(role) = o.only_role {
        config.ingest.enabled = role == Role::Ingest;
        config.aggregate.enabled = role == Role::Aggregate;
        config.web.enabled = role == Role::Web;
    }
    match (o.file_enable, o.kafka_enable) {
        (true, true) => problems.push(Problem {
            key: "ingest.publisher".into(),
            message: "--file.enable and --kafka.enable both given; choose one publisher".into(),
        }),
        (true, false) => config.ingest.publisher = BusKind::File,
        (false, true) => config.ingest.publisher = BusKind::Kafka,
        (false, false) => {}
    }
    if let Some(dir) = &o.file_dir {
        config.file.dir.clone_from(dir);
    }
    if let Some(broker) = &o.kafka_broker {
        config.kafka.brokers.clone_from(broker);
    }
    if let Some(topic) = &o.kafka_topic {
        config.kafka.topic.clone_from(topic);
    }
    if let Some(port) = o.metrics_port {
        config.metrics.listen.set_port(port);
    }
    if let Some(resume) = o.resume {
        config.ingest.resume = resume;
    }
    if o.redis_addr.is_some() || o.redis_use_sentinel {
        problems.extend(apply_redis_flags(config, o));
    }
    if let Some(listen) = &o.listen_addr {
        match super::parse_listen_addr(listen) {
            Some(addr) => config.web.listen = addr,
            None => problems.push(Problem {
                key: "web.listen".into(),
                message: format!(
                    "--listen-addr {listen:?} is not :PORT, IP:PORT or localhost:PORT"
                ),
            }),
        }
    }
    match (o.quiet, o.verbose) {
        (true, true) => problems.push(Problem {
            key: "log.level".into(),
            message: "-q and -v both given; choose one".into(),
        }),
        (true, false) => config.log.level = "error".into(),
        (false, true) => config.log.level = "debug".into(),
        (false, false) => {}
    }
    if let Some(format) = o.log_format {
        config.log.format = format;
    }
    problems
}

/// The original's Redis address when a Redis flag comes without one.
pub const ORIGINAL_REDIS_ADDR: &str = "localhost:6379";

/// The original's Redis flags: the address is the Redis itself (the host and port of
/// `redis.url`, whose scheme, password and database stay), or with Sentinel a sentinel's. Either
/// way it replaces whatever the file said about how Redis is reached, except that the Sentinel
/// flag alone keeps the file's sentinels when it lists some.
fn apply_redis_flags(config: &mut Config, o: &Overrides) -> Option<Problem> {
    config.store.kind = StoreKind::Redis;
    if o.redis_addr.is_none() && o.redis_use_sentinel && !config.redis.sentinels.is_empty() {
        config.redis.cluster.clear();
        return None;
    }
    let addr = o.redis_addr.as_deref().unwrap_or(ORIGINAL_REDIS_ADDR);
    let key = if o.redis_use_sentinel {
        "redis.sentinels"
    } else {
        "redis.url"
    };
    let Some((host, port)) = super::parse_host_port(addr) else {
        return Some(Problem {
            key: key.into(),
            message: format!("--redis-addr {addr:?} is not HOST:PORT"),
        });
    };
    config.redis.cluster.clear();
    if o.redis_use_sentinel {
        config.redis.sentinels = vec![addr.to_owned()];
        return None;
    }
    config.redis.sentinels.clear();
    match super::with_host_port(&config.redis.url, &host, port) {
        Some(url) => {
            config.redis.url = url;
            None
        }
        None => Some(Problem {
            key: key.into(),
            message: format!(
                "{:?} is not a URL whose host --redis-addr can replace",
                super::redact_url(&config.redis.url)
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_URL;
    use std::io::Write;
    use std::time::Duration;

    fn load_toml(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(toml.as_bytes()).unwrap();
        load(&Sources {
            file: Some(file.path()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Sources::default()
        })
    }

    #[test]
    fn secrets_are_merged_over_the_file_and_under_the_environment() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"[redis]\nurl = \"redis://file/\"\ntimeout = \"3s\"\n")
            .unwrap();
        let mut secrets = tempfile::NamedTempFile::new().unwrap();
        secrets
            .write_all(b"# no secrets\n[redis]\nurl = \"rediss://:pw@secret/\"\n")
            .unwrap();
        let sources = |env: &[(&str, &str)]| Sources {
            file: Some(file.path()),
            secrets: Some(secrets.path()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            overrides: Overrides::default(),
        };
        let config = load(&sources(&[])).unwrap();
        assert_eq!(config.redis.url, "rediss://:pw@secret/");
        assert_eq!(config.redis.timeout, Duration::from_secs(3));
        let config = load(&sources(&[("PLEIADES_REDIS__URL", "redis://env/")])).unwrap();
        assert_eq!(config.redis.url, "redis://env/");
        // The default systemd gives when there is no secrets file: a comment.
        std::fs::write(secrets.path(), "# no secrets").unwrap();
        assert_eq!(load(&sources(&[])).unwrap().redis.url, "redis://file/");
    }

    /// Asserts that each of `keys` is named by a problem.
    fn assert_named(p: &[Problem], keys: &[&str]) {
        let named: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        for key in keys {
            assert!(named.contains(key), "{key} missing from {p:?}");
        }
    }

    fn problems(result: Result<Config, ConfigError>) -> Vec<Problem> {
        match result {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn no_sources_gives_the_defaults() {
        let config = load(&Sources::default()).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.ingest.url, DEFAULT_URL);
        assert!(config.ingest.user_agent.starts_with("pleiades/"));
    }

    #[test]
    fn the_shipped_file_equals_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pleiades.toml");
        let config = load(&Sources {
            file: Some(&path),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn every_unknown_key_is_named_with_its_path() {
        let p = problems(load_toml(
            "bogus = 1\n[ingest]\nurl2 = \"x\"\n[kafka.properties]\n\"sasl.mechanism\" = \"PLAIN\"\n[web]\nlisten = \"127.0.0.1:1\"\nport = 3\n",
            &[],
        ));
        assert_named(&p, &["bogus", "ingest.url2", "web.port"]);
        assert_eq!(p.len(), 3, "{p:?}");
    }

    #[test]
    fn bad_values_are_named_by_key() {
        let p = problems(load_toml(
            "[ingest]\npublisher = \"carrier-pigeon\"\nstall_timeout = \"x\"\nmax_event_bytes = \"lots\"\n[metrics]\nlisten = \"nowhere\"\n[file]\nsegment_bytes = 10\n",
            &[],
        ));
        assert_named(
            &p,
            &[
                "ingest.publisher",
                "ingest.stall_timeout",
                "ingest.max_event_bytes",
                "metrics.listen",
                "file.segment_bytes",
            ],
        );
    }

    #[test]
    fn the_bounds_of_the_event_files_are_checked_by_key() {
        let config = load_toml(
            "[file]\nretention = \"7days\"\nmax_bytes = 1073741824\nsegment_bytes = 1048576\n",
            &[],
        )
        .unwrap();
        assert_eq!(config.file.retention, Duration::from_secs(7 * 86_400));
        let p = problems(load_toml(
            "[file]\nmax_bytes = 1000000\nquarantine_max_bytes = 10\nretention = \"0s\"\n",
            &[],
        ));
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "file.max_bytes",
            "file.quarantine_max_bytes",
            "file.retention",
        ] {
            assert!(keys.contains(&key), "{key} not named in {p:?}");
        }
        let p = problems(load_toml(
            "[kafka]\ntransactional_id = \" ingest\"\n[ingest]\npublisher = \"kafka\"\n",
            &[],
        ));
        assert!(p.iter().any(|p| p.key == "kafka.transactional_id"), "{p:?}");
    }

    #[test]
    fn durations_parse_and_zero_is_refused() {
        let config = load_toml(
            "[ingest]\nresume_rewind = \"2s\"\nstall_timeout = \"1m\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(config.ingest.resume_rewind, Duration::from_secs(2));
        assert_eq!(config.ingest.stall_timeout, Duration::from_secs(60));
        let p = problems(load_toml("[ingest]\nstall_timeout = \"0s\"\n", &[]));
        assert_eq!(p[0].key, "ingest.stall_timeout");
        let p = problems(load_toml("[ingest]\nresume_rewind = \"soon\"\n", &[]));
        assert_eq!(p[0].key, "ingest.resume_rewind", "{p:?}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = load_toml(
            "[web]\nlisten = \"127.0.0.1:1000\"\n",
            &[
                ("PLEIADES_WEB__LISTEN", "127.0.0.1:2000"),
                ("PLEIADES_INGEST__URL", "http://127.0.0.1:9/x"),
                ("PLEIADES_INGEST__RESUME", "false"),
                ("PLEIADES_AGGREGATE__WORKERS", "5"),
                ("HOME", "/root"),
                ("PLEIADES_HOME", "/opt/pleiades"),
            ],
        )
        .unwrap();
        assert_eq!(config.web.listen.port(), 2000);
        assert_eq!(config.ingest.url, "http://127.0.0.1:9/x");
        assert!(!config.ingest.resume);
        assert_eq!(config.aggregate.workers, 5);
        let p = problems(load_toml("", &[("PLEIADES_INGEST__NOPE", "1")]));
        assert_eq!(p[0].key, "ingest.nope");
    }

    #[test]
    fn flags_override_and_contradictions_are_errors() {
        let config = load(&Sources {
            overrides: Overrides {
                only_role: Some(Role::Ingest),
                file_enable: true,
                file_dir: Some("/tmp/ev".into()),
                metrics_port: Some(9100),
                resume: Some(false),
                verbose: true,
                ..Overrides::default()
            },
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(config.roles(), vec![Role::Ingest]);
        assert_eq!(config.file.dir, PathBuf::from("/tmp/ev"));
        assert_eq!(config.metrics.listen.port(), 9100);
        assert!(!config.ingest.resume);
        assert_eq!(config.log.level, "debug");

        let p = problems(load(&Sources {
            overrides: Overrides {
                file_enable: true,
                kafka_enable: true,
                quiet: true,
                verbose: true,
                ..Overrides::default()
            },
            ..Sources::default()
        }));
        assert_named(&p, &["ingest.publisher", "log.level"]);
    }

    #[test]
    fn the_original_redis_and_listen_flags_select_redis_and_keep_the_url_secrets() {
        let flags = |redis_addr: Option<&str>, sentinel: bool, listen: Option<&str>| Overrides {
            only_role: Some(Role::Aggregate),
            redis_addr: redis_addr.map(str::to_owned),
            redis_use_sentinel: sentinel,
            listen_addr: listen.map(str::to_owned),
            ..Overrides::default()
        };
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(
            b"[redis]\nurl = \"rediss://:pw@old.example:6380/2\"\ncluster = [\"c:1\"]\n",
        )
        .unwrap();
        let with = |overrides: Overrides| {
            load(&Sources {
                file: Some(file.path()),
                overrides,
                ..Sources::default()
            })
        };
        let config = with(flags(Some("10.0.0.5:7000"), false, None)).unwrap();
        assert_eq!(config.store.kind, StoreKind::Redis);
        assert_eq!(config.redis.url, "rediss://:pw@10.0.0.5:7000/2");
        assert!(config.redis.cluster.is_empty() && config.redis.sentinels.is_empty());

        let config = with(flags(Some("[::1]:26379"), true, None)).unwrap();
        assert_eq!(config.redis.sentinels, vec!["[::1]:26379".to_owned()]);
        assert_eq!(config.redis.master_name, "mymaster");
        assert_eq!(config.redis.url, "rediss://:pw@old.example:6380/2");

        // The Sentinel flag alone: the original's default address, a sentinel's.
        let config = with(flags(None, true, None)).unwrap();
        assert_eq!(config.redis.sentinels, vec![ORIGINAL_REDIS_ADDR.to_owned()]);

        let config = with(flags(None, false, Some(":8088"))).unwrap();
        assert_eq!(config.web.listen, "0.0.0.0:8088".parse().unwrap());
        assert_eq!(
            config.store.kind,
            StoreKind::Embedded,
            "no Redis flag given"
        );
        let config = with(flags(None, false, Some("localhost:8089"))).unwrap();
        assert_eq!(config.web.listen, "127.0.0.1:8089".parse().unwrap());

        let p = problems(with(flags(Some("no-port"), false, Some("everywhere"))));
        assert_named(&p, &["redis.url", "web.listen"]);
        let p = problems(with(flags(Some("host:99999"), true, None)));
        assert_named(&p, &["redis.sentinels"]);
    }

    #[test]
    fn sentinel_and_cluster_keys_are_checked_by_key() {
        let redis = "[store]\nkind = \"redis\"\n[redis]\n";
        let p = problems(load_toml(
            &format!(
                "{redis}sentinels = [\"a:1\", \"b\"]\ncluster = [\"c:x\"]\nmaster_name = \"\"\n"
            ),
            &[],
        ));
        assert_named(
            &p,
            &["redis.sentinels", "redis.cluster", "redis.master_name"],
        );
        assert_eq!(p.len(), 4, "{p:?}");
        let config = load_toml(
            &format!(
                "{redis}sentinels = [\"s1:26379\", \"[::1]:26380\"]\nmaster_name = \"counters\"\n"
            ),
            &[],
        )
        .unwrap();
        assert_eq!(config.redis.sentinels.len(), 2);
        assert!(load_toml(
            &format!("{redis}cluster = [\"n1:7000\", \"n2:7001\"]\n"),
            &[]
        )
        .is_ok());
        let p = problems(load_toml(
            &format!("{redis}cluster = [\"n1:7000\"]\nurl = \"redis://x/3\"\n"),
            &[],
        ));
        assert_named(&p, &["redis.url"]);
    }

    #[test]
    fn kafka_keys_are_checked_by_key() {
        let kafka = "[ingest]\npublisher = \"kafka\"\n[kafka]\n";
        let p = problems(load_toml(
            &format!("{kafka}partitions = 0\nbuffer_bytes = 10\nquarantine_topic = \"pleiades-events\"\n[kafka.properties]\n\"group.id\" = \"mine\"\n"),
            &[],
        ));
        assert_named(
            &p,
            &[
                "kafka.partitions",
                "kafka.buffer_bytes",
                "kafka.quarantine_topic",
                "kafka.properties.group.id",
            ],
        );
        // A host that uses files never checks the Kafka section.
        assert!(load_toml("[kafka]\npartitions = 0\n", &[]).is_ok());
    }

    #[test]
    fn intake_and_relay_keys_are_checked_by_key() {
        // Beyond loopback without a token, or without the ingester to publish through.
        let p = problems(load_toml(
            "[ingest]\nenabled = false\nvalidate = \"strict\"\n[intake]\nlisten = \"0.0.0.0:8090\"\n",
            &[],
        ));
        assert_named(&p, &["ingest.validate"]);
        let p = problems(load_toml(
            "[ingest]\nenabled = false\n[intake]\nlisten = \"0.0.0.0:8090\"\nmax_body_bytes = 10\n[web]\nrelay_buffer_events = 1\n",
            &[],
        ));
        assert_named(
            &p,
            &[
                "intake.listen",
                "intake.token",
                "intake.max_body_bytes",
                "web.relay_buffer_events",
            ],
        );
        let p = problems(load_toml(
            "[intake]\nlisten = \"127.0.0.1:9000\"\n",
            &[("PLEIADES_INTAKE__TOKEN", "bad\ntoken")],
        ));
        assert_named(&p, &["intake.listen", "intake.token"]);
        // A token from the environment opens the way beyond loopback.
        let config = load_toml(
            "[intake]\nlisten = \"0.0.0.0:8090\"\n",
            &[("PLEIADES_INTAKE__TOKEN", "t0ken")],
        )
        .unwrap();
        assert_eq!(config.intake.token, "t0ken");
        // A relay on Kafka needs the Kafka section even on a host without Kafka roles.
        let p = problems(load_toml(
            "[ingest]\nenabled = false\n[aggregate]\nenabled = false\n[web]\nrelay_source = \"kafka\"\n[kafka]\nbrokers = \"\"\n",
            &[],
        ));
        assert_named(&p, &["kafka.brokers"]);
        assert!(load_toml(
            "[web]\nrelay_max_clients = 0\nrelay_source = \"kafka\"\n[kafka]\nbrokers = \"\"\n",
            &[]
        )
        .is_ok());
    }

    #[test]
    fn missing_file_names_its_path() {
        let err = load(&Sources {
            file: Some(Path::new("/nonexistent/pleiades.toml")),
            ..Sources::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/pleiades.toml"),
            "{err}"
        );
    }
}
