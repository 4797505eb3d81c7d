//! How the Redis store reaches the server that holds its keys: one server, the master that
//! Sentinel names, or the cluster master of the `{pleiades}` slot.
//!
//! One multiplexed connection is shared by every caller of the process and replaced after any
//! failure. An operation is retried through reconnections, failovers and slot moves until
//! `redis.timeout` has passed. Every new connection starts a new *epoch*: the server behind it
//! may be another one (a promoted replica, a restarted master) that lacks writes the previous
//! one acknowledged, so whoever remembers positions read under an older epoch reads them again.

use super::StoreError;
use crate::config::RedisConfig;
use crate::metrics::StoreMetrics;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, RedisError, Value};
use redis::{ErrorKind, ServerErrorKind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;
/// How often a connection is checked to still reach the master (`ROLE`), when asked.
const VERIFY_EVERY: Duration = Duration::from_secs(1);
/// The first pause between two attempts of an operation; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(25);
const RETRY_MAX: Duration = Duration::from_millis(500);

/// The cluster hash slot of `key` (CRC16/XMODEM modulo 16384), honouring a `{hash tag}` the
/// way Redis Cluster does: when the key has a `{` followed later by a `}` with something in
/// between, only that part is hashed.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), the checksum of cluster key slots.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in bytes {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Where the Redis that holds the keys is, and with what settings every server is reached.
#[derive(Clone)]
pub enum Topology {
    /// One server at a fixed address.
    Single(ConnectionInfo),
    /// The master the sentinels name `master_name`; `node` carries the settings (TLS, user,
    /// password, database) for the servers they name.
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        master_name: String,
        node: ConnectionInfo,
    },
    /// The master of `slot`, found from the seed nodes; `node` carries the settings.
    Cluster {
        seeds: Vec<ConnectionInfo>,
        slot: u16,
        node: ConnectionInfo,
    },
}

/// `template` (its TLS, user, password, database) aimed at `host:port`.
pub fn aimed_at(template: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match template.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    template.clone().set_addr(addr)
}

/// The host and port a connection goes to (None for a Unix socket).
fn host_port(info: &ConnectionInfo) -> Option<(&str, u16)> {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            Some((host, *port))
        }
        _ => None,
    }
}

/// `host:port` of a connection's address, for logs, metrics and errors.
fn address_of(info: &ConnectionInfo) -> String {
    match host_port(info) {
        Some((host, port)) if host.contains(':') => format!("[{host}]:{port}"),
        Some((host, port)) => format!("{host}:{port}"),
        None => info.addr().to_string(),
    }
}

impl Topology {
    /// The topology `config` describes, every server reached with the settings of `template`
    /// (parsed from `redis.url`). Sentinels and cluster nodes have only database 0.
    pub fn of(config: &RedisConfig, template: ConnectionInfo) -> Self {
        let in_db0 = |info: ConnectionInfo| {
            let redis = info.redis_settings().clone().set_db(0);
            info.set_redis_settings(redis)
        };
        let nodes = |list: &[String], template: &ConnectionInfo| {
            list.iter()
                .filter_map(|node| crate::config::parse_host_port(node))
                .map(|(host, port)| aimed_at(template, &host, port))
                .collect::<Vec<_>>()
        };
        if !config.sentinels.is_empty() {
            Topology::Sentinel {
                sentinels: nodes(&config.sentinels, &in_db0(template.clone())),
                master_name: config.master_name.clone(),
                node: template,
            }
        } else if !config.cluster.is_empty() {
            let node = in_db0(template);
            Topology::Cluster {
                seeds: nodes(&config.cluster, &node),
                slot: key_slot(super::redis::HASH_TAG.as_bytes()),
                node,
            }
        } else {
            Topology::Single(template)
        }
    }

    /// How the store names this Redis in errors and logs (never with a password).
    fn describe(&self, url: &str) -> String {
        let list =
            |nodes: &[ConnectionInfo]| nodes.iter().map(address_of).collect::<Vec<_>>().join(",");
        match self {
            Topology::Single(_) => crate::config::redact_url(url),
            Topology::Sentinel {
                sentinels,
                master_name,
                ..
            } => format!("master {master_name} of sentinels {}", list(sentinels)),
            Topology::Cluster { seeds, slot, .. } => {
                format!("slot {slot} of cluster {}", list(seeds))
            }
        }
    }
}

