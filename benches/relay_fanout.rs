//! The relay's fan-out: the real daemon (web role only, release build) relaying the event-file
//! bus to 1,000 connected clients while events are appended at 420 per second, Wikimedia's
//! peak. Prints the delay from the bus (the append returning) to each client (p50, p99, max),
//! the daemon's resident memory with no client, with the clients connected and at the end of
//! the run, and its CPU time. The clients share the machine's two cores with the daemon.

use pleiades::bus::{Outgoing, Publisher};
use pleiades::config::{BusSettings, Config, FileConfig};
use pleiades::metrics::Metrics;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const CLIENTS: usize = 1000;
const RATE: usize = 420;
/// Appends per second: the ingester writes a chunk as it arrives, a few dozen a second.
const WRITES_PER_SECOND: usize = 20;
const RUN: Duration = Duration::from_secs(20);
/// What starts every event the relay sends.
const MARKER: &[u8] = b"event: message\n";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// User plus system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / 100.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Recorded events with fresh ids, about 1 KB each.
fn events(count: usize) -> Vec<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/events/recentchange-2022-2026.jsonl"
    ))
    .expect("recorded events");
    let recorded: Vec<&str> = text.lines().collect();
    (0..count)
        .map(|i| {
            let mut v: serde_json::Value =
                serde_json::from_str(recorded[i % recorded.len()]).unwrap();
            v["meta"]["id"] = serde_json::Value::from(format!("bench-{i}"));
            v.to_string()
        })
        .collect()
}

/// One client on a raw socket: counts events in arrival order and records each one's delay
/// from the moment it was appended (`written[k]`, nanoseconds since `epoch`).
async fn client(
    addr: SocketAddr,
    epoch: Instant,
    written: Arc<Vec<AtomicU64>>,
    total: usize,
    connected: Arc<AtomicUsize>,
) -> Vec<u32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /v2/stream/recentchange HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let finder = memchr::memmem::Finder::new(MARKER);
    let mut delays = Vec::with_capacity(total);
    let mut buf = vec![0u8; 256 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    let mut first = true;
    while delays.len() < total {
        let n = match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => n,
        };
        if first {
            first = false;
            connected.fetch_add(1, Ordering::SeqCst);
        }
        let now = epoch.elapsed().as_nanos() as u64;
        // A marker split across two reads is found where the tail of the first (shorter than
        // the marker) meets the head of the second.
        let head = &buf[..n.min(MARKER.len() - 1)];
        carry.extend_from_slice(head);
        let found = finder.find_iter(&buf[..n]).count() + finder.find_iter(&carry).count();
        carry.clear();
        carry.extend_from_slice(&buf[n.saturating_sub(MARKER.len() - 1)..n]);
        for _ in 0..found {
            let k = delays.len();
            if k >= total {
                break;
            }
            // The relay may deliver an event before the writer has noted the time its append
            // returned (the slot is still 0): it came with no delay at all, not `now` late.
            let at = written[k].load(Ordering::Acquire);
            let delay = if at == 0 { 0 } else { now.saturating_sub(at) };
            delays.push((delay / 1000) as u32);
        }
    }
    delays
}

