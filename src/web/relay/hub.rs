//! The relay's one reader of the bus and the memory every client shares: a ring of the newest
//! `web.relay_buffer_events` entries, with the bus positions just before the oldest and after
//! the newest. Clients keep only a cursor into it; one that falls behind the ring's start is
//! dropped as too slow, so a client that stops reading never makes the server hold more.

use super::feed::{history_start, Entry, Feed};
use super::position::Position;
use crate::bus::BusError;
use crate::config::BusSettings;
use crate::metrics::{RelayDrop, RelayMetrics};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// Records taken from the bus per read.
const READ_BATCH: usize = 512;
/// How long a Kafka read waits before the reader counts itself caught up.
const KAFKA_WAIT: Duration = Duration::from_millis(200);
/// A cursor that is not in the ring (a client still starting or catching up).
const OUTSIDE: u64 = u64::MAX;
/// How long the reader waits for a client still reading entries it would drop, before
/// dropping the client instead. A burst (a backlog after a broker outage) thus slows the
/// relay down rather than dropping every client; a client that has stopped costs this once.
const SLOW_GRACE: Duration = Duration::from_secs(1);

struct Ring {
    entries: VecDeque<Arc<Entry>>,
    /// The sequence number of `entries[0]`; they count every entry the reader ever kept.
    first_seq: u64,
    /// The bus position just before `entries[0]`.
    front: Position,
    /// The bus position after the newest entry (and after any record passed over since).
    head: Position,
}

/// What the hub knows of one client.
pub struct Slot {
    cursor: AtomicU64,
    dropped: AtomicBool,
    released: AtomicBool,
    pub wake: Notify,
}

impl Slot {
    /// True once the hub let this client go for falling behind.
    pub fn is_dropped(&self) -> bool {
        self.dropped.load(Ordering::Acquire)
    }

    /// Tells the hub which entry the client reads next.
    pub fn set_cursor(&self, seq: u64) {
        self.cursor.store(seq, Ordering::Release);
    }

    fn needs_before(&self, seq: u64) -> bool {
        let cursor = self.cursor.load(Ordering::Acquire);
        cursor != OUTSIDE && cursor < seq && !self.is_dropped()
    }
}

/// A client's next entry is no longer kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeftBehind;

/// Where a client joins the ring.
pub enum Join {
    /// At this sequence number: every entry before it is covered by the client's position.
    At(u64),
    /// The ring starts after the client's position (or too close to it): read the bus first.
    Behind,
}

/// The shared state of the relay.
pub struct Hub {
    pub bus: BusSettings,
    pub topic: String,
    capacity: usize,
    max_clients: usize,
    ring: RwLock<Option<Ring>>,
    /// The sequence number the next entry will get; changes wake waiting clients.
    head: watch::Sender<u64>,
    /// True once the reader has reached the end of the bus after starting.
    ready: watch::Sender<bool>,
    clients: Mutex<HashMap<u64, Arc<Slot>>>,
    next_client: AtomicU64,
    connected: AtomicUsize,
    /// Clients moving their cursor wake a reader waiting for room.
    progress: Notify,
    pub metrics: RelayMetrics,
}

impl Hub {
    /// A hub for `bus` keeping `capacity` entries for at most `max_clients` clients.
    pub fn new(
        bus: BusSettings,
        capacity: usize,
        max_clients: usize,
        metrics: RelayMetrics,
    ) -> Arc<Hub> {
        let topic = match &bus {
            BusSettings::Kafka(config) => config.topic.clone(),
            BusSettings::File(_) => String::new(),
        };
        Arc::new(Hub {
            bus,
            topic,
            capacity: capacity.max(1),
            max_clients,
            ring: RwLock::new(None),
            head: watch::channel(0).0,
            ready: watch::channel(false).0,
            clients: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(0),
            connected: AtomicUsize::new(0),
            progress: Notify::new(),
            metrics,
        })
    }