/// One store operation as Redis sees it.
pub enum Request {
    /// Commands sent together, pipelined when there are several.
    Commands(Vec<Cmd>),
    /// A script by its hash, and the same call with the script's body for a server that does
    /// not know the hash yet (which then keeps it).
    Script { by_hash: Cmd, with_body: Cmd },
}

impl Request {
    /// One command.
    pub fn one(cmd: Cmd) -> Self {
        Request::Commands(vec![cmd])
    }

    /// Sends the request on `conn`: one reply per command.
    async fn send(&self, conn: &mut MultiplexedConnection) -> Result<Vec<Value>, RedisError> {
        match self {
            Request::Commands(commands) if commands.len() == 1 => {
                Ok(vec![commands[0].query_async(conn).await?])
            }
            Request::Commands(commands) => {
                let mut pipe = redis::pipe();
                for cmd in commands {
                    pipe.add_command(cmd.clone());
                }
                pipe.query_async(conn).await
            }
            Request::Script { by_hash, with_body } => match by_hash.query_async(conn).await {
                Ok(value) => Ok(vec![value]),
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    Ok(vec![with_body.query_async(conn).await?])
                }
                Err(e) => Err(e),
            },
        }
    }

    /// Sends the request to the node a migrating slot is moving to: each command preceded by
    /// `ASKING`, on a connection of its own so that no other caller's command comes between.
    async fn send_asking(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> Result<Vec<Value>, RedisError> {
        let commands = match self {
            Request::Commands(commands) => commands.as_slice(),
            Request::Script { with_body, .. } => std::slice::from_ref(with_body),
        };
        let mut pipe = redis::pipe();
        for cmd in commands {
            pipe.cmd("ASKING").ignore();
            pipe.add_command(cmd.clone());
        }
        pipe.query_async(conn).await
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Next {
    /// The connection is unusable or reaches the wrong server: drop it, find the server again.
    Reconnect,
    /// The cluster slot now lives on the node at `host:port`: drop the connection, go there.
    Moved(String),
    /// The server is busy (loading, a cluster slot between two nodes): wait, same connection.
    Wait,
    /// The slot is migrating and a key has left: ask the node at `host:port` (not named when
    /// the reply was one of a pipeline's).
    Ask(Option<String>),
    /// Not something a retry mends (a refused password, a script error).
    Fail,
}

/// Why [`RedisLink::send_whole`] gave up.
enum Stop {
    Failed(StoreError),
    /// A pipeline met a slot in migration: its commands must go one by one.
    Split,
}

/// A failed attempt: what went wrong and what to do about it.
#[derive(Debug)]
struct Failure {
    message: String,
    next: Next,
}

impl Failure {
    fn redis(error: &RedisError) -> Self {
        let next = if error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_timeout()
        {
            Next::Reconnect
        } else {
            match error.kind() {
                ErrorKind::Server(ServerErrorKind::ReadOnly) | ErrorKind::Parse => Next::Reconnect,
                ErrorKind::Server(ServerErrorKind::Moved) => match error.redirect_node() {
                    Some((addr, _)) => Next::Moved(addr.to_owned()),
                    None => Next::Reconnect,
                },
                ErrorKind::Server(ServerErrorKind::Ask) => {
                    Next::Ask(error.redirect_node().map(|(addr, _)| addr.to_owned()))
                }
                ErrorKind::Server(
                    ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::BusyLoading,
                ) => Next::Wait,
                _ => Next::Fail,
            }
        };
        Failure {
            message: error.to_string(),
            next,
        }
    }

    /// No server to talk to yet (no sentinel knows the master, the named one is a replica…):
    /// found again after a pause.
    fn not_found(message: String) -> Self {
        Failure {
            message,
            next: Next::Reconnect,
        }
    }
}

/// The connection in use, shared by every caller.
#[derive(Clone)]
struct Live {
    conn: MultiplexedConnection,
    epoch: u64,
    /// The server's `host:port`.
    addr: Arc<str>,
}

/// The store's way to its Redis; see the module documentation.
pub struct RedisLink {
    topology: Topology,
    settings: AsyncConnectionConfig,
    deadline: Duration,
    /// This Redis in errors and logs, without any password.
    peer: Arc<str>,
    /// The connection in use; locked while one is made, so that callers wait for one
    /// connection instead of each making their own.
    live: tokio::sync::Mutex<Option<Live>>,
    epoch: AtomicU64,
    /// The master found last, to tell a failover (a new address) from a reconnection.
    master: Mutex<Option<Arc<str>>>,
    /// Where a cluster said the slot went (`MOVED`): asked first on the next connection.
    moved_to: Mutex<Option<String>>,
    /// The sentinel that answered last, asked first next time.
    sentinel_first: AtomicUsize,
    /// When the connection was last checked by [`RedisLink::epoch`].
    checked: Mutex<Option<Instant>>,
    metrics: StoreMetrics,
}

impl RedisLink {
    /// A link to the Redis of `topology`; nothing is connected before the first operation.
    /// `url` names it in errors (redacted); every operation gets `deadline`.
    pub fn new(topology: Topology, url: &str, deadline: Duration, metrics: StoreMetrics) -> Self {
        let settings = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(deadline))
            .set_response_timeout(Some(deadline));
        RedisLink {
            peer: topology.describe(url).into(),
            topology,
            settings,
            deadline,
            live: tokio::sync::Mutex::new(None),
            epoch: AtomicU64::new(0),
            master: Mutex::new(None),
            moved_to: Mutex::new(None),
            sentinel_first: AtomicUsize::new(0),
            checked: Mutex::new(None),
            metrics,
        }
    }

    /// A store error naming this Redis.
    pub fn error(&self, message: impl std::fmt::Display) -> StoreError {
        StoreError::Redis {
            url: self.peer.to_string(),
            message: message.to_string(),
        }
    }

    /// Sends `request` to the server that holds the keys, retrying through reconnections,
    /// failovers, slot moves and busy servers until `redis.timeout` has passed. A request is
    /// only ever retried whole; the apply script makes a retried batch harmless (it is refused
    /// when its first attempt was counted after all). Pipelined reads that meet a slot in
    /// migration go one by one instead, so that each key is read where it is at that moment.
    pub async fn send(&self, request: &Request) -> Result<Vec<Value>, StoreError> {
        match self.send_whole(request).await {
            Err(Stop::Split) => {
                let Request::Commands(commands) = request else {
                    return Err(self.error("a script cannot be split"));
                };
                let mut replies = Vec::with_capacity(commands.len());
                for cmd in commands {
                    match self.send_whole(&Request::one(cmd.clone())).await {
                        Ok(mut reply) => replies.append(&mut reply),
                        Err(Stop::Failed(e)) => return Err(e),
                        Err(Stop::Split) => return Err(self.error("a command cannot be split")),
                    }
                }
                Ok(replies)
            }
            Err(Stop::Failed(e)) => Err(e),
            Ok(replies) => Ok(replies),
        }
    }

    async fn send_whole(&self, request: &Request) -> Result<Vec<Value>, Stop> {
        let started = Instant::now();
        let mut pause = RETRY_FIRST;
        let mut ask: Option<String> = None;
        // A redirect is followed at once, but only once in a row: two nodes that disagree
        // during a resharding are asked again after a pause, not in a busy loop.
        let mut redirected = false;
        loop {
            let remaining = self.deadline.saturating_sub(started.elapsed());
            let mut used = None;
            let attempt = async {
                if let Some(target) = ask.take() {
                    let mut conn = self.connect_to_node(&target).await?;
                    return request
                        .send_asking(&mut conn)
                        .await
                        .map_err(|e| Failure::redis(&e));
                }
                let mut live = self.current().await?;
                used = Some(live.epoch);
                request
                    .send(&mut live.conn)
                    .await
                    .map_err(|e| Failure::redis(&e))
            };
            let failure = match tokio::time::timeout(remaining, attempt).await {
                Ok(Ok(values)) => return Ok(values),
                Ok(Err(failure)) => failure,
                Err(_) => {
                    if let Some(epoch) = used {
                        self.forget(epoch, "no answer in time").await;
                    }
                    let message = format!("no answer within {:?}", self.deadline);
                    return Err(Stop::Failed(self.error(message)));
                }
            };
            match &failure.next {
                Next::Fail => return Err(Stop::Failed(self.error(failure.message))),
                Next::Reconnect => {
                    if let Some(epoch) = used {
                        self.forget(epoch, &failure.message).await;
                    }
                }
                Next::Moved(target) => {
                    if let Ok(mut moved) = self.moved_to.lock() {
                        *moved = Some(target.clone());
                    }
                    if let Some(epoch) = used {
                        self.forget(epoch, &failure.message).await;
                    }
                    if !std::mem::replace(&mut redirected, true) {
                        continue;
                    }
                }
                Next::Ask(_) if matches!(request, Request::Commands(c) if c.len() > 1) => {
                    return Err(Stop::Split);
                }
                Next::Ask(Some(target)) => {
                    ask = Some(target.clone());
                    if !std::mem::replace(&mut redirected, true) {
                        continue;
                    }
                }
                Next::Ask(None) | Next::Wait => {}
            }
            if !matches!(failure.next, Next::Moved(_) | Next::Ask(Some(_))) {
                redirected = false;
            }
            if started.elapsed() + pause >= self.deadline {
                let message = format!("no answer within {:?}: {}", self.deadline, failure.message);
                return Err(Stop::Failed(self.error(message)));
            }
            tracing::debug!(peer = %self.peer, error = %failure.message, retry_in = ?pause, "Redis operation failed; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_MAX);
        }
    }

    /// The current epoch, after checking (at most once a second) that the connection still
    /// reaches the master, and connecting when there is none. A connection that fails the check
    /// is dropped, so the next operation makes a new one and the epoch moves on. Never fails:
    /// operations report the errors.
    pub async fn epoch(&self) -> u64 {
        let due = match self.checked.lock() {
            Ok(mut checked) => {
                let due = checked.is_none_or(|at| at.elapsed() >= VERIFY_EVERY);
                if due {
                    *checked = Some(Instant::now());
                }
                due
            }
            Err(_) => false,
        };
        if due {
            let mut used = None;
            let attempt = async {
                let mut live = self.current().await?;
                used = Some(live.epoch);
                self.confirm_master(&mut live.conn).await
            };
            let outcome = tokio::time::timeout(self.deadline.min(VERIFY_EVERY * 5), attempt).await;
            let failed = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(failure)) => Some(failure.message),
                Err(_) => Some(format!("no answer within {:?}", self.deadline)),
            };
            if let (Some(message), Some(epoch)) = (failed, used) {
                self.forget(epoch, &message).await;
            }
        }
        self.epoch.load(Ordering::SeqCst)
    }

    /// The connection in use, made (and its epoch begun) when there is none.
    async fn current(&self) -> Result<Live, Failure> {
        let mut live = self.live.lock().await;
        if let Some(current) = live.as_ref() {
            return Ok(current.clone());
        }
        let (conn, addr) = self.connect().await?;
        // The epoch moves before anyone can use the new connection, so that everything done
        // through it belongs to the new epoch.
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.note_master(&addr, epoch);
        let current = Live { conn, epoch, addr };
        *live = Some(current.clone());
        Ok(current)
    }

    /// Drops the connection of `epoch` (if it is still the one in use) after a failure.
    async fn forget(&self, epoch: u64, why: &str) {
        let mut live = self.live.lock().await;
        if live.as_ref().is_some_and(|l| l.epoch == epoch) {
            let addr = live.as_ref().map(|l| l.addr.clone());
            *live = None;
            tracing::warn!(peer = %self.peer, server = ?addr, error = %why, "Redis connection dropped; the next operation finds the server again");
        }
    }

    /// Records a new connection in the metrics and the log; a master at another address than
    /// the previous one is a failover (or a moved cluster slot).
    fn note_master(&self, addr: &Arc<str>, epoch: u64) {
        let previous = match self.master.lock() {
            Ok(mut master) => master.replace(addr.clone()),
            Err(_) => None,
        };
        if epoch > 1 {
            self.metrics.reconnects.inc();
        }
        match previous {
            Some(previous) if previous != *addr => {
                self.metrics.failovers.inc();
                tracing::warn!(peer = %self.peer, from = %previous, to = %addr, epoch, "the Redis master changed; positions are read again from the new master");
            }
            _ => tracing::info!(peer = %self.peer, server = %addr, epoch, "connected to Redis"),
        }
        self.metrics.master.reset();
        self.metrics.master.with_label_values(&[addr]).set(1);
    }

    /// A connection to the server that holds the keys, and its `host:port`.
    async fn connect(&self) -> Result<(MultiplexedConnection, Arc<str>), Failure> {
        match &self.topology {
            Topology::Single(info) => {
                let conn = self.open(info).await?;
                Ok((conn, address_of(info).into()))
            }
            Topology::Sentinel {
                sentinels,
                master_name,
                node,
            } => {
                self.master_from_sentinels(sentinels, master_name, node)
                    .await
            }
            Topology::Cluster { seeds, slot, node } => {
                self.master_of_slot(seeds, *slot, node).await
            }
        }
    }

    async fn open(&self, info: &ConnectionInfo) -> Result<MultiplexedConnection, Failure> {
        let client = redis::Client::open(info.clone()).map_err(|e| Failure::redis(&e))?;
        client
            .get_multiplexed_async_connection_with_config(&self.settings)
            .await
            .map_err(|e| Failure {
                message: format!("{}: {e}", address_of(info)),
                ..Failure::redis(&e)
            })
    }

    /// Fails unless the server on `conn` is a master (a single server only has to answer).
    async fn confirm_master(&self, conn: &mut MultiplexedConnection) -> Result<(), Failure> {
        if let Topology::Single(_) = self.topology {
            return redis::cmd("PING")
                .query_async::<String>(conn)
                .await
                .map(|_| ())
                .map_err(|e| Failure::redis(&e));
        }
        match redis::cmd("ROLE").query_async::<redis::Role>(conn).await {
            Ok(redis::Role::Primary { .. }) => Ok(()),
            Ok(_) => Err(Failure::not_found(
                "the server is no longer a master".to_owned(),
            )),
            Err(e) => Err(Failure::redis(&e)),
        }
    }

    /// A connection to the server at `host:port` with the node settings, checked to be a master.
    async fn connect_master(
        &self,
        node: &ConnectionInfo,
        host: &str,
        port: u16,
    ) -> Result<(MultiplexedConnection, Arc<str>), Failure> {
        let info = aimed_at(node, host, port);
        let mut conn = self.open(&info).await?;
        let addr = address_of(&info);
        self.confirm_master(&mut conn).await.map_err(|f| Failure {
            message: format!("{addr}: {}", f.message),
            ..f
        })?;
        Ok((conn, addr.into()))
    }

    /// Asks each sentinel in turn (the one that answered last first) for the master's address,
    /// as Redis's guidelines for Sentinel clients say, and connects to it.
    async fn master_from_sentinels(
        &self,
        sentinels: &[ConnectionInfo],
        master_name: &str,
        node: &ConnectionInfo,
    ) -> Result<(MultiplexedConnection, Arc<str>), Failure> {
        let first = self.sentinel_first.load(Ordering::Relaxed);
        let mut problems = Vec::new();
        for i in 0..sentinels.len() {
            let index = (first + i) % sentinels.len();
            let sentinel = &sentinels[index];
            let answer = async {
                let mut conn = self.open(sentinel).await?;
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(master_name)
                    .query_async::<Option<(String, u16)>>(&mut conn)
                    .await
                    .map_err(|e| Failure::redis(&e))
            };
            let (host, port) = match answer.await {
                Ok(Some(addr)) => addr,
                Ok(None) => {
                    problems.push(format!(
                        "{} knows no master {master_name}",
                        address_of(sentinel)
                    ));
                    continue;
                }
                Err(failure) => {
                    problems.push(format!(
                        "sentinel {}: {}",
                        address_of(sentinel),
                        failure.message
                    ));
                    continue;
                }
            };
            match self.connect_master(node, &host, port).await {
                Ok(found) => {
                    self.sentinel_first.store(index, Ordering::Relaxed);
                    return Ok(found);
                }
                Err(failure) => problems.push(failure.message),
            }
        }
        Err(Failure::not_found(problems.join("; ")))
    }

    /// Finds the master of `slot`: where the cluster last said it moved, else what a seed
    /// node's `CLUSTER SLOTS` says.
    async fn master_of_slot(
        &self,
        seeds: &[ConnectionInfo],
        slot: u16,
        node: &ConnectionInfo,
    ) -> Result<(MultiplexedConnection, Arc<str>), Failure> {
        let mut problems = Vec::new();
        let moved = self.moved_to.lock().ok().and_then(|mut m| m.take());
        if let Some((host, port)) = moved.as_deref().and_then(crate::config::parse_host_port) {
            match self.connect_master(node, &host, port).await {
                Ok(found) => return Ok(found),
                Err(failure) => problems.push(failure.message),
            }
        }
        for seed in seeds {
            let owner = async {
                let mut conn = self.open(seed).await?;
                let slots: Value = redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| Failure::redis(&e))?;
                slot_owner(&slots, slot)
                    .ok_or_else(|| Failure::not_found(format!("no node serves slot {slot}")))
            };
            let (host, port) = match owner.await {
                // A node that does not know its own address answers an empty one.
                Ok((host, port)) if host.is_empty() => match host_port(seed) {
                    Some((seed_host, _)) => (seed_host.to_owned(), port),
                    None => (host, port),
                },
                Ok(owner) => owner,
                Err(failure) => {
                    problems.push(format!("{}: {}", address_of(seed), failure.message));
                    continue;
                }
            };
            match self.connect_master(node, &host, port).await {
                Ok(found) => return Ok(found),
                Err(failure) => problems.push(failure.message),
            }
        }
        Err(Failure::not_found(problems.join("; ")))
    }

    /// A connection of its own to the node at `addr` (`host:port`), for `ASKING`.
    async fn connect_to_node(&self, addr: &str) -> Result<MultiplexedConnection, Failure> {
        let node = match &self.topology {
            Topology::Cluster { node, .. } => node,
            _ => {
                return Err(Failure::not_found(format!(
                    "asked to go to {addr} outside a cluster"
                )))
            }
        };
        let (host, port) = crate::config::parse_host_port(addr)
            .ok_or_else(|| Failure::not_found(format!("{addr:?} is not an address")))?;
        self.open(&aimed_at(node, &host, port)).await
    }
}

