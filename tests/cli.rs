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
