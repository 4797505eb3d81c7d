//! `pleiades record` against an in-process upstream serving a real capture, and `pleiades replay`
//! serving the recorded file back: the same ids and the same data, through throttling, cut
//! connections, a kill -9 and a frame torn by it.

mod common;

use common::TestScope;
use pleiades::capture::{self, Frame};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn shared_capture() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/sse/pdm-g10_wikimedia-recentchange-sample_2026-06-20.sse.txt"
    ))
}

fn frames_of(path: &Path) -> Vec<Frame> {
    capture::parse(&std::fs::read_to_string(path).unwrap_or_default())
}

fn ids_and_data(frames: &[Frame]) -> Vec<(&str, &str)> {
    frames
        .iter()
        .map(|f| (f.id.as_str(), f.data.as_str()))
        .collect()
}

/// The first `count` events a replay server sends on one connection.
async fn served(
    addr: std::net::SocketAddr,
    last_event_id: Option<&str>,
    count: usize,
) -> Vec<Frame> {
    use futures_util::StreamExt as _;
    let mut request = reqwest::Client::new().get(format!("http://{addr}/v2/stream/recentchange"));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    let mut body = request
        .send()
        .await
        .expect("the replay answers")
        .bytes_stream();
    let mut parser = pleiades::ingest::sse::SseParser::new(1 << 20);
    let mut events = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        while events.len() < count {
            let chunk = body.next().await.expect("the stream goes on").unwrap();
            parser.push(&chunk, &mut events);
        }
    });
    read.await.expect("the events within 30 s");
    events
        .into_iter()
        .take(count)
        .map(|e| Frame {
            event_type: e.event_type,
            id: e.id.to_string(),
            data: e.data,
        })
        .collect()
}

#[tokio::test]
async fn record_then_replay_round_trips_a_capture_in_its_ids_and_data() {
    let mut scope = TestScope::new();
    let original = frames_of(&shared_capture());
    assert_eq!(original.len(), 384);
    // The upstream: the real capture, throttling the first request (Retry-After: 1), cutting
    // every connection after 97 events, paced so that the recorder can be killed half way.
    let mut options = common::replay_options(vec![shared_capture()]);
    options.cut_after = Some(97);
    options.throttle = 1;
    options.rate = Some(400.0);
    let upstream = scope.replay(options).await;
    let config = common::ingest_config(upstream.addr, TestScope::free_port());
    let config_path = scope.write_config(&config);
    let out = scope.path("capture.sse.txt");
    let args = [
        "--config",
        config_path.to_str().unwrap(),
        "record",
        "--out",
        out.to_str().unwrap(),
        "--limit",
        "384",
    ];
    let first = scope.spawn(&args);
    common::wait_until(Duration::from_secs(30), "150 recorded events", async || {
        (frames_of(&out).len() >= 150).then_some(())
    })
    .await;
    scope.kill9(first);
    let killed_at = frames_of(&out).len();
    assert!(killed_at < 384, "killed before the end ({killed_at})");
    // A crash in the middle of a write leaves a frame cut short.
    {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
        file.write_all(b"event: message\nid: [{\"topic\":\"eqiad.medi")
            .unwrap();
    }
    let second = scope.spawn(&args);
    let status = common::wait_until(
        Duration::from_secs(60),
        "the recorder to finish",
        async || scope.child(second).try_wait().ok().flatten(),
    )
    .await;
    assert!(status.success(), "record exits 0 at its limit: {status:?}");

    let recorded = frames_of(&out);
    assert_eq!(ids_and_data(&recorded), ids_and_data(&original));
    // The file is in the shared captures' own format: their bytes, frame for frame (the shared
    // file lacks the blank line after its last frame).
    let shared_text = std::fs::read_to_string(shared_capture()).unwrap();
    let recorded_text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(recorded_text.trim_end(), shared_text.trim_end());
    assert!(recorded_text.ends_with("\n\n"));
    // Wikimedia's manners: the configured agent, the 429 waited out, every cut resumed.
    assert_eq!(
        upstream.stats.user_agent().as_deref(),
        Some(config.ingest.user_agent.as_str())
    );
    assert!(upstream.stats.requests() > upstream.stats.connections());
    assert!(
        upstream.stats.connections() >= 5,
        "384 events, 97 a connection, one kill"
    );
    let logs = scope.logs();
    assert!(logs.contains("frame cut short"), "{logs}");

    // The recorded file, replayed, is the capture: whole, and resumed from a real id.
    let replayed = scope
        .replay(common::replay_options(vec![out.clone()]))
        .await;
    assert_eq!(
        ids_and_data(&served(replayed.addr, None, 384).await),
        ids_and_data(&original)
    );
    // Upstream's rule: from the first frame whose id's timestamp is at or after the one asked.
    let resume = &original[200].id;
    let asked = pleiades::event::stream_id_timestamp_ms(resume).unwrap();
    let start = original
        .iter()
        .position(|f| pleiades::event::stream_id_timestamp_ms(&f.id).unwrap() >= asked)
        .unwrap();
    let from_shared = scope
        .replay(common::replay_options(vec![shared_capture()]))
        .await;
    let resumed = served(replayed.addr, Some(resume), 384 - start).await;
    assert_eq!(ids_and_data(&resumed), ids_and_data(&original[start..]));
    assert_eq!(
        ids_and_data(&resumed),
        ids_and_data(&served(from_shared.addr, Some(resume), 384 - start).await)
    );
    assert!(
        resumed.iter().any(|f| f.id == *resume),
        "an exact resume repeats the last event"
    );
}

#[tokio::test]
async fn replay_serves_the_shared_captures_with_their_own_ids() {
    let scope = TestScope::new();
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/sse"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let mut expected = Vec::new();
    for file in &files {
        expected.extend(frames_of(file));
    }
    // Both captures, one after the other; the one whose last frame has no blank line counts
    // all three of its events.
    assert_eq!(expected.len(), 387);
    let server = scope.replay(common::replay_options(files)).await;
    assert_eq!(server.events, 387);
    let frames = served(server.addr, None, 387).await;
    assert_eq!(ids_and_data(&frames), ids_and_data(&expected));
}
