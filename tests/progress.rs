//! The progress display of the real binary: a bar on a terminal (a real pseudo-terminal from
//! openpty(3) as stderr), and on a pipe no bar, no cursor control, only periodic structured log
//! lines.

mod common;

use std::io::{BufRead as _, Read as _};
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn shared_capture() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/sse/pdm-g10_wikimedia-recentchange-sample_2026-06-20.sse.txt"
    ))
}

/// A pseudo-terminal of 100 columns: (the side a program writes to, the side that reads it).
fn pseudo_terminal() -> (OwnedFd, OwnedFd) {
    let (mut controller, mut terminal) = (-1, -1);
    let size = libc::winsize {
        ws_row: 30,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty(3) writes two descriptors into the integers given; the name and the
    // terminal settings are optional, the size is read only.
    let status = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(status, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened for us and are owned by nothing else.
    unsafe {
        (
            OwnedFd::from_raw_fd(terminal),
            OwnedFd::from_raw_fd(controller),
        )
    }
}

/// `pleiades replay` of the shared capture, paced to last about a second, its stderr on
/// `stderr`; returns the child and the address it listens on.
fn start_replay(stderr: Stdio, extra: &[&str]) -> (Child, String) {
    let capture = shared_capture();
    let mut child = Command::new(common::binary())
        .args(["replay", "--events", capture.to_str().unwrap()])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--rate",
            "300",
            "--cut-after",
            "384",
        ])
        .args(extra)
        .env_remove("RUST_LOG")
        .env("TERM", "xterm-256color")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("pleiades starts");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the listening line");
    let addr = line
        .trim()
        .strip_prefix("replay listening on http://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (child, addr)
}

/// Reads the whole stream of one connection (the server ends it after 384 events).
async fn read_all_events(addr: &str) -> usize {
    let body = reqwest::get(format!("http://{addr}/v2/stream/recentchange"))
        .await
        .expect("the replay answers")
        .text()
        .await
        .expect("the whole stream");
    pleiades::capture::parse(&body).len()
}

async fn stop(mut child: Child) {
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = common::wait_until(Duration::from_secs(10), "replay to stop", async || {
        child.try_wait().ok().flatten()
    })
    .await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_terminal_shows_the_bar_and_logs_elsewhere_show_progress_lines() {
    // On a terminal: the bar, drawn in place.
    let (terminal, controller) = pseudo_terminal();
    let (child, addr) = start_replay(Stdio::from(terminal), &[]);
    let reader = std::thread::spawn(move || {
        let mut screen = Vec::new();
        // Reading ends (EIO) once no process holds the terminal side any more.
        let _ = std::fs::File::from(controller).read_to_end(&mut screen);
        String::from_utf8_lossy(&screen).into_owned()
    });
    assert_eq!(read_all_events(&addr).await, 384);
    stop(child).await;
    let screen = reader.join().expect("the terminal reader");
    assert!(
        screen.contains("replay connection 0 [") && screen.contains("/384 events"),
        "no progress bar on the terminal: {screen:?}"
    );
    assert!(screen.contains("\u{1b}["), "the bar is redrawn in place");
    assert!(
        !screen.contains(" progress "),
        "no progress log lines beside the bar: {screen:?}"
    );

    // Not a terminal: no bar and no control sequence, a log line every 100 ms instead.
    let (child, addr) = start_replay(Stdio::piped(), &["--progress-interval", "100ms"]);
    let mut child = child;
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut logs = String::new();
        let _ = stderr.read_to_string(&mut logs);
        logs
    });
    assert_eq!(read_all_events(&addr).await, 384);
    stop(child).await;
    let logs = reader.join().expect("the log reader");
    assert!(
        !logs.contains('\u{1b}'),
        "control sequences in logs: {logs:?}"
    );
    assert!(!logs.contains("/384 events"), "a bar in the logs: {logs}");
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(" progress ") && l.contains("task=replay connection 0"))
        .collect();
    assert!(
        lines.len() >= 3,
        "about a second of replay at one line per 100 ms: {logs}"
    );
    assert!(lines
        .iter()
        .all(|l| l.contains("events=") && l.contains("total=384")));
    assert!(lines
        .iter()
        .all(|l| l.contains("rate=") && l.contains("eta_s=")));
    assert!(
        logs.lines()
            .any(|l| l.contains("finished") && l.contains("events=384")),
        "{logs}"
    );
}

#[tokio::test]
async fn a_since_backfill_logs_how_far_it_has_caught_up() {
    let mut scope = common::TestScope::new();
    let mut options = common::replay_options(vec![shared_capture()]);
    options.rate = Some(300.0);
    let upstream = scope.replay(options).await;
    let mut config = common::ingest_config(upstream.addr, common::TestScope::free_port());
    // The capture is months old: every event is read from the past.
    config.ingest.since = "2026-06-20T15:49:00Z".into();
    let path = scope.write_config(&config);
    let daemon = scope.spawn(&[
        "--config",
        path.to_str().unwrap(),
        "--progress-interval",
        "100ms",
    ]);
    let line = common::wait_until(
        Duration::from_secs(30),
        "a backfill progress line",
        async || {
            scope
                .logs()
                .lines()
                .find(|l| l.contains(" progress ") && l.contains("task=backfill"))
                .map(str::to_owned)
        },
    )
    .await;
    assert!(line.contains("reached=2026-06-20T15:49:"), "{line}");
    assert!(
        line.contains("events=") && line.contains("eta_s="),
        "{line}"
    );
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    let logs = scope.logs();
    assert!(!logs.contains('\u{1b}'), "{logs}");
    assert!(
        logs.lines()
            .any(|l| l.contains("finished") && l.contains("task=backfill")),
        "{logs}"
    );
}