    /// The most entries kept: how far behind a client may fall.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Takes a place for a new client; `None` when `web.relay_max_clients` are connected.
    pub fn admit(&self) -> Option<(u64, Arc<Slot>)> {
        let taken = self
            .connected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_clients).then_some(n + 1)
            });
        if taken.is_err() {
            self.metrics.dropped.inc(RelayDrop::Full);
            return None;
        }
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            cursor: AtomicU64::new(OUTSIDE),
            dropped: AtomicBool::new(false),
            released: AtomicBool::new(false),
            wake: Notify::new(),
        });
        if let Ok(mut clients) = self.clients.lock() {
            clients.insert(id, slot.clone());
        }
        self.metrics.connections.inc();
        self.metrics.clients.inc();
        Some((id, slot))
    }

    /// Gives a client's place back (once, however it ended).
    pub fn release(&self, id: u64, slot: &Slot) {
        if let Ok(mut clients) = self.clients.lock() {
            clients.remove(&id);
        }
        if !slot.released.swap(true, Ordering::AcqRel) {
            self.connected.fetch_sub(1, Ordering::AcqRel);
            self.metrics.clients.dec();
        }
    }

    /// Waits until the reader has reached the end of the bus once; false on shutdown.
    pub async fn wait_ready(&self, shutdown: &CancellationToken) -> bool {
        let mut ready = self.ready.subscribe();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            result = ready.wait_for(|r| *r) => result.is_ok(),
        }
    }

    /// A receiver that changes whenever entries are added.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// The position after everything the reader has taken: where a live client starts, with
    /// the sequence number of the next entry.
    pub fn now(&self) -> Option<(Position, u64)> {
        let ring = self.ring.read().ok()?;
        let ring = ring.as_ref()?;
        Some((
            ring.head.clone(),
            ring.first_seq + ring.entries.len() as u64,
        ))
    }

    /// Where a client at `position` joins. It joins only when what it needs first is not in
    /// the oldest quarter of a full ring, so that it is not dropped at once for being behind.
    pub fn join(&self, position: &Position) -> Join {
        let Ok(ring) = self.ring.read() else {
            return Join::Behind;
        };
        let Some(ring) = ring.as_ref() else {
            return Join::Behind;
        };
        if !ring.front.at_or_before(position) {
            return Join::Behind;
        }
        let skip = ring
            .entries
            .iter()
            .take_while(|e| position.covers(e.source, e.start, e.end))
            .count();
        let full = ring.entries.len() >= self.capacity;
        if full && skip < self.capacity / 4 && skip < ring.entries.len() {
            return Join::Behind;
        }
        Join::At(ring.first_seq + skip as u64)
    }

    /// Up to `max` entries from `seq` on; `Err(LeftBehind)` when `seq` has left the ring.
    pub fn take(&self, seq: u64, max: usize) -> Result<Vec<Arc<Entry>>, LeftBehind> {
        let ring = self.ring.read().map_err(|_| LeftBehind)?;
        let Some(ring) = ring.as_ref() else {
            return Ok(Vec::new());
        };
        if seq < ring.first_seq {
            return Err(LeftBehind);
        }
        let from = (seq - ring.first_seq) as usize;
        Ok(ring.entries.iter().skip(from).take(max).cloned().collect())
    }

    /// The reader's position, when it has started (a restarted reader goes on from there).
    fn head_position(&self) -> Option<Position> {
        let ring = self.ring.read().ok()?;
        ring.as_ref().map(|r| r.head.clone())
    }

    fn start(&self, at: Position) {
        if let Ok(mut ring) = self.ring.write() {
            if ring.is_none() {
                *ring = Some(Ring {
                    entries: VecDeque::with_capacity(self.capacity),
                    first_seq: 0,
                    front: at.clone(),
                    head: at,
                });
            }
        }
    }

    /// A client moved its cursor: a reader waiting for room looks again.
    pub fn moved(&self) {
        self.progress.notify_waiters();
    }

    /// The clients that still need an entry before `seq`.
    fn behind(&self, seq: u64) -> Vec<(u64, Arc<Slot>)> {
        match self.clients.lock() {
            Ok(clients) => clients
                .iter()
                .filter(|(_, slot)| slot.needs_before(seq))
                .map(|(id, slot)| (*id, slot.clone()))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Adds what the reader read, at most half the ring at a time. Before the oldest entries
    /// make room, the clients still reading them get [`SLOW_GRACE`] to move on; those that
    /// do not are dropped as too slow.
    async fn push(&self, mut entries: Vec<Entry>, head: Position) {
        let step = (self.capacity / 2).max(1);
        while !entries.is_empty() || self.head_position().as_ref() != Some(&head) {
            let rest = entries.split_off(entries.len().min(step));
            let batch = std::mem::replace(&mut entries, rest);
            let last = entries.is_empty();
            let evicted_through = {
                let Ok(guard) = self.ring.read() else { return };
                let Some(ring) = guard.as_ref() else { return };
                let overflow = (ring.entries.len() + batch.len()).saturating_sub(self.capacity);
                ring.first_seq + overflow as u64
            };
            self.make_room(evicted_through).await;
            let next_seq = {
                let Ok(mut guard) = self.ring.write() else {
                    return;
                };
                let Some(ring) = guard.as_mut() else { return };
                for entry in batch {
                    if ring.entries.len() == self.capacity {
                        if let Some(oldest) = ring.entries.pop_front() {
                            ring.front = oldest.after.clone();
                            ring.first_seq += 1;
                        }
                    }
                    ring.entries.push_back(Arc::new(entry));
                }
                if last {
                    ring.head = head.clone();
                } else if let Some(newest) = ring.entries.back() {
                    ring.head = newest.after.clone();
                }
                ring.first_seq + ring.entries.len() as u64
            };
            self.head
                .send_if_modified(|seq| std::mem::replace(seq, next_seq) != next_seq);
            if last {
                break;
            }
        }
    }

    /// Moves the ring to `head` without entries, when no client is connected: the reader read
    /// past records nobody was there to hear, and what the ring held is history no client
    /// needs either (one that comes back with an older id reads the bus on its own until it
    /// reaches the ring, as any client from further back does). False, changing nothing, when
    /// a client is connected now: its start may lie before `head`, so the reader must read
    /// those records again and keep them. Deciding under the ring's write lock is what makes
    /// this exact: a client admitted after the decision reads the ring's new head.
    fn pass_over(&self, head: &Position) -> bool {
        let Ok(mut guard) = self.ring.write() else {
            return false;
        };
        let Some(ring) = guard.as_mut() else {
            return false;
        };
        if self.connected.load(Ordering::Acquire) > 0 {
            return false;
        }
        ring.first_seq += ring.entries.len() as u64;
        ring.entries.clear();
        ring.front = head.clone();
        ring.head = head.clone();
        true
    }

    /// Waits until no client needs an entry before `seq`, for [`SLOW_GRACE`] at most; then
    /// drops those that still do.
    async fn make_room(&self, seq: u64) {
        let deadline = tokio::time::Instant::now() + SLOW_GRACE;
        loop {
            let moved = self.progress.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            let behind = self.behind(seq);
            if behind.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                for (id, slot) in behind {
                    slot.dropped.store(true, Ordering::Release);
                    self.metrics.dropped.inc(RelayDrop::Slow);
                    tracing::info!(
                        client = id,
                        kept = self.capacity,
                        "relay client dropped: it fell behind the events kept in memory"
                    );
                    self.release(id, &slot);
                    slot.wake.notify_one();
                }
                return;
            }
            tokio::select! {
                _ = moved => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}

/// The relay's reader: reads the bus into the hub until shutdown. The supervised `relay`
/// component; a bus error ends it, and a restart goes on from where it stopped.
pub async fn run(
    hub: Arc<Hub>,
    poll_interval: Duration,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let from = match hub.head_position() {
        Some(position) => position,
        None => history_start(&hub.bus, hub.capacity).await?,
    };
    let mut feed = Feed::open(&hub.bus, &from).await?;
    hub.start(feed.position().clone());
    let wait = match hub.bus {
        BusSettings::File(_) => poll_interval,
        BusSettings::Kafka(_) => KAFKA_WAIT,
    };
    tracing::info!(from = ?feed.position(), kind = ?hub.bus.kind(), "relay reading the bus");
    loop {
        if hub.connected.load(Ordering::Acquire) == 0 {
            // Nobody is listening: most of a reader's work, decoding each record and building
            // its frame, would be for nothing (in a backfill it was a sixth of the daemon's).
            let from = feed.position().clone();
            let passed = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                read = feed.pass_over(READ_BATCH, wait) => read?,
            };
            if hub.pass_over(feed.position()) {
                if passed == 0 {
                    hub.ready
                        .send_if_modified(|ready| !std::mem::replace(ready, true));
                } else {
                    hub.metrics.bus_events.inc_by(passed as u64);
                }
                continue;
            }
            // A client came while the records were passed over: they are read again, kept.
            feed = Feed::open(&hub.bus, &from).await?;
        }
        let entries = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            read = feed.next(READ_BATCH, wait) => read?,
        };
        if entries.is_empty() {
            hub.ready
                .send_if_modified(|ready| !std::mem::replace(ready, true));
        } else {
            hub.metrics.bus_events.inc_by(entries.len() as u64);
        }
        hub.push(entries, feed.position().clone()).await;
    }
}
