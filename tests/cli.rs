//! The command line: configuration errors name their key and exit 2, `check-config`, the
//! original flags, and a clean exit 0 on SIGTERM.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

fn pleiades(scope: &TestScope, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .current_dir(scope.dir.path())
        .envs(env.iter().copied())
        .output()
        .expect("pleiades runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_the_shipped_file_and_the_defaults() {
    let scope = TestScope::new();
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/pleiades.toml");
    let (code, out, err) = pleiades(&scope, &["check-config", "--config", shipped], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("configuration OK"), "{out}");
    // No --config and no ./pleiades.toml: the built-in defaults.
    let (code, out, _) = pleiades(&scope, &["check-config"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("built-in defaults"), "{out}");
}

#[test]
fn pleiades_config_names_the_file_when_no_flag_does() {
    let scope = TestScope::new();
    scope.write_file("elsewhere.toml", "[web]\nlisten = \"nowhere\"\n");
    // The variable is read in place of ./pleiades.toml, for the original personalities too.
    for args in [&["check-config"][..], &["ingest"][..]] {
        let (code, _, err) = pleiades(&scope, args, &[("PLEIADES_CONFIG", "elsewhere.toml")]);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("elsewhere.toml") && err.contains("web.listen"),
            "{err}"
        );
    }
    // --config wins over it.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/pleiades.toml");
    let (code, out, err) = pleiades(
        &scope,
        &["check-config", "--config", shipped],
        &[("PLEIADES_CONFIG", "elsewhere.toml")],
    );
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn every_problem_is_reported_with_its_key_and_exit_2() {
    let scope = TestScope::new();
    scope.write_file(
        "pleiades.toml",
        "[ingest]\nurll = \"x\"\nstall_timeout = \"never\"\n[web]\nlisten = \"localhost\"\n[shop]\nopen = true\n",
    );
    let (code, _, err) = pleiades(
        &scope,
        &["check-config", "--config", "pleiades.toml"],
        &[("PLEIADES_FILE__SEGMENT_BYTES", "12")],
    );
    assert_eq!(code, 2, "{err}");
    for key in [
        "ingest.urll",
        "ingest.stall_timeout",
        "web.listen",
        "shop",
        "file.segment_bytes",
    ] {
        assert!(
            err.contains(&format!("  {key}:")),
            "{key} not named in:\n{err}"
        );
    }
    // The daemon refuses to start on the same file, with the same exit code.
    let (code, _, _) = pleiades(&scope, &["--config", "pleiades.toml"], &[]);
    assert_eq!(code, 2);
}

#[test]
fn contradictory_flags_exit_2() {
    let scope = TestScope::new();
    let (code, _, err) = pleiades(&scope, &["ingest", "--file.enable", "--kafka.enable"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ingest.publisher"), "{err}");
    let (code, _, err) = pleiades(&scope, &["ingest", "-q", "-v", "check-config"], &[]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = pleiades(&scope, &["-q", "-v", "check-config"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("log.level"), "{err}");
    let (code, _, err) = pleiades(&scope, &["--config", "missing.toml"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing.toml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_ingest_personality_and_flags_work() {
    let mut scope = TestScope::new();
    let lines: Vec<String> = recorded_lines().into_iter().take(50).collect();
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).unwrap();
    let replay = scope.replay(replay_options(vec![events])).await;
    let metrics = TestScope::free_port().to_string();
    let url = format!("http://{}/v2/stream/recentchange", replay.addr);
    let daemon = scope.spawn_with_env(
        &[
            "ingest",
            "--file.enable",
            "--file.publishDir",
            "legacy-events",
            "--metricsPort",
            &metrics,
            "-r=false",
        ],
        &[("PLEIADES_INGEST__URL", url.as_str())],
    );
    let dir = scope.path("legacy-events");
    wait_until(
        Duration::from_secs(30),
        "events in --file.publishDir",
        async || (bus_lines(&dir).len() == 50).then_some(()),
    )
    .await;
    let port: u16 = metrics.parse().unwrap();
    let published = wait_for_metric(
        port,
        "pleiades_file_publish_events_total",
        Duration::from_secs(10),
        |v| v == 50.0,
    )
    .await;
    assert_eq!(published, 50.0);
    let started = std::time::Instant::now();
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    println!("SIGTERM to exit: {:?}", started.elapsed());
    assert!(
        scope.logs().contains("ingester stopped; events synced"),
        "{}",
        scope.logs()
    );
}

#[test]
fn replay_without_events_is_a_usage_error() {
    let scope = TestScope::new();
    let (code, _, err) = pleiades(&scope, &["replay"], &[]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = pleiades(
        &scope,
        &[
            "replay",
            "--events",
            "nope.jsonl",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nope.jsonl"), "{err}");
}

#[test]
fn a_redis_url_is_never_printed_with_its_password() {
    let scope = TestScope::new();
    for (n, url) in [
        "rediss://:hunter2-s3cret@[::1:6379/0",
        "redis://user:hunter2-s3cret@127.0.0.1:notaport/",
        "http://:hunter2-s3cret@127.0.0.1:6379/",
    ]
    .iter()
    .enumerate()
    {
        let mut config = pleiades::config::Config::default();
        config.store.kind = pleiades::config::StoreKind::Redis;
        config.redis.url = (*url).to_owned();
        let name = format!("redis-{n}.toml");
        scope.write_config_as(&name, &config);
        let (code, out, err) = pleiades(&scope, &["check-config", "--config", &name], &[]);
        assert_eq!(code, 2, "{url}: {out}{err}");
        assert!(err.contains("  redis.url:"), "{url}: {err}");
        assert!(!format!("{out}{err}").contains("hunter2"), "{url}: {err}");
    }
}

/// Waits until the store at `settings` holds `expected`'s events, then compares every counter.
async fn wait_for_counters(settings: &pleiades::config::StoreSettings, expected: &Expected) {
    let store = open_store(settings).await;
    wait_until(Duration::from_secs(60), "the events counted", async || {
        let all = store.all_time().await.ok()?;
        (all.get("pleiades_total").copied() == Some(expected.events as i64)).then_some(())
    })
    .await;
    assert_counters_equal(&stored(&store).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs redis-server and nisshi (scripts/test)"
)]
async fn the_original_aggregate_and_frontend_command_lines_use_their_redis_addresses() {
    use common::redis_ha::{SentinelGroup, MASTER_NAME};
    use pleiades::config::{RedisConfig, StoreSettings};
    let mut scope = TestScope::new();
    let broker = KafkaBroker::start(&scope).await;
    let plain = RedisServer::start(&scope, false).await;
    // One master and one sentinel, which the original addressed with --redis-addr.
    let group = SentinelGroup::start(&scope, 1, false).await;
    let lines: Vec<String> = recorded_lines().into_iter().take(50).collect();
    let expected = oracle(&lines);
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).unwrap();
    let replay = scope.replay(replay_options(vec![events])).await;
    let url = format!("http://{}/v2/stream/recentchange", replay.addr);
    let brokers = broker.brokers();
    let one_replica = ("PLEIADES_KAFKA__REPLICATION_FACTOR", "1");
    let port = || TestScope::free_port().to_string();

    let metrics = port();
    let ingest = scope.spawn_with_env(
        &[
            "ingest",
            "--kafka.enable",
            "--kafka.broker",
            &brokers,
            "--metricsPort",
            &metrics,
            "-r=false",
        ],
        &[("PLEIADES_INGEST__URL", url.as_str()), one_replica],
    );
    wait_until(
        Duration::from_secs(60),
        "the events on the topic",
        async || (topic_len(&brokers, "pleiades-events") == lines.len() as i64).then_some(()),
    )
    .await;
    assert_eq!(
        scope.terminate(ingest, Duration::from_secs(10)).await,
        Some(0)
    );

    let plain_addr = format!("127.0.0.1:{}", plain.port);
    let sentinel_addr = group.sentinel_addrs()[0].clone();
    let data_addr = format!("127.0.0.1:{}", group.nodes[0].port);
    let cases = [
        (
            &plain_addr,
            false,
            &plain_addr,
            StoreSettings::Redis(RedisConfig {
                url: plain.url(),
                ..RedisConfig::default()
            }),
        ),
        (
            &sentinel_addr,
            true,
            &data_addr,
            StoreSettings::Redis(RedisConfig {
                sentinels: group.sentinel_addrs(),
                master_name: MASTER_NAME.to_owned(),
                ..RedisConfig::default()
            }),
        ),
    ];
    for (addr, sentinel, server, settings) in &cases {
        // The original aggregate command line: the Kafka bus into the Redis at --redis-addr
        // (a sentinel's address with --redis-use-sentinel, whose master is then used).
        let metrics = port();
        let mut args = vec![
            "aggregate",
            "--kafka.enable",
            "--kafka.broker",
            &brokers,
            "--redis-addr",
            addr.as_str(),
            "--metricsPort",
            &metrics,
        ];
        if *sentinel {
            args.push("--redis-use-sentinel");
        }
        // A group of its own: each case counts the whole topic into its own Redis.
        let group_name = format!("original-{sentinel}");
        let aggregate = scope.spawn_with_env(
            &args,
            &[one_replica, ("PLEIADES_KAFKA__GROUP", group_name.as_str())],
        );
        wait_for_counters(settings, &expected).await;
        let master = format!("pleiades_redis_master_info{{address=\"{server}\"}}");
        wait_for_metric(
            metrics.parse().unwrap(),
            &master,
            Duration::from_secs(10),
            |v| v == 1.0,
        )
        .await;
        assert_eq!(
            scope.terminate(aggregate, Duration::from_secs(10)).await,
            Some(0)
        );

        // The original frontend command line reads the same Redis and listens on :PORT.
        let (metrics, web) = (port(), port());
        let listen = format!(":{web}");
        let mut args = vec![
            "frontend",
            "--frontend-redis-addr",
            addr.as_str(),
            "--listen-addr",
            &listen,
            "--metricsPort",
            &metrics,
        ];
        if *sentinel {
            args.push("--frontend-redis-use-sentinel");
        }
        let frontend = scope.spawn(&args);
        let totals = wait_until(Duration::from_secs(30), "/api/totals", async || {
            let response = reqwest::get(format!("http://127.0.0.1:{web}/api/totals"))
                .await
                .ok()?;
            if response.status() != 200 {
                return None;
            }
            response.json::<serde_json::Value>().await.ok()
        })
        .await;
        assert_eq!(counters_of(&totals), expected.all_time, "{addr}");
        assert_eq!(
            scope.terminate(frontend, Duration::from_secs(10)).await,
            Some(0)
        );
        println!("aggregate and frontend through {addr} (sentinel: {sentinel}) use {server}");
    }
}

#[test]
fn the_original_redis_and_listen_flags_are_in_the_help() {
    let scope = TestScope::new();
    let (code, out, err) = pleiades(&scope, &["help", "aggregate"], &[]);
    assert_eq!(code, 0, "{err}");
    for flag in [
        "--redis-addr <HOST:PORT>",
        "--redis-use-sentinel",
        "--kafka.enable",
    ] {
        assert!(out.contains(flag), "{flag} missing from:\n{out}");
    }
    let (code, out, err) = pleiades(&scope, &["help", "frontend"], &[]);
    assert_eq!(code, 0, "{err}");
    for flag in [
        "--frontend-redis-addr <HOST:PORT>",
        "--frontend-redis-use-sentinel",
        "--listen-addr <ADDR>",
    ] {
        assert!(out.contains(flag), "{flag} missing from:\n{out}");
    }
    // Each personality takes its own flags only, and a bad address names its key.
    let (code, _, _) = pleiades(&scope, &["frontend", "--redis-addr", "a:1"], &[]);
    assert_eq!(code, 2);
    let (code, _, err) = pleiades(
        &scope,
        &["aggregate", "--redis-addr", "nowhere", "check-config"],
        &[],
    );
    assert_eq!(code, 2, "{err}");
}
