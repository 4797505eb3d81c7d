//! Test helpers: a scratch directory, free ports, typed configurations, the real daemon as a
//! child process, an in-process replay upstream, one deadline-bound wait, and an independent
//! reading of the bus.
#![allow(dead_code)]

pub mod dimensions;
pub mod hostile;
pub mod redis_ha;

use pleiades::config::Config;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Milliseconds, for configuration values.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A loopback address on `port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/events");

/// The binary under test: this build's, or another one named by `PLEIADES_TEST_BINARY` (to
/// run the same tests against an earlier build).
pub fn binary() -> PathBuf {
    std::env::var_os("PLEIADES_TEST_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pleiades")))
}

/// Everything one test owns: a directory and the processes and servers it started.
pub struct TestScope {
    pub dir: tempfile::TempDir,
    children: Vec<Child>,
    shutdown: CancellationToken,
}

impl TestScope {
    pub fn new() -> Self {
        TestScope {
            dir: tempfile::tempdir().expect("a scratch directory"),
            children: Vec::new(),
            shutdown: CancellationToken::new(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A loopback port the OS says is free now.
    pub fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    /// Starts `pleiades replay` in this process on a free port.
    pub async fn replay(
        &self,
        options: pleiades::replay::ReplayOptions,
    ) -> pleiades::replay::ReplayServer {
        pleiades::replay::serve(options, self.shutdown.clone())
            .await
            .expect("replay starts")
    }

    /// Writes `config` as pleiades.toml in the scratch directory.
    pub fn write_config(&self, config: &Config) -> PathBuf {
        self.write_config_as("pleiades.toml", config)
    }

    /// Writes `text` as `name` in the scratch directory: for files that must be wrong in ways a
    /// typed configuration cannot be.
    pub fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("file written");
        path
    }

    /// Writes `config` as `name` in the scratch directory: only the keys that differ from the
    /// defaults, as an operator would write it (and as any build that knows those keys reads).
    pub fn write_config_as(&self, name: &str, config: &Config) -> PathBuf {
        let path = self.path(name);
        let mut table = toml::Table::try_from(config).expect("a configuration serialises");
        let defaults = toml::Table::try_from(Config::default()).expect("defaults serialise");
        without_defaults(&mut table, &defaults);
        let text = toml::to_string(&table).expect("a configuration serialises");
        std::fs::write(&path, text).expect("config written");
        path
    }

    /// Starts the real binary with `args` in the scratch directory; logs go to `daemon-N.log`.
    pub fn spawn(&mut self, args: &[&str]) -> usize {
        self.spawn_with_env(args, &[])
    }

    /// [`TestScope::spawn`] with extra environment variables.
    pub fn spawn_with_env(&mut self, args: &[&str], env: &[(&str, &str)]) -> usize {
        let log = self.path(&format!("daemon-{}.log", self.children.len()));
        let log = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary())
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("pleiades starts");
        self.children.push(child);
        self.children.len() - 1
    }

    /// Starts the real binary with `args` in a user and mount namespace of its own
    /// (`unshare -Urm`) where each `(directory, bytes)` of `mounts` (relative to the scratch
    /// directory, created here) is a tmpfs of that size: a small file system the daemon can
    /// really fill. The test reaches those file systems through [`TestScope::inside`].
    pub fn spawn_with_small_disks(&mut self, mounts: &[(&str, u64)], args: &[&str]) -> usize {
        let mut script = String::new();
        for (dir, bytes) in mounts {
            std::fs::create_dir_all(self.path(dir)).expect("mount point");
            script.push_str(&format!("mount -t tmpfs -o size={bytes} tmpfs {dir} && "));
        }
        script.push_str("exec \"$0\" \"$@\"");
        let mut full = vec!["-Urm", "sh", "-c", &script, env!("CARGO_BIN_EXE_pleiades")];
        full.extend_from_slice(args);
        self.spawn_program("unshare", &full)
    }

    /// `path` (relative to the scratch directory) as child `n` sees it, through its mount
    /// namespace.
    pub fn inside(&self, n: usize, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.children[n].id())).join(
            self.path(path)
                .strip_prefix("/")
                .expect("an absolute scratch path"),
        )
    }

    /// Starts `program` with `args` in the scratch directory; logs go to `daemon-N.log`.
    pub fn spawn_program(&mut self, program: &str, args: &[&str]) -> usize {
        let log = self.path(&format!("daemon-{}.log", self.children.len()));
        let log = std::fs::File::create(&log).expect("log file");
        let child = Command::new(program)
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{program} starts: {e}"));
        self.children.push(child);
        self.children.len() - 1
    }

    pub fn child(&mut self, n: usize) -> &mut Child {
        &mut self.children[n]
    }

    /// Waits for one of two children started together to exit and returns `(winner, loser)`:
    /// the one still running, and the one that exited.
    pub async fn first_to_exit(
        &mut self,
        (a, b): (usize, usize),
        limit: Duration,
        what: &str,
    ) -> (usize, usize) {
        wait_until(limit, what, async || {
            if self.child(a).try_wait().ok().flatten().is_some() {
                Some((b, a))
            } else if self.child(b).try_wait().ok().flatten().is_some() {
                Some((a, b))
            } else {
                None
            }
        })
        .await
    }

    /// kill -9.
    pub fn kill9(&mut self, n: usize) {
        let child = &mut self.children[n];
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends SIGTERM and returns the exit code, waiting at most `limit`; `None` when it is
    /// still running then.
    pub async fn terminate(&mut self, n: usize, limit: Duration) -> Option<i32> {
        let child = &mut self.children[n];
        // SAFETY: kill(2) on the pid of a child this scope started and has not reaped.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let status = try_wait_until(limit, async || child.try_wait().ok().flatten()).await?;
        status.code()
    }

    pub fn logs(&self) -> String {
        let mut all = String::new();
        for n in 0..self.children.len() {
            all.push_str(
                &std::fs::read_to_string(self.path(&format!("daemon-{n}.log"))).unwrap_or_default(),
            );
        }
        all
    }
}

/// Removes from `table` every key whose value equals the one in `defaults`.
fn without_defaults(table: &mut toml::Table, defaults: &toml::Table) {
    table.retain(|key, value| match (value, defaults.get(key)) {
        (toml::Value::Table(inner), Some(toml::Value::Table(default))) => {
            without_defaults(inner, default);
            !inner.is_empty()
        }
        (value, Some(default)) => value != default,
        (_, None) => true,
    });
}

impl Drop for TestScope {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if std::thread::panicking() {
            // A failed test leaves its logs behind for whoever reads the failure.
            eprintln!(
                "--- logs of the failed test's processes ---\n{}",
                self.logs()
            );
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Default replay options for a test: the given files, loopback port 0, no faults.
pub fn replay_options(events: Vec<PathBuf>) -> pleiades::replay::ReplayOptions {
    pleiades::replay::ReplayOptions {
        events,
        listen: loopback(0),
        cut_after: None,
        rate: None,
        live: false,
        step_ms: 10,
        disorder_ms: 25,
        heartbeat: ms(200),
        throttle: 0,
        retry_after: 1,
        stall_after: None,
        stall_connections: 1,
        topic: "replay.mediawiki.recentchange".into(),
    }
}

/// An aggregate-only configuration (the bus in `./events`, no ingest, no web role), metrics
/// on `metrics_port`.
pub fn aggregate_config(metrics_port: u16) -> Config {
    let mut config = Config::default();
    config.ingest.enabled = false;
    config.web.enabled = false;
    config.metrics.listen = loopback(metrics_port);
    config
}

/// An ingest-only configuration pointed at `upstream`, quick to reconnect, metrics on
/// `metrics_port`.
pub fn ingest_config(upstream: SocketAddr, metrics_port: u16) -> Config {
    let mut config = Config::default();
    config.ingest.url = format!("http://{upstream}/v2/stream/recentchange");
    config.ingest.user_agent = "pleiades-tests/1.0 (test suite)".into();
    config.ingest.resume_rewind = ms(100);
    config.ingest.backoff_initial = ms(50);
    config.ingest.backoff_max = ms(500);
    config.ingest.stall_timeout = Duration::from_secs(5);
    // Retention ages segments in event time, and the recorded events span years: tests that
    // read the bus afterwards keep everything unless they ask for a retention.
    config.file.retention = Duration::from_secs(100 * 365 * 86_400);
    config.aggregate.enabled = false;
    config.web.enabled = false;
    config.metrics.listen = loopback(metrics_port);
    config
}

/// Every role on one host: ingest from `upstream`, quick aggregation into the embedded store,
/// and the web role on `web_port`.
pub fn all_roles_config(upstream: SocketAddr, metrics_port: u16, web_port: u16) -> Config {
    let mut config = ingest_config(upstream, metrics_port);
    config.aggregate.enabled = true;
    config.aggregate.batch_delay = ms(50);
    config.aggregate.poll_interval = ms(20);
    config.web.enabled = true;
    config.web.listen = loopback(web_port);
    config
}

/// Polls `check` every 25 ms until it returns Some, or panics naming `what` after `limit`.
pub async fn wait_until<T>(
    limit: Duration,
    what: &str,
    check: impl AsyncFnMut() -> Option<T>,
) -> T {
    match try_wait_until(limit, check).await {
        Some(value) => value,
        None => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Polls `check` every 25 ms until it returns Some, or gives up with None after `limit`.
pub async fn try_wait_until<T>(
    limit: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(ms(25)).await;
    }
}

/// Scrapes /metrics until `metric` satisfies `accept`, or panics after `limit`.
pub async fn wait_for_metric(
    port: u16,
    metric: &str,
    limit: Duration,
    accept: impl Fn(f64) -> bool,
) -> f64 {
    wait_until(limit, metric, async || {
        scrape(port)
            .await
            .and_then(|m| m.get(metric).copied())
            .filter(|v| accept(*v))
    })
    .await
}

/// Requests the API refuses, with their status (the recorded days are all in the past, so
/// `/api/stats`, today, has no data). Every one answers a JSON body `{"error": …}`.
pub const API_ERRORS: &[(&str, u16)] = &[
    ("/api/stats/abc", 400),
    ("/api/stats/12.5", 400),
    ("/api/stats/1", 404),
    ("/api/stats", 404),
    ("/api/range?from=x", 400),
    ("/api/range?from=20&to=10", 400),
    ("/api/range?from=0&to=99999", 400),
    ("/api/coverage?to=y", 400),
    ("/api/coverage?from=20&to=10", 400),
    ("/api/nothing", 404),
];

/// The counters of an original-API body (`{"since", "counters": [{"name","description","value"}]}`)
/// by name, checking that each has a description.
pub fn counters_of(body: &serde_json::Value) -> std::collections::BTreeMap<String, i64> {
    body["counters"]
        .as_array()
        .unwrap_or_else(|| panic!("no counter list in {body}"))
        .iter()
        .map(|c| {
            assert!(
                c["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{c} has no description"
            );
            let name = c["name"].as_str().expect("a name").to_owned();
            (name, c["value"].as_i64().expect("an integer value"))
        })
        .collect()
}

/// Opens a store the way the daemon does, with metrics of its own.
pub async fn open_store(settings: &pleiades::config::StoreSettings) -> pleiades::store::Store {
    let metrics = pleiades::metrics::Metrics::new(1).expect("metrics");
    pleiades::store::Store::open(settings, metrics.store.clone())
        .await
        .expect("the store opens")
}

/// The segment files of a bus directory in write order, one per number: plain
/// (`segment-N.jsonl`) or compressed (`segment-N.jsonl.zst`), found independently of the library.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.starts_with("segment-")
                    && (name.ends_with(".jsonl") || name.ends_with(".jsonl.zst"))
            })
            .collect(),
        Err(_) => return Vec::new(),
    };
    names.sort();
    // A segment being compressed has both forms for an instant: keep the compressed one.
    names.reverse();
    names.dedup_by_key(|p| {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_owned();
        name.trim_end_matches(".zst").to_owned()
    });
    names.reverse();
    names
}

/// The content of a segment file, decompressed with the standard zstd decoder when it is
/// compressed (which passes over the seek table); empty when it vanished meanwhile.
pub fn segment_text(path: &Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.ends_with(".zst") {
        return match std::fs::File::open(path) {
            Ok(file) => String::from_utf8(zstd::stream::decode_all(file).expect("a zstd segment"))
                .expect("UTF-8 segment"),
            Err(_) => String::new(),
        };
    }
    match std::fs::read_to_string(path) {
        Ok(text) => text,
        // Compressed since it was listed.
        Err(_) => {
            let packed = PathBuf::from(format!("{}.zst", path.display()));
            if packed.exists() {
                segment_text(&packed)
            } else {
                String::new()
            }
        }
    }
}

/// Every bus line, in order, read independently of the library: (SSE id, meta.id).
pub fn bus_lines(dir: &Path) -> Vec<(String, String)> {
    let mut lines = Vec::new();
    for name in segment_files(dir) {
        let text = segment_text(&name);
        for line in text.split_inclusive('\n') {
            if !line.ends_with('\n') {
                continue; // a partial line does not count yet
            }
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("{}: unreadable bus line {line:?}: {e}", name.display())
            });
            let id = v["id"].as_str().expect("id is a string").to_owned();
            let meta_id = v["data"]["meta"]["id"]
                .as_str()
                .expect("meta.id")
                .to_owned();
            lines.push((id, meta_id));
        }
    }
    lines
}

/// The meta.ids a clean pass over `lines` must deliver: valid events (a JSON object whose
/// meta.dt parses), each id once. Computed here with serde_json and chrono-free parsing rules.
pub fn expected_ids(lines: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut ids = Vec::new();
    for line in lines {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(dt) = v
            .get("meta")
            .and_then(|m| m.get("dt"))
            .and_then(|d| d.as_str())
        else {
            continue;
        };
        if !looks_like_rfc3339(dt) {
            continue;
        }
        let id = v["meta"]["id"]
            .as_str()
            .expect("test events carry meta.id")
            .to_owned();
        if seen.insert(id.clone()) {
            ids.push(id);
        }
    }
    ids
}

fn looks_like_rfc3339(dt: &str) -> bool {
    let b = dt.as_bytes();
    b.len() >= 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':' && b[16] == b':'
}

/// Both recorded files, line by line.
pub fn recorded_lines() -> Vec<String> {
    let mut lines = Vec::new();
    for file in [
        "recentchange-2022-2026.jsonl",
        "recentchange-2018-wikidata.jsonl",
    ] {
        let text = std::fs::read_to_string(Path::new(DATA).join(file)).expect("recorded events");
        lines.extend(text.lines().map(str::to_owned));
    }
    lines
}

/// The recorded events with bad data mixed in: repeats, canaries, non-JSON, non-objects and
/// events without a time. Returns the lines and how many of them are invalid.
pub fn mixed_lines() -> (Vec<String>, usize) {
    let recorded = recorded_lines();
    let mut lines = Vec::new();
    let mut invalid = 0;
    for (n, line) in recorded.iter().enumerate() {
        lines.push(line.clone());
        match n % 500 {
            7 => lines.push(recorded[n / 2].clone()), // a repeat of an earlier event
            101 => {
                lines.push(format!(r#"{{"meta":{{"id":"canary-{n}","dt":"2024-05-01T00:00:00Z","domain":"canary"}},"type":"edit"}}"#));
            }
            202 => {
                lines.push(format!("not json at all {n}"));
                invalid += 1;
            }
            303 => {
                lines.push("[1,2,3]".to_owned());
                invalid += 1;
            }
            404 => {
                lines.push(format!(r#"{{"meta":{{"id":"no-dt-{n}"}},"type":"edit"}}"#));
                invalid += 1;
            }
            _ => {}
        }
    }
    (lines, invalid)
}

/// Scrapes /metrics and returns `name{labels} value` lines as a map.
pub async fn scrape(port: u16) -> Option<HashMap<String, f64>> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_owned(), v)))
            .collect(),
    )
}

/// Asserts the bus holds exactly `expected`, each once, in any order.
pub fn assert_exactly_once(bus: &[(String, String)], expected: &[String]) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (_, id) in bus {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(doubled.is_empty(), "events doubled on the bus: {doubled:?}");
    let missing: Vec<_> = expected
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "events missing from the bus: {missing:?} (bus has {})",
        bus.len()
    );
    assert_eq!(
        bus.len(),
        expected.len(),
        "the bus holds events that were not expected"
    );
}

/// A real `redis-server` on a free loopback port, with AOF when asked, in the scratch directory.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    aof: bool,
    child: Option<Child>,
    tls: Option<RedisTls>,
    /// More `redis-server` arguments (replication, cluster mode).
    extra: Vec<String>,
}

/// A Redis that speaks only TLS and wants a password.
#[derive(Debug, Clone)]
pub struct RedisTls {
    /// The authority that signed the server's certificate (PEM).
    pub ca_file: PathBuf,
    pub password: String,
}

/// Makes a certificate authority and a server certificate for 127.0.0.1 in `dir` with openssl.
fn make_certificates(dir: &Path) -> PathBuf {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs (scripts/install-test-deps installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=pleiades test authority",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("extensions");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    dir.join("ca.pem")
}

impl RedisServer {
    pub async fn start(scope: &TestScope, aof: bool) -> RedisServer {
        Self::start_with(scope, aof, None).await
    }

    /// A Redis that accepts only TLS connections (certificates made for the test) and
    /// requires `password`.
    pub async fn start_tls(scope: &TestScope, password: &str) -> RedisServer {
        let dir = scope.path(&format!("redis-tls-{}", TestScope::free_port()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let ca_file = make_certificates(&dir);
        let tls = RedisTls {
            ca_file,
            password: password.to_owned(),
        };
        Self::start_with(scope, false, Some(tls)).await
    }

    /// A server started with more `redis-server` arguments.
    pub async fn start_with_args(scope: &TestScope, aof: bool, extra: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            port: TestScope::free_port(),
            dir: scope.path(&format!("redis-{}", TestScope::free_port())),
            aof,
            child: None,
            tls: None,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
        };
        std::fs::create_dir_all(&server.dir).expect("redis dir");
        server.launch().await;
        server
    }

    /// Starts it again after [`RedisServer::stop`], with other extra arguments.
    pub async fn start_again_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|a| (*a).to_owned()).collect();
        self.launch().await;
    }

    /// Sends `signal` to the running server (SIGSTOP to freeze it, SIGCONT to let it go on).
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on the pid of a child this server started and has not reaped.
            unsafe {
                libc::kill(child.id() as i32, signal);
            }
        }
    }

    async fn start_with(scope: &TestScope, aof: bool, tls: Option<RedisTls>) -> RedisServer {
        let dir = match &tls {
            Some(tls) => tls.ca_file.parent().expect("a directory").to_owned(),
            None => scope.path(&format!("redis-{}", TestScope::free_port())),
        };
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut server = RedisServer {
            port: TestScope::free_port(),
            dir,
            aof,
            child: None,
            tls,
            extra: Vec::new(),
        };
        server.launch().await;
        server
    }

    /// The TLS settings, for a TLS server.
    pub fn tls(&self) -> Option<&RedisTls> {
        self.tls.as_ref()
    }

    pub fn url(&self) -> String {
        match &self.tls {
            Some(tls) => format!("rediss://:{}@127.0.0.1:{}/", tls.password, self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    async fn launch(&mut self) {
        let port = self.port.to_string();
        let mut args = vec![
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--protected-mode",
            "no",
        ];
        match &self.tls {
            Some(tls) => args.extend([
                "--port",
                "0",
                "--tls-port",
                port.as_str(),
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
                "--tls-ca-cert-file",
                "ca.pem",
                "--tls-auth-clients",
                "no",
                "--requirepass",
                tls.password.as_str(),
            ]),
            None => args.extend(["--port", port.as_str()]),
        }
        if self.aof {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"]);
        }
        args.extend(self.extra.iter().map(String::as_str));
        let child = Command::new("redis-server")
            .args(&args)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (apt-get install redis-server)");
        self.child = Some(child);
        let what = format!("redis-server at {} to answer", self.url());
        wait_until(Duration::from_secs(20), &what, async || {
            self.query(&["PING"]).await.map(|_| ())
        })
        .await;
    }

    /// kill -9, then start again on the same port and directory (AOF replays what was synced).
    pub async fn crash_and_restart(&mut self) {
        self.stop();
        self.launch().await;
    }

    /// kill -9, leaving it down.
    pub fn stop(&mut self) {
        kill_child(&mut self.child);
    }

    /// Starts it again after [`RedisServer::stop`].
    pub async fn start_again(&mut self) {
        self.launch().await;
    }

    /// One command; None when the server does not answer.
    pub async fn query(&self, args: &[&str]) -> Option<redis::Value> {
        let ca_file = self.tls.as_ref().map(|t| t.ca_file.as_path());
        redis_query(&self.url(), ca_file, args).await
    }

    /// `INFO commandstats` as command → calls.
    pub async fn command_calls(&self) -> HashMap<String, u64> {
        let Some(redis::Value::VerbatimString { text, .. } | redis::Value::SimpleString(text)) =
            self.query(&["INFO", "commandstats"])
                .await
                .map(|v| match v {
                    redis::Value::BulkString(b) => {
                        redis::Value::SimpleString(String::from_utf8_lossy(&b).into_owned())
                    }
                    other => other,
                })
        else {
            panic!("INFO commandstats answered");
        };
        text.lines()
            .filter_map(|l| l.strip_prefix("cmdstat_"))
            .filter_map(|l| {
                let (name, rest) = l.split_once(':')?;
                let calls = rest
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls="))?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// One command to the Redis (or sentinel) at `url`, over TLS with the authorities of `ca_file`
/// for `rediss://`; None when it does not answer.
pub async fn redis_query(url: &str, ca_file: Option<&Path>, args: &[&str]) -> Option<redis::Value> {
    let info = pleiades::store::redis::connection_info(url, ca_file).ok()?;
    let client = redis::Client::open(info).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(&mut conn).await.ok()
}

