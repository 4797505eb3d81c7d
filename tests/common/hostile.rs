//! A hostile upstream: a raw HTTP/1.1 server that plays a script of attacks, one act per
//! connection, writing exactly the bytes each act says (no HTTP library to smooth them over).
//! After the script it keeps the connection open with heartbeats, so the ingester under test
//! stays connected and quiet.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What to do once an act's chunks are written.
#[derive(Debug, Clone)]
pub enum Then {
    /// Close the connection.
    Close,
    /// Send one byte of a line that never ends, every `every`, forever.
    Trickle { every: Duration },
    /// Send a heartbeat comment every `every`, forever.
    Heartbeat { every: Duration },
}

/// One connection's worth of behaviour.
#[derive(Debug, Clone)]
pub enum Act {
    /// Answer `status` with these headers and no stream.
    Refuse {
        status: u16,
        headers: Vec<(String, String)>,
    },
    /// Answer 200 `text/event-stream`, write each chunk as its own write, then `then`.
    Stream { chunks: Vec<Vec<u8>>, then: Then },
}

impl Act {
    /// A stream of `body` in one write, then closed.
    pub fn stream(body: Vec<u8>) -> Act {
        Act::Stream {
            chunks: vec![body],
            then: Then::Close,
        }
    }
}

/// One connection the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub last_event_id: Option<String>,
}

/// The running server.
pub struct HostileUpstream {
    pub addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    shutdown: CancellationToken,
}

impl HostileUpstream {
    /// Starts playing `script` on a free loopback port.
    pub async fn start(script: Vec<Act>) -> HostileUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let shutdown = CancellationToken::new();
        let (log, stop) = (seen.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let (socket, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(_) => return,
                    },
                };
                let (log, stop) = (log.clone(), stop.clone());
                let script = script.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = play(socket, &script, &log) => {}
                    }
                });
            }
        });
        HostileUpstream {
            addr,
            seen,
            shutdown,
        }
    }

    /// The upstream URL for `ingest.url`.
    pub fn url(&self) -> String {
        format!("http://{}/v2/stream/recentchange", self.addr)
    }

    /// The connections seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for HostileUpstream {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Reads a request's head; returns its Last-Event-ID.
async fn read_head(socket: &mut TcpStream) -> Option<Option<String>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    Some(text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("last-event-id")
            .then(|| value.trim().to_owned())
    }))
}

async fn play(mut socket: TcpStream, script: &[Act], log: &Mutex<Vec<Seen>>) {
    let Some(last_event_id) = read_head(&mut socket).await else {
        return;
    };
    let index = {
        let Ok(mut seen) = log.lock() else { return };
        seen.push(Seen {
            at: Instant::now(),
            last_event_id,
        });
        seen.len() - 1
    };
    let act = script.get(index).cloned().unwrap_or(Act::Stream {
        chunks: Vec::new(),
        then: Then::Heartbeat {
            every: Duration::from_millis(200),
        },
    });
    match act {
        Act::Refuse { status, headers } => {
            let mut head = format!("HTTP/1.1 {status} Refused\r\ncontent-length: 0\r\n");
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("connection: close\r\n\r\n");
            let _ = socket.write_all(head.as_bytes()).await;
        }
        Act::Stream { chunks, then } => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n";
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            for chunk in chunks {
                if socket.write_all(&chunk).await.is_err() || socket.flush().await.is_err() {
                    return;
                }
            }
            let (every, byte): (Duration, &[u8]) = match then {
                Then::Close => return,
                Then::Trickle { every } => (every, b"x"),
                Then::Heartbeat { every } => (every, b":\n"),
            };
            loop {
                tokio::time::sleep(every).await;
                if socket.write_all(byte).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One SSE frame: `id:` and `data:` lines and the blank line that dispatches it.
pub fn frame(id: &str, data: &str) -> String {
    let mut text = format!("id: {id}\n");
    for line in data.split('\n') {
        text.push_str(&format!("data: {line}\n"));
    }
    text.push('\n');
    text
}

/// An EventStreams-style id for event `n`.
pub fn stream_id(n: usize) -> String {
    format!(r#"[{{"topic":"hostile","partition":0,"offset":{n}}}]"#)
}

/// Frames of `events`, with ids numbered from `first`.
pub fn frames(events: &[String], first: usize) -> String {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| frame(&stream_id(first + i), e))
        .collect()
}
