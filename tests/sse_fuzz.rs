//! A long-running randomised test of the SSE parser and the event view, with a time budget
//! (`PLEIADES_FUZZ_SECONDS`, 20 s by default): random bytes and random well-formed-ish streams
//! cut at random places, and random events with hostile field values. The parser never panics,
//! never keeps more than its caps, and yields the same events however the input is cut; the
//! event view never panics, and what it accepts counts exactly.
//!
//! Each run draws a new seed and prints it; `PLEIADES_FUZZ_SEED` (64 hex digits) replays one.

use pleiades::counters::{OpenTally, GROWTH};
use pleiades::event::{inspect, MAX_PAGE_LENGTH};
use pleiades::ingest::sse::{SseEvent, SseParser, MAX_ID_BYTES};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use std::time::{Duration, Instant};

const MAX: usize = 4096;

fn parse(chunks: &[&[u8]]) -> (Vec<SseEvent>, SseParser) {
    let mut parser = SseParser::new(MAX);
    let mut out = Vec::new();
    for chunk in chunks {
        parser.push(chunk, &mut out);
    }
    (out, parser)
}

/// `bytes` cut at `cuts` (sorted, clamped).
fn cut<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    let mut pieces = Vec::new();
    let mut start = 0;
    for c in cuts.into_iter().chain(std::iter::once(bytes.len())) {
        pieces.push(&bytes[start..c]);
        start = c;
    }
    pieces
}

fn eol() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("\n"), Just("\r"), Just("\r\n")]
}

/// A JSON number or other value a hostile `length` side might hold.
fn side() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some("null".to_owned())),
        (0u64..100_000).prop_map(|n| Some(n.to_string())),
        any::<i64>().prop_map(|n| Some(n.to_string())),
        any::<u64>().prop_map(|n| Some(n.to_string())),
        Just(Some(MAX_PAGE_LENGTH.to_string())),
        Just(Some((MAX_PAGE_LENGTH + 1).to_string())),
        Just(Some("1e300".to_owned())),
        Just(Some("-0.5".to_owned())),
        Just(Some("\"12\"".to_owned())),
        Just(Some("99999999999999999999999".to_owned())),
    ]
}

/// A `meta.dt` a hostile upstream might send.
fn dt() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("2026-06-20T15:49:48.988Z".to_owned()),
        Just("1970-01-01T00:00:00Z".to_owned()),
        Just("0000-01-01T00:00:00Z".to_owned()),
        Just("9999-12-31T23:59:59.999+00:00".to_owned()),
        Just("2018-03-07T16:16:17+00:00".to_owned()),
        "[0-9T:.Z+-]{0,30}",
    ]
}

/// An event's JSON, mostly well formed, with hostile values.
fn event() -> impl Strategy<Value = String> {
    (
        "[a-z0-9-]{0,12}",
        dt(),
        prop_oneof![Just("\"enwiki\""), Just("\"\""), Just("7"), Just("\"\\u0065nwiki\"")],
        prop_oneof![Just("\"edit\""), Just("3"), Just("true"), Just("\"e\\\"dit\"")],
        side(),
        side(),
        any::<bool>(),
    )
        .prop_map(|(id, dt, wiki, kind, old, new, object)| {
            let mut sides = Vec::new();
            if let Some(old) = old {
                sides.push(format!("\"old\":{old}"));
            }
            if let Some(new) = new {
                sides.push(format!("\"new\":{new}"));
            }
            let length = if object {
                format!("{{{}}}", sides.join(","))
            } else {
                "12".to_owned()
            };
            format!(
                r#"{{"meta":{{"id":"{id}","dt":"{dt}","domain":"x.org"}},"wiki":{wiki},"type":{kind},"bot":true,"length":{length}}}"#
            )
        })
}

/// One piece of a stream: a field line, a dispatch, a comment, a BOM, or noise.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => (event(), eol()).prop_map(|(e, l)| format!("data: {e}{l}").into_bytes()),
        4 => (event(), eol()).prop_map(|(e, l)| format!("data: {e}{l}{l}").into_bytes()),
        2 => ("[ -~]{0,30}", eol()).prop_map(|(v, l)| format!("data:{v}{l}").into_bytes()),
        4 => eol().prop_map(|l| l.as_bytes().to_vec()),
        2 => ("[a-z0-9\\[\\]{}\":,]{0,40}", eol()).prop_map(|(v, l)| format!("id: {v}{l}").into_bytes()),
        1 => ((MAX_ID_BYTES - 2)..(MAX_ID_BYTES + 3)).prop_map(|n| format!("id: {}\n", "9".repeat(n)).into_bytes()),
        1 => Just(b"id: a\0b\n".to_vec()),
        1 => ("[0-9]{1,25}", eol()).prop_map(|(v, l)| format!("retry: {v}{l}").into_bytes()),
        1 => ("[a-z]{0,8}", eol()).prop_map(|(v, l)| format!("event: {v}{l}").into_bytes()),
        1 => ("[ -~]{0,10}", eol()).prop_map(|(v, l)| format!(":{v}{l}").into_bytes()),
        1 => Just(b"\xEF\xBB\xBF".to_vec()),
        1 => (MAX - 10..MAX + 10).prop_map(|n| format!("data: {}\n", "x".repeat(n)).into_bytes()),
        1 => proptest::collection::vec(any::<u8>(), 0..24),
    ]
}