/// kill -9 of a server the test started, and waiting for it to be gone.
fn kill_child(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Counters per day and all-time, as the test computes them; with the further dimensions'
/// exact answers (per-hour counters, the editors of each day and family, the counts of each
/// page and editor per day, family and list) when the oracle computed them.
#[derive(Debug, Default, PartialEq)]
pub struct Expected {
    pub days: std::collections::BTreeMap<i64, std::collections::BTreeMap<String, i64>>,
    pub all_time: std::collections::BTreeMap<String, i64>,
    pub events: u64,
    pub hours: std::collections::BTreeMap<i64, std::collections::BTreeMap<String, i64>>,
    pub editors: std::collections::BTreeMap<(i64, String), std::collections::BTreeSet<String>>,
    pub top:
        std::collections::BTreeMap<(i64, String, String), std::collections::BTreeMap<String, i64>>,
}

/// The events a clean pass delivers, in order: valid, non-canary, each meta.id once.
pub fn delivered(lines: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for line in lines {
        if let Some(v) = deliverable(line, &mut seen) {
            if v["meta"]["domain"] != "canary" {
                out.push(line.clone());
            }
        }
    }
    out
}

/// The event of `line` when it is valid and its meta.id was not seen before.
fn deliverable(
    line: &str,
    seen: &mut std::collections::HashSet<String>,
) -> Option<serde_json::Value> {
    let v = serde_json::from_str::<serde_json::Value>(line).ok()?;
    if !v.is_object() {
        return None;
    }
    let dt = v["meta"]["dt"].as_str()?;
    chrono::DateTime::parse_from_rfc3339(dt).ok()?;
    if let Some(length) = v["length"].as_object() {
        // A numeric side must be a page length (0 to 2^32-1), else the event is invalid.
        let page_length = |side: &str| match length.get(side) {
            Some(serde_json::Value::Number(n)) => n.as_u64().is_some_and(|n| n <= u32::MAX as u64),
            _ => true,
        };
        if !page_length("old") || !page_length("new") {
            return None;
        }
    }
    if let Some(id) = v["meta"]["id"].as_str() {
        if !seen.insert(id.to_owned()) {
            return None;
        }
    }
    Some(v)
}

/// An independent recomputation of SPEC §5 and of the further dimensions (README.md's rules)
/// over the events a clean pass delivers: valid, non-canary, each meta.id once. Written from
/// the contract, not from the library's code.
pub fn oracle(lines: &[String]) -> Expected {
    let mut expected = Expected::default();
    let mut seen = std::collections::HashSet::new();
    for line in lines {
        let Some(v) = deliverable(line, &mut seen) else {
            continue;
        };
        let Some(dt) = v["meta"]["dt"].as_str() else {
            continue;
        };
        let Ok(time) = chrono::DateTime::parse_from_rfc3339(dt) else {
            continue;
        };
        if v["meta"]["domain"] == "canary" {
            continue;
        }
        let day = time.timestamp_millis().div_euclid(86_400_000);
        let mut add = |name: String, delta: i64| {
            *expected
                .days
                .entry(day)
                .or_default()
                .entry(name.clone())
                .or_default() += delta;
            *expected.all_time.entry(name).or_default() += delta;
        };
        add("pleiades_total".into(), 1);
        if let Some(wiki) = v["wiki"].as_str().filter(|w| !w.is_empty()) {
            add(format!("pleiades_wiki_{wiki}"), 1);
        }
        match &v["type"] {
            serde_json::Value::String(t) if !t.is_empty() => add(format!("pleiades_type_{t}"), 1),
            serde_json::Value::Number(n) if n.is_i64() => add(format!("pleiades_type_{n}"), 1),
            _ => {}
        }
        if v["bot"] == true {
            add("pleiades_bot".into(), 1);
        }
        if v["minor"] == true {
            add("pleiades_minor".into(), 1);
        }
        if let Some(length) = v["length"].as_object() {
            let old = length.get("old").and_then(|x| x.as_i64()).unwrap_or(0);
            let new = length.get("new").and_then(|x| x.as_i64()).unwrap_or(0);
            if new > old {
                add("pleiades_length_inc".into(), 1);
            }
            if new < old {
                add("pleiades_length_dec".into(), 1);
            }
            add("pleiades_growth".into(), new - old);
        }
        dimensions::add(&mut expected, &v, day, time.timestamp_millis());
        expected.events += 1;
    }
    expected
}

/// Reads every day and the all-time counters from a store.
pub async fn stored(store: &pleiades::store::Store) -> Expected {
    let mut found = Expected::default();
    for day in store.days().await.expect("days") {
        let counters = store
            .day(day)
            .await
            .expect("a day")
            .expect("a listed day has data");
        found.days.insert(day, counters);
    }
    found.all_time = store.all_time().await.expect("all-time");
    found.events = found.all_time.get("pleiades_total").copied().unwrap_or(0) as u64;
    found
}

/// Compares stored counters with the oracle, counter by counter, naming the first difference.
pub fn assert_counters_equal(found: &Expected, expected: &Expected) {
    assert_eq!(
        found.days.keys().collect::<Vec<_>>(),
        expected.days.keys().collect::<Vec<_>>(),
        "days differ"
    );
    for (day, counters) in &expected.days {
        let got = &found.days[day];
        for (name, value) in counters {
            assert_eq!(got.get(name), Some(value), "day {day}, counter {name}");
        }
        assert_eq!(
            got.len(),
            counters.len(),
            "day {day} has unexpected counters"
        );
    }
    assert_eq!(
        found.all_time, expected.all_time,
        "all-time counters differ"
    );
}

/// `count` events made from the recorded ones, each with a new meta.id and a meta.dt spread over
/// `days` days, so that volume tests exercise many days and never repeat an id.
pub fn synthetic_events(count: usize, days: i64) -> Vec<String> {
    // From 2026-01-01T00:00:00Z, 7,919 s apart (wrapping round the span).
    events_within(count, 1_767_225_600_000, days * 86_400_000, 7_919_000)
}

/// `count` events made from the recorded ones, each with a new meta.id and a meta.dt in
/// `[base_ms, base_ms + span_ms)`, `step_ms` apart wrapping round the span.
pub fn events_within(count: usize, base_ms: i64, span_ms: i64, step_ms: i64) -> Vec<String> {
    let span = span_ms.max(1);
    synthetic_events_at(count, |i| base_ms + (i as i64 * step_ms) % span)
}

/// `count` events made from the recorded ones, event `i` re-stamped with meta.id
/// `synthetic-<i>` and meta.dt `time_ms(i)`. They carry upstream positions as a real stream's
/// do: one topic-partition, offsets consecutive in the order of their times, so that a
/// complete set of synthetic events is a complete stream.
pub fn synthetic_events_at(count: usize, time_ms: impl Fn(usize) -> i64) -> Vec<String> {
    let recorded = recorded_lines();
    let times: Vec<i64> = (0..count).map(time_ms).collect();
    let mut order: Vec<usize> = (0..count).collect();
    order.sort_by_key(|i| (times[*i], *i));
    let mut offsets = vec![0u64; count];
    for (offset, i) in order.into_iter().enumerate() {
        offsets[i] = offset as u64;
    }
    (0..count)
        .map(|i| {
            let mut v: serde_json::Value =
                serde_json::from_str(&recorded[i % recorded.len()]).expect("recorded JSON");
            let dt = chrono::DateTime::from_timestamp_millis(times[i])
                .expect("a time")
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            v["meta"]["id"] = serde_json::Value::from(format!("synthetic-{i}"));
            v["meta"]["dt"] = serde_json::Value::from(dt);
            v["meta"]["topic"] = serde_json::Value::from("eqiad.mediawiki.recentchange");
            v["meta"]["partition"] = serde_json::Value::from(0);
            v["meta"]["offset"] = serde_json::Value::from(offsets[i]);
            v.to_string()
        })
        .collect()
}

/// Writes events straight onto the file bus, as the ingester would, in one segment.
pub fn write_bus(dir: &Path, events: &[String]) {
    std::fs::create_dir_all(dir).expect("bus dir");
    let mut text = String::new();
    for (i, event) in events.iter().enumerate() {
        text.push_str(&format!(
            "{{\"id\":\"[{{\\\"offset\\\":{i}}}]\",\"data\":{event}}}\n"
        ));
    }
    std::fs::write(dir.join("segment-00000000000000000001.jsonl"), text).expect("segment written");
}

/// A real Kafka-protocol broker (`nisshi`, built by `scripts/test`) on a free loopback port,
/// keeping its log in SQLite under the scratch directory so that it survives its own restart.
pub struct KafkaBroker {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    starts: usize,
}

impl KafkaBroker {
    pub async fn start(scope: &TestScope) -> KafkaBroker {
        let port = TestScope::free_port();
        let dir = scope.path(&format!("kafka-{port}"));
        std::fs::create_dir_all(dir.join("data")).expect("broker dir");
        let mut broker = KafkaBroker {
            port,
            dir,
            child: None,
            starts: 0,
        };
        broker.launch().await;
        broker
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn launch(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(self.dir.join(format!("broker-{}.log", self.starts)))
            .expect("broker log");
        self.starts += 1;
        let child = Command::new(std::env::var("NISSHI").unwrap_or_else(|_| "nisshi".into()))
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                // The path is relative to the broker's working directory.
                "--storage-engine",
                "sqlite://data/broker.db",
            ])
            .current_dir(&self.dir)
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("nisshi starts (scripts/test installs it)");
        self.child = Some(child);
        let addr: SocketAddr = self.brokers().parse().expect("an address");
        let what = format!("the Kafka broker on {addr} to start");
        wait_until(Duration::from_secs(30), &what, async || {
            std::net::TcpStream::connect_timeout(&addr, ms(200))
                .ok()
                .map(|_| ())
        })
        .await;
    }

    /// kill -9, leaving it down.
    pub fn stop(&mut self) {
        kill_child(&mut self.child);
    }

    /// Starts it again on the same port and storage.
    pub async fn start_again(&mut self) {
        self.launch().await;
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Points `config` at the broker(s) `brokers` with the tests' topic settings: four partitions,
/// one replica, reconnections within half a second.
pub fn use_test_brokers(config: &mut Config, brokers: &str) {
    config.kafka.brokers = brokers.to_owned();
    config.kafka.partitions = 4;
    config.kafka.replication_factor = 1;
    config
        .kafka
        .properties
        .insert("reconnect.backoff.max.ms".into(), "500".into());
}

/// Waits until the aggregator workers of the host whose metrics are on `port` own `partitions`
/// partitions between them.
pub async fn wait_for_partitions(port: u16, workers: usize, partitions: f64, limit: Duration) {
    let what = format!("{partitions} partitions owned by the workers on :{port}");
    wait_until(limit, &what, async || {
        let owned: f64 = scrape(port).await.map(|m| {
            (0..workers)
                .filter_map(|w| {
                    m.get(&format!(
                        "pleiades_kafka_assigned_partitions{{worker=\"{w}\"}}"
                    ))
                })
                .sum()
        })?;
        (owned == partitions).then_some(())
    })
    .await;
}

/// One message read back from a topic.
#[derive(Debug, Clone)]
pub struct TopicMessage {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: String,
    pub headers: HashMap<String, String>,
}

fn topic_reader(brokers: &str) -> rdkafka::consumer::BaseConsumer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "pleiades-tests-reader")
        .set("enable.auto.commit", "false")
        // Committed messages only; the end of a partition is reported, as its last offsets
        // may be transaction markers.
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .expect("a consumer")
}