fn main() {
    let dir = tempfile::tempdir().expect("scratch");
    let bus_dir = dir.path().join("events");
    std::fs::create_dir_all(&bus_dir).unwrap();
    let (web, metrics_port) = (free_port(), free_port());
    let mut config = Config::default();
    config.ingest.enabled = false;
    config.aggregate.enabled = false;
    config.file.dir = bus_dir.clone();
    config.store.path = dir.path().join("store.db");
    config.web.listen = SocketAddr::from(([127, 0, 0, 1], web));
    config.metrics.listen = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    config.web.relay_max_clients = CLIENTS + 10;
    config.log.level = "warn".into();
    let path = dir.path().join("pleiades.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let daemon = std::process::Command::new(env!("CARGO_BIN_EXE_pleiades"))
        .args(["--config", path.to_str().unwrap()])
        .spawn()
        .expect("the daemon starts");
    let pid = daemon.id();
    // The daemon goes with the benchmark, however it ends.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let daemon = Reap(daemon);
    let addr = SocketAddr::from(([127, 0, 0, 1], web));
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss_idle = rss_bytes(pid);

    let total = RATE * RUN.as_secs() as usize;
    let written: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let epoch = Instant::now();
    let connected = Arc::new(AtomicUsize::new(0));
    // The clients run on two threads of their own (the machine's two cores), the writer on
    // another.
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (written, connected) = (written.clone(), connected.clone());
            client_runtime.spawn(client(addr, epoch, written, total, connected))
        })
        .collect();
    // Every client has its response head: all are connected before the first event.
    let deadline = Instant::now() + Duration::from_secs(60);
    while connected.load(Ordering::SeqCst) < CLIENTS {
        assert!(Instant::now() < deadline, "clients did not connect");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_connected = rss_bytes(pid);
    let cpu_before = cpu_seconds(pid);

    // The writer: appends like the ingester, RATE events a second in WRITES_PER_SECOND chunks.
    let data = events(total);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut rss_max = rss_connected;
    runtime.block_on(async {
        let bus_metrics = Metrics::new(1).unwrap();
        let settings = BusSettings::File(FileConfig {
            dir: bus_dir.clone(),
            ..FileConfig::default()
        });
        let (mut publisher, _) = Publisher::open(&settings, &bus_metrics, 10, true)
            .await
            .expect("the bus opens");
        let shutdown = CancellationToken::new();
        let per_write = RATE / WRITES_PER_SECOND;
        let mut ticker = tokio::time::interval(Duration::from_secs(1) / WRITES_PER_SECOND as u32);
        let ids: Vec<String> = (0..total)
            .map(|i| format!("[{{\"offset\":{i}}}]"))
            .collect();
        let mut next = 0;
        while next < total {
            ticker.tick().await;
            let end = (next + per_write).min(total);
            let outgoing: Vec<Outgoing<'_>> = (next..end)
                .map(|i| Outgoing {
                    sse_id: &ids[i],
                    data: &data[i],
                    key: None,
                    time_ms: 0,
                })
                .collect();
            publisher
                .publish(&outgoing, &shutdown)
                .await
                .expect("appended");
            let at = epoch.elapsed().as_nanos() as u64;
            for slot in &written[next..end] {
                slot.store(at, Ordering::Release);
            }
            next = end;
            if next % RATE == 0 {
                rss_max = rss_max.max(rss_bytes(pid));
            }
        }
    });
    let mut all: Vec<u32> = Vec::with_capacity(CLIENTS * total);
    let mut short = 0;
    for handle in clients {
        let delays = client_runtime.block_on(handle).expect("a client");
        if delays.len() < total {
            short += 1;
        }
        all.extend(delays);
    }
    let rss_end = rss_bytes(pid);
    let cpu = cpu_seconds(pid) - cpu_before;
    drop(daemon);
    all.sort_unstable();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)] as f64 / 1000.0;
    println!(
        "relay fan-out: {CLIENTS} clients, {RATE} events/s for {RUN:?} ({total} events, {} deliveries, {short} clients short)",
        all.len()
    );
    println!(
        "bus-to-client delay: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (goal: p99 under 100 ms)",
        at(0.50),
        at(0.99),
        at(1.0)
    );
    println!(
        "daemon RSS: {:.1} MiB with no client, {:.1} MiB with {CLIENTS} connected, {:.1} MiB at most while relaying, {:.1} MiB at the end",
        mib(rss_idle),
        mib(rss_connected),
        mib(rss_max.max(rss_end)),
        mib(rss_end)
    );
    println!(
        "daemon CPU: {:.1} s over {RUN:?} ({:.0} % of one core)",
        cpu,
        100.0 * cpu / RUN.as_secs_f64()
    );
}