fn stream() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    (
        proptest::collection::vec(piece(), 0..40).prop_map(|p| p.concat()),
        proptest::collection::vec(any::<usize>(), 0..24),
    )
}

/// The parser's promises on any input.
fn parser_promises(bytes: &[u8], cuts: &[usize]) -> Result<Vec<SseEvent>, TestCaseError> {
    let (whole, parser) = parse(&[bytes]);
    let (chunked, chunked_parser) = parse(&cut(bytes, cuts));
    prop_assert_eq!(&whole, &chunked);
    prop_assert_eq!(parser.last_event_id(), chunked_parser.last_event_id());
    prop_assert_eq!(parser.retry_ms(), chunked_parser.retry_ms());
    prop_assert_eq!(parser.stats(), chunked_parser.stats());
    prop_assert_eq!(parser.stats().events, whole.len() as u64);
    for event in &whole {
        prop_assert!(event.data.len() <= MAX);
        prop_assert!(event.id.len() <= MAX_ID_BYTES);
    }
    Ok(whole)
}

/// The event view's promises: no panic, the length rule holds for what it accepts, and sums
/// of accepted events are exact.
fn view_promises(events: &[SseEvent]) -> Result<(), TestCaseError> {
    let mut tally = OpenTally::default();
    let mut exact: i128 = 0;
    for event in events {
        let Ok(head) = inspect(&event.data) else {
            continue;
        };
        let value: serde_json::Value = serde_json::from_str(&event.data)
            .map_err(|e| TestCaseError::fail(format!("accepted but not JSON: {e}")))?;
        if let Some(length) = value["length"].as_object() {
            let mut sides = [0i128; 2];
            for (i, key) in ["old", "new"].iter().enumerate() {
                if let Some(n) = length.get(*key).filter(|v| v.is_number()) {
                    let n = n.as_u64();
                    prop_assert!(
                        n.is_some_and(|n| n <= MAX_PAGE_LENGTH),
                        "accepted length.{} = {:?}",
                        key,
                        length.get(*key)
                    );
                    sides[i] = n.unwrap_or(0) as i128;
                }
            }
            if length.values().all(|v| !v.is_string()) {
                exact += sides[1] - sides[0];
            }
        }
        tally.count(&head, false);
    }
    let counted = tally.seal().all_time().get(GROWTH).copied().unwrap_or(0) as i128;
    prop_assert_eq!(counted, exact);
    Ok(())
}

fn budget() -> Duration {
    std::env::var("PLEIADES_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(20), Duration::from_secs)
}

fn seed() -> [u8; 32] {
    if let Ok(hex) = std::env::var("PLEIADES_FUZZ_SEED") {
        let mut seed = [0u8; 32];
        for (i, byte) in seed.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("00"), 16)
                .expect("PLEIADES_FUZZ_SEED is 64 hex digits");
        }
        return seed;
    }
    rand::random()
}

#[test]
fn the_parser_and_the_event_view_survive_anything_within_the_budget() {
    let seed = seed();
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    println!("PLEIADES_FUZZ_SEED={hex}");
    let config = Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    };
    // A runner counts its cases over its whole life, so each round gets a fresh one, seeded
    // from the run's seed.
    let mut seeds = <rand::rngs::StdRng as rand::SeedableRng>::from_seed(seed);
    let deadline = Instant::now() + budget();
    let mut rounds = 0u64;
    let events = std::sync::atomic::AtomicUsize::new(0);
    let noise = (
        proptest::collection::vec(any::<u8>(), 0..4096),
        proptest::collection::vec(any::<usize>(), 0..24),
    );
    while Instant::now() < deadline {
        let round: [u8; 32] = rand::Rng::gen(&mut seeds);
        let mut runner = TestRunner::new_with_rng(
            config.clone(),
            TestRng::from_seed(RngAlgorithm::ChaCha, &round),
        );
        let result = runner.run(&stream(), |(bytes, cuts)| {
            let dispatched = parser_promises(&bytes, &cuts)?;
            events.fetch_add(dispatched.len(), std::sync::atomic::Ordering::Relaxed);
            view_promises(&dispatched)
        });
        if let Err(failure) = result {
            panic!("{failure} (replay with PLEIADES_FUZZ_SEED={hex})");
        }
        let result = runner.run(&noise, |(bytes, cuts)| {
            let dispatched = parser_promises(&bytes, &cuts)?;
            view_promises(&dispatched)
        });
        if let Err(failure) = result {
            panic!("{failure} (replay with PLEIADES_FUZZ_SEED={hex})");
        }
        rounds += 1;
    }
    println!(
        "{} random streams ({} events) and {} random byte strings in {:?}: every promise held",
        rounds * 64,
        events.into_inner(),
        rounds * 64,
        budget()
    );
    assert!(rounds > 0);
}
