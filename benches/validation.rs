//! The cost of checking an event against its JSON Schema, as ingest does it (the quick proof,
//! else the compiled schema) and fully, next to the cost of the parse every event gets anyway
//! (`event::inspect`), on every recorded event (both formats), in one run.

use pleiades::schema::Schemas;
use std::hint::black_box;
use std::time::Instant;

const ROUNDS: usize = 20;

fn per_event(label: &str, events: &[String], mut f: impl FnMut(&str) -> bool) -> f64 {
    // One warm-up pass, then the measured ones.
    let ok = events.iter().filter(|e| f(e)).count();
    assert_eq!(ok, events.len(), "{label}: every recorded event passes");
    let started = Instant::now();
    for _ in 0..ROUNDS {
        for event in events {
            black_box(f(black_box(event)));
        }
    }
    let ns = started.elapsed().as_nanos() as f64 / (ROUNDS * events.len()) as f64;
    println!("{label:<44} {ns:>8.0} ns/event");
    ns
}

fn main() {
    let mut events = Vec::new();
    for file in [
        "recentchange-2022-2026.jsonl",
        "recentchange-2018-wikidata.jsonl",
    ] {
        let path = format!(
            "{}/../shared/data/events/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(path).expect("recorded events");
        events.extend(text.lines().map(str::to_owned));
    }
    let bytes: usize = events.iter().map(String::len).sum();
    println!(
        "{} recorded events, {} bytes on average",
        events.len(),
        bytes / events.len()
    );
    let schemas = Schemas::new().expect("the schemas compile");
    let inspect = per_event("parse (event::inspect, every event)", &events, |e| {
        pleiades::event::inspect(e).is_ok()
    });
    let value = per_event("parse into a JSON value", &events, |e| {
        serde_json::from_str::<serde_json::Value>(e).is_ok()
    });
    let full = per_event(
        "schema check, full (value parse + validation)",
        &events,
        |e| {
            serde_json::from_str::<serde_json::Value>(e)
                .ok()
                .is_some_and(|v| schemas.check(&v).is_ok())
        },
    );
    let check = per_event(
        "schema check as ingest runs it (quick proof)",
        &events,
        |e| schemas.check_text(e).is_ok(),
    );
    println!(
        "validation adds {:.0} ns per event ({:.1}x the parse), against {:.0} ns for the full check ({:.0} ns of it the value parse, {:.1}x the quick proof); at 420 events/s that is {:.2} % of one core",
        check,
        check / inspect,
        full,
        value,
        full / check,
        100.0 * check * 420.0 / 1e9
    );
}