/// Each partition of `topic` with messages: (partition, first offset, end offset).
fn topic_extent(consumer: &rdkafka::consumer::BaseConsumer, topic: &str) -> Vec<(i32, i64, i64)> {
    use rdkafka::consumer::Consumer;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|partition| {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition.id(), Duration::from_secs(10))
                .expect("watermarks");
            (partition.id(), low, high)
        })
        .filter(|(_, low, high)| high > low)
        .collect()
}

/// How many offsets `topic` holds, from its partitions' watermarks (nothing is read): messages
/// and transaction markers.
pub fn topic_len(brokers: &str, topic: &str) -> i64 {
    topic_extent(&topic_reader(brokers), topic)
        .iter()
        .map(|(_, low, high)| high - low)
        .sum()
}

/// Reads every message of `topic`, from the start of each partition to its current end, with a
/// consumer of its own (no group, nothing committed).
pub fn read_topic(brokers: &str, topic: &str) -> Vec<TopicMessage> {
    use rdkafka::consumer::Consumer;
    use rdkafka::message::{Headers, Message};
    let consumer = topic_reader(brokers);
    let mut assignment = rdkafka::TopicPartitionList::new();
    let mut ends = HashMap::new();
    for (partition, low, high) in topic_extent(&consumer, topic) {
        assignment
            .add_partition_offset(topic, partition, rdkafka::Offset::Offset(low))
            .expect("assignment");
        ends.insert(partition, high);
    }
    let mut messages = Vec::new();
    if ends.is_empty() {
        return messages;
    }
    consumer.assign(&assignment).expect("assign");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    while !ends.is_empty() {
        assert!(Instant::now() < deadline, "reading {topic} took too long");
        let Some(result) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        if let Err(rdkafka::error::KafkaError::PartitionEOF(partition)) = &result {
            ends.remove(partition);
            continue;
        }
        let m = result.expect("a message");
        let mut headers = HashMap::new();
        if let Some(h) = m.headers() {
            for header in h.iter() {
                headers.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        messages.push(TopicMessage {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            value: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            headers,
        });
        if ends
            .get(&m.partition())
            .is_some_and(|end| m.offset() + 1 >= *end)
        {
            ends.remove(&m.partition());
        }
    }
    println!(
        "read {} messages of {topic} in {:?}",
        messages.len(),
        started.elapsed()
    );
    messages
}

/// Fills the file system holding `dir` with a ballast file until it refuses more; returns the
/// ballast's path (remove it to give the space back).
pub fn fill_disk(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("ballast");
    let mut file = std::fs::File::create(&path).expect("ballast file");
    let block = vec![0u8; 64 * 1024];
    loop {
        match file.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(28), "the disk is full (ENOSPC): {e}");
                break;
            }
        }
    }
    let _ = file.sync_all();
    path
}

/// Whether this machine lets an unprivileged process make a user and mount namespace.
pub fn namespaces_work() -> bool {
    Command::new("unshare")
        .args(["-Urm", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// `/readyz` on `port`: the status and the body.
pub async fn readyz(port: u16) -> (u16, String) {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .expect("readyz answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// Log text without its terminal colour sequences.
pub fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A process's resident memory in bytes, from /proc.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_kb(pid, "VmRSS:").map(|kb| kb * 1024)
}

/// The most resident memory a process has had, in bytes (VmHWM, the high-water mark).
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    status_kb(pid, "VmHWM:").map(|kb| kb * 1024)
}

fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// How many file descriptors a process has open, from /proc.
pub fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}
