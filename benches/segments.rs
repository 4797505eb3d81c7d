//! Closed segments at rest: the compression ratio of the zstd seekable layout on the real
//! recorded events, and read throughput (events/s through `SegmentReader`, every record
//! decoded as an aggregator decodes it) of the compressed segment next to the same segment
//! uncompressed, in one run.

use pleiades::bus::file::compressed::{compress_segment, LEVEL};
use pleiades::bus::file::{encode_record, SegmentReader};
use std::path::Path;
use std::time::Instant;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/events");
/// The recorded events are written this many times into one segment (about 64 MiB, the
/// default `file.segment_bytes`).
const COPIES: usize = 10;
const ROUNDS: usize = 5;

/// Reads the whole segment from the start; returns the records read.
fn read_all(path: &Path) -> u64 {
    let mut reader = SegmentReader::open(path, 0).expect("segment opens");
    let mut records = 0u64;
    loop {
        let mut got = 0;
        for record in reader.read(1 << 20).expect("segment reads") {
            let data = record.data.expect("a bus record");
            assert!(data.starts_with('{'));
            got += 1;
        }
        if got == 0 {
            return records;
        }
        records += got;
    }
}

/// The best of `ROUNDS` full reads, in events per second.
fn throughput(path: &Path) -> (u64, f64) {
    let mut best = f64::MAX;
    let mut events = 0;
    for _ in 0..ROUNDS {
        let started = Instant::now();
        events = read_all(path);
        best = best.min(started.elapsed().as_secs_f64());
    }
    (events, events as f64 / best)
}

fn main() {
    let dir = tempfile::tempdir().expect("scratch directory");
    let mut lines = Vec::new();
    for file in [
        "recentchange-2022-2026.jsonl",
        "recentchange-2018-wikidata.jsonl",
    ] {
        let text = std::fs::read_to_string(Path::new(DATA).join(file)).expect("recorded events");
        lines.extend(text.lines().map(str::to_owned));
    }
    let mut content = Vec::new();
    for copy in 0..COPIES {
        for (n, line) in lines.iter().enumerate() {
            encode_record(
                &format!("[{{\"offset\":{}}}]", copy * lines.len() + n),
                line,
                &mut content,
            );
        }
    }
    let events = (COPIES * lines.len()) as f64;
    let plain = dir.path().join("segment-00000000000000000001.jsonl");
    let packed_from = dir.path().join("segment-00000000000000000002.jsonl");
    std::fs::write(&plain, &content).expect("plain segment");
    std::fs::write(&packed_from, &content).expect("segment to compress");
    let started = Instant::now();
    let packed = compress_segment(&packed_from, LEVEL).expect("compressed");
    let compress_seconds = started.elapsed().as_secs_f64();

    let (plain_events, plain_rate) = throughput(&plain);
    let (packed_events, packed_rate) = throughput(&packed.path);
    assert_eq!(plain_events, packed_events);
    let ratio = packed.content_bytes as f64 / packed.compressed_bytes as f64;
    println!(
        "segment of {} recorded events ({:.1} MiB, {:.0} bytes per event): zstd level {LEVEL}, 1 MiB frames",
        events,
        packed.content_bytes as f64 / 1048576.0,
        packed.content_bytes as f64 / events
    );
    println!(
        "  at rest: {:.1} MiB, {:.0} bytes per event, ratio {ratio:.1} (1/{ratio:.1} of the raw bytes); compressed in {compress_seconds:.2} s ({:.0} MiB/s)",
        packed.compressed_bytes as f64 / 1048576.0,
        packed.compressed_bytes as f64 / events,
        packed.content_bytes as f64 / 1048576.0 / compress_seconds
    );
    println!("  read, uncompressed: {plain_rate:.0} events/s");
    println!(
        "  read, compressed:   {packed_rate:.0} events/s ({:.2} of uncompressed)",
        packed_rate / plain_rate
    );
    // Starting at an arbitrary offset costs one frame: time a thousand reads of one record
    // from positions spread over the segment.
    let positions: Vec<u64> = {
        let mut reader = SegmentReader::open(&plain, 0).expect("segment opens");
        let mut all = Vec::new();
        loop {
            let batch: Vec<u64> = reader
                .read(1 << 20)
                .expect("reads")
                .map(|r| r.start)
                .collect();
            if batch.is_empty() {
                break;
            }
            all.extend(batch);
        }
        all.iter().step_by(all.len() / 1000).copied().collect()
    };
    let started = Instant::now();
    for position in &positions {
        let mut reader = SegmentReader::open(&packed.path, *position).expect("opens");
        assert!(reader.read(1).expect("reads").next().is_some());
    }
    println!(
        "  {} reads of one record at arbitrary offsets of the compressed segment: {:.2} ms each",
        positions.len(),
        started.elapsed().as_secs_f64() * 1000.0 / positions.len() as f64
    );
}