/// The master of `slot` in a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, …], replicas…], …]`.
fn slot_owner(reply: &Value, slot: u16) -> Option<(String, u16)> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    ranges.iter().find_map(|range| {
        let Value::Array(fields) = range else {
            return None;
        };
        let number = |v: &Value| match v {
            Value::Int(n) => Some(*n),
            _ => None,
        };
        let (start, end) = (number(fields.first()?)?, number(fields.get(1)?)?);
        if !(start..=end).contains(&i64::from(slot)) {
            return None;
        }
        let Value::Array(master) = fields.get(2)? else {
            return None;
        };
        let host = match master.first()? {
            Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
            Value::SimpleString(text) => text.clone(),
            _ => return None,
        };
        let port = u16::try_from(number(master.get(1)?)?).ok()?;
        Some((host, port))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_are_those_of_redis_cluster() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty tag, or none closed, hashes the whole key.
        assert_eq!(key_slot(b"{}.x"), crc16(b"{}.x") % SLOTS);
        assert_eq!(key_slot(b"{open"), crc16(b"{open") % SLOTS);
        assert_eq!(key_slot(b"a{b}{c}"), key_slot(b"b"));
    }

    #[test]
    fn the_slot_owner_is_read_from_cluster_slots() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("10.0.0.2", 7001),
                node("10.0.0.5", 7004),
            ]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node("", 7002)]),
        ]);
        assert_eq!(slot_owner(&reply, 0), Some(("10.0.0.1".into(), 7000)));
        assert_eq!(slot_owner(&reply, 10922), Some(("10.0.0.2".into(), 7001)));
        assert_eq!(slot_owner(&reply, 16383), Some((String::new(), 7002)));
        assert_eq!(slot_owner(&Value::Array(vec![]), 3), None);
        assert_eq!(slot_owner(&Value::Nil, 3), None);
    }

    #[test]
    fn failures_say_what_mends_them() {
        let next = |reply: &str| {
            let error = redis::parse_redis_value(format!("-{reply}\r\n").as_bytes())
                .and_then(Value::extract_error)
                .expect_err("a server error");
            Failure::redis(&error).next
        };
        assert_eq!(
            next("MOVED 3999 127.0.0.1:6381"),
            Next::Moved("127.0.0.1:6381".into())
        );
        assert_eq!(
            next("ASK 3999 127.0.0.1:6382"),
            Next::Ask(Some("127.0.0.1:6382".into()))
        );
        assert_eq!(
            next("READONLY You can't write against a read only replica."),
            Next::Reconnect
        );
        for busy in [
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "CLUSTERDOWN The cluster is down",
            "LOADING Redis is loading the dataset in memory",
            "MASTERDOWN Link with MASTER is down",
        ] {
            assert_eq!(next(busy), Next::Wait, "{busy}");
        }
        for permanent in [
            "WRONGPASS invalid username-password pair",
            "ERR Error running script",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ] {
            assert_eq!(next(permanent), Next::Fail, "{permanent}");
        }
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(Failure::redis(&refused).next, Next::Reconnect);
    }
}
