//! SSE parser throughput: one huge data line arriving in TCP-sized pieces must parse in time
//! linear in its size. Prints figures; asserts nothing about speed (the machine is noisy), but
//! the ratio of per-byte costs between a 1 MiB and an 8 MiB line is the linearity figure.

use pleiades::ingest::sse::SseParser;
use std::time::{Duration, Instant};

const PIECE: usize = 1460;

fn frame(data_len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(data_len + 64);
    f.extend_from_slice(
        b"event: message\nid: [{\"topic\":\"t\",\"partition\":0,\"timestamp\":1}]\ndata: ",
    );
    f.extend(std::iter::repeat_n(b'x', data_len));
    f.extend_from_slice(b"\n\n");
    f
}

/// Best of `runs` timings of feeding `input` in `PIECE`-byte pieces.
fn time_parse(input: &[u8], max: usize, runs: usize) -> (Duration, usize) {
    let mut best = Duration::MAX;
    let mut events = 0;
    for _ in 0..runs {
        let mut parser = SseParser::new(max);
        let mut out = Vec::new();
        let started = Instant::now();
        for piece in input.chunks(PIECE) {
            parser.push(piece, &mut out);
        }
        best = best.min(started.elapsed());
        events = out.len();
    }
    (best, events)
}

fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

fn main() {
    let cap = 16 * 1024 * 1024;
    println!("SSE parser, input fed in {PIECE}-byte pieces (best of 5 runs)");
    let mut per_byte = Vec::new();
    for mib in [1usize, 2, 4, 8] {
        let input = frame(mib * 1024 * 1024);
        let (d, events) = time_parse(&input, cap, 5);
        assert_eq!(events, 1);
        let ns = d.as_nanos() as f64 / input.len() as f64;
        per_byte.push(ns);
        println!(
            "  {mib} MiB data line: {:>8.2} ms  {:>8.1} MiB/s  {:.3} ns/byte",
            d.as_secs_f64() * 1e3,
            mib_per_s(input.len(), d),
            ns
        );
    }
    println!("  linearity: ns/byte at 8 MiB / ns/byte at 1 MiB = {:.2} (1.0 is linear; quadratic would be ~8)", per_byte[3] / per_byte[0]);

    let (d, _) = time_parse(&frame(8 * 1024 * 1024), 4 * 1024 * 1024, 5);
    println!(
        "  8 MiB line over the 4 MiB cap (dropped while streaming): {:.2} ms",
        d.as_secs_f64() * 1e3
    );

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/sse/pdm-g10_wikimedia-recentchange-sample_2026-06-20.sse.txt"
    );
    if let Ok(sample) = std::fs::read(path) {
        let input: Vec<u8> = sample
            .iter()
            .copied()
            .cycle()
            .take(sample.len() * 20)
            .collect();
        let (d, events) = time_parse(&input, 4 * 1024 * 1024, 5);
        println!(
            "  recorded firehose x20: {} events, {:.1} MiB/s, {:.0} events/s",
            events,
            mib_per_s(input.len(), d),
            events as f64 / d.as_secs_f64()
        );
    }
}
