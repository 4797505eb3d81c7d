//! Redis as operators run it, for the tests: a master and a replica watched by sentinels, and a
//! cluster of three masters, all real `redis-server` processes on loopback ports.

use super::{wait_until, RedisServer, RedisTls, TestScope};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The name the sentinels monitor the master under: the original's, Pleiades' default.
pub const MASTER_NAME: &str = "mymaster";
/// `sentinel down-after-milliseconds`: how long a silent master takes to be declared down
/// (long enough that a busy machine does not make the sentinels fail over on their own).
const DOWN_AFTER_MS: u64 = 2000;
/// `sentinel failover-timeout`.
const FAILOVER_TIMEOUT_MS: u64 = 3000;
/// Data nodes replicate at once instead of waiting for more replicas to join a disk-less sync.
const REPLICATION: &[&str] = &["--repl-diskless-sync-delay", "0"];

/// A reply as text (`INFO`, simple and bulk strings).
pub fn text(value: &redis::Value) -> Option<String> {
    match value {
        redis::Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        redis::Value::SimpleString(text) | redis::Value::VerbatimString { text, .. } => {
            Some(text.clone())
        }
        _ => None,
    }
}

/// `field` of `INFO section`, as the server says it now.
pub async fn info_field(server: &RedisServer, section: &str, field: &str) -> Option<String> {
    let info = text(&server.query(&["INFO", section]).await?)?;
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(|value| value.trim().to_owned())
}

/// How far the store has come on `server`: the sum of every source's stored position.
pub async fn progress(server: &RedisServer) -> Option<u64> {
    let redis::Value::Array(values) = server.query(&["HVALS", "{pleiades}:positions"]).await?
    else {
        return None;
    };
    Some(
        values
            .iter()
            .filter_map(|v| text(v)?.parse::<u64>().ok())
            .sum(),
    )
}

/// How far behind the replica is left before a failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lag {
    /// Not at all (as far as asynchronous replication goes).
    None,
    /// This many batches acknowledged by the master alone.
    Batches(usize),
    /// Until the master has counted this many events: the aggregators are then idle, and
    /// nothing but a new reading of their positions counts the lost batches again.
    UntilCounted(i64),
}

/// `pleiades_total` all-time on `server`.
pub async fn counted(server: &RedisServer) -> Option<i64> {
    let value = server
        .query(&["HGET", "{pleiades}:all", "pleiades_total"])
        .await?;
    text(&value)?.parse().ok()
}

/// What one failover did, for the test's report and assertions.
#[derive(Debug)]
pub struct Failover {
    /// The master that was killed, and the replica promoted in its place.
    pub old: u16,
    pub new: u16,
    /// From `kill -9` of the master to the replica answering as the master.
    pub took: Duration,
    /// With a replica left behind, what was lost.
    pub lost: Option<Loss>,
}

/// Acknowledged writes a lagging failover lost, as store progress (sums of stored positions).
#[derive(Debug, Clone, Copy)]
pub struct Loss {
    /// What the master had acknowledged when it was killed.
    pub acknowledged: u64,
    /// What the master had when it cut the replica off: the most the replica can hold, since
    /// it was frozen and could not reconnect.
    pub replica_at_most: u64,
    /// What the replica said it holds once resumed, before its promotion.
    pub replica_read: u64,
}

/// A master and a replica (`redis-server`) and sentinels (`redis-server --sentinel`), each on
/// a free loopback port. The data nodes keep nothing on disk: a killed master comes back as a
/// replica and takes the new master's data anyway, and an fsync stalled by a busy disk would
/// look like a dead master to the sentinels.
pub struct SentinelGroup {
    pub nodes: Vec<RedisServer>,
    pub sentinel_ports: Vec<u16>,
    sentinels: Vec<Child>,
    /// With TLS and a password, for the data node and the sentinel alike.
    tls: Option<RedisTls>,
}

impl SentinelGroup {
    /// A master, a replica unless `replica` is false, and `sentinels` sentinels (quorum: a
    /// majority), once every sentinel knows the master, the replica and the other sentinels.
    pub async fn start(scope: &TestScope, sentinels: usize, replica: bool) -> SentinelGroup {
        let master = RedisServer::start_with_args(scope, false, REPLICATION).await;
        Self::start_with(scope, master, sentinels, replica).await
    }

    /// A master and one sentinel that both speak only TLS (certificates made for the test)
    /// and want `password`.
    pub async fn start_tls(scope: &TestScope, password: &str) -> SentinelGroup {
        let master = RedisServer::start_tls(scope, password).await;
        Self::start_with(scope, master, 1, false).await
    }

    /// The TLS settings of a TLS group.
    pub fn tls(&self) -> Option<&RedisTls> {
        self.tls.as_ref()
    }

    async fn start_with(
        scope: &TestScope,
        master: RedisServer,
        sentinels: usize,
        replica: bool,
    ) -> SentinelGroup {
        let tls = master.tls().cloned();
        let mut nodes = vec![master];
        if replica {
            let master_port = nodes[0].port.to_string();
            let args = [REPLICATION, &["--replicaof", "127.0.0.1", &master_port]].concat();
            let replica = RedisServer::start_with_args(scope, false, &args).await;
            wait_until(Duration::from_secs(20), "the replica in sync", async || {
                (info_field(&replica, "replication", "master_link_status").await? == "up")
                    .then_some(())
            })
            .await;
            nodes.push(replica);
        }
        let mut group = SentinelGroup {
            nodes,
            sentinel_ports: Vec::new(),
            sentinels: Vec::new(),
            tls,
        };
        let quorum = sentinels / 2 + 1;
        for _ in 0..sentinels {
            let port = TestScope::free_port();
            let dir = scope.path(&format!("sentinel-{port}"));
            std::fs::create_dir_all(&dir).expect("sentinel dir");
            // Sentinel rewrites its configuration file as it learns: it must be its own.
            let conf = dir.join("sentinel.conf");
            let listen = match &group.tls {
                // The sentinel speaks TLS to its clients and to the servers it watches, and
                // both it and they want the password.
                Some(tls) => {
                    let certs = tls.ca_file.parent().expect("a directory").display();
                    format!(
                        "port 0\ntls-port {port}\ntls-cert-file {certs}/server.pem\n\
                         tls-key-file {certs}/server.key\ntls-ca-cert-file {certs}/ca.pem\n\
                         tls-auth-clients no\ntls-replication yes\nrequirepass {pw}\n",
                        pw = tls.password,
                    )
                }
                None => format!("port {port}\n"),
            };
            let auth = match &group.tls {
                Some(tls) => format!("sentinel auth-pass {MASTER_NAME} {}\n", tls.password),
                None => String::new(),
            };
            std::fs::write(
                &conf,
                format!(
                    "{listen}bind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master} {quorum}\n{auth}\
                     sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
                     sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n",
                    dir = dir.display(),
                    master = group.nodes[0].port,
                ),
            )
            .expect("sentinel.conf");
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server --sentinel starts");
            group.sentinels.push(child);
            group.sentinel_ports.push(port);
        }
        let replicas = usize::from(replica);
        for port in group.sentinel_ports.clone() {
            let what = format!("sentinel {port} to know the group");
            wait_until(Duration::from_secs(30), &what, async || {
                let fields = group.sentinel_master(port).await?;
                let number = |name: &str| fields.get(name)?.parse::<usize>().ok();
                (number("num-slaves")? >= replicas
                    && number("num-other-sentinels")? == sentinels - 1)
                    .then_some(())
            })
            .await;
        }
        group
    }

    /// Every sentinel's `host:port`, for `redis.sentinels`.
    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// The master's port, as the first sentinel that answers says.
    pub async fn master_port(&self) -> Option<u16> {
        for port in &self.sentinel_ports {
            if let Some(master) = self.sentinel_master_addr(*port).await {
                return Some(master);
            }
        }
        None
    }

    fn node(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| n.port == port)
            .expect("a node of the group")
    }

    /// The node that is the master now.
    pub async fn master(&self) -> &RedisServer {
        let port = self
            .master_port()
            .await
            .expect("the sentinels name a master");
        &self.nodes[self.node(port)]
    }

    /// `kill -9` of the master; the sentinels promote the replica; the old master comes back
    /// as a replica of the new one and catches up. With a [`Lag`], the replica is first left
    /// behind for real: frozen (SIGSTOP) and cut off by the master (`CLIENT KILL TYPE
    /// replica`) while the master acknowledges more batches, so that the replica takes over
    /// without them.
    pub async fn fail_over(&mut self, lag: Lag) -> Failover {
        let old = self.master_port().await.expect("a master");
        let (m, r) = (self.node(old), 1 - self.node(old));
        let new = self.nodes[r].port;
        let lagging = lag != Lag::None;
        let mut acknowledged = None;
        let mut cut_at = 0;
        if lagging {
            self.nodes[r].signal(libc::SIGSTOP);
            self.nodes[m]
                .query(&["CLIENT", "KILL", "TYPE", "replica"])
                .await
                .expect("the master drops its replica");
            let master = &self.nodes[m];
            let mut seen = progress(master).await.unwrap_or(0);
            cut_at = seen;
            match lag {
                Lag::Batches(batches) => {
                    for _ in 0..batches {
                        seen = wait_until(
                            Duration::from_secs(90),
                            "a batch acknowledged by the master alone",
                            async || progress(master).await.filter(|p| *p > seen),
                        )
                        .await;
                    }
                }
                Lag::UntilCounted(events) => {
                    wait_until(
                        Duration::from_secs(60),
                        "every event acknowledged by the master alone",
                        async || (counted(master).await? >= events).then_some(()),
                    )
                    .await;
                    seen = progress(master).await.unwrap_or(0);
                }
                Lag::None => {}
            }
            acknowledged = Some(seen);
        }
        let started = Instant::now();
        self.nodes[m].stop();
        let mut lost = None;
        if lagging {
            self.nodes[r].signal(libc::SIGCONT);
            // Read before the sentinels promote it, so before anyone can write to it.
            let replica = &self.nodes[r];
            let kept = wait_until(Duration::from_secs(10), "the resumed replica", async || {
                progress(replica).await
            })
            .await;
            lost = acknowledged.map(|acknowledged| Loss {
                acknowledged,
                replica_at_most: cut_at,
                replica_read: kept,
            });
        }
        let replica = &self.nodes[r];
        let group = &*self;
        wait_until(
            Duration::from_secs(60),
            "Sentinel to promote the replica",
            async || {
                let promoted = group.master_port().await == Some(new)
                    && info_field(replica, "replication", "role").await.as_deref()
                        == Some("master");
                promoted.then_some(())
            },
        )
        .await;
        let took = started.elapsed();
        // The old master comes back as what the sentinels now say it is: a replica.
        let new_port = new.to_string();
        let args = [REPLICATION, &["--replicaof", "127.0.0.1", &new_port]].concat();
        self.nodes[m].start_again_with(&args).await;
        let rejoined = &self.nodes[m];
        wait_until(
            Duration::from_secs(30),
            "the old master in sync as a replica",
            async || {
                (info_field(rejoined, "replication", "master_link_status").await? == "up")
                    .then_some(())
            },
        )
        .await;
        let ports = self.sentinel_ports.clone();
        let group = &*self;
        wait_until(
            Duration::from_secs(30),
            "every sentinel to see the new replica",
            async || {
                for port in &ports {
                    let replicas = group.sentinel_replicas(*port).await?;
                    let healthy = replicas.iter().any(|r| {
                        r.get("port").map(String::as_str) == Some(old.to_string().as_str())
                            && r.get("flags").is_some_and(|f| !f.contains("down"))
                            && r.get("master-link-status").map(String::as_str) == Some("ok")
                    });
                    if !healthy {
                        return None;
                    }
                }
                Some(())
            },
        )
        .await;
        Failover {
            old,
            new,
            took,
            lost,
        }
    }
}

impl Drop for SentinelGroup {
    fn drop(&mut self) {
        for child in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A flat `[name, value, name, value…]` reply (or a RESP3 map) as a map.
fn fields(value: &redis::Value) -> Option<std::collections::HashMap<String, String>> {
    match value {
        redis::Value::Array(items) => Some(
            items
                .chunks(2)
                .filter_map(|pair| Some((text(pair.first()?)?, text(pair.get(1)?)?)))
                .collect(),
        ),
        redis::Value::Map(pairs) => Some(
            pairs
                .iter()
                .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
                .collect(),
        ),
        _ => None,
    }
}

impl SentinelGroup {
    /// One command to the sentinel on `port`.
    async fn sentinel_query(&self, port: u16, args: &[&str]) -> Option<redis::Value> {
        let (url, ca_file) = match &self.tls {
            Some(tls) => (
                format!("rediss://:{}@127.0.0.1:{port}/", tls.password),
                Some(tls.ca_file.as_path()),
            ),
            None => (format!("redis://127.0.0.1:{port}/"), None),
        };
        super::redis_query(&url, ca_file, args).await
    }

    async fn sentinel_master(
        &self,
        port: u16,
    ) -> Option<std::collections::HashMap<String, String>> {
        fields(
            &self
                .sentinel_query(port, &["SENTINEL", "MASTER", MASTER_NAME])
                .await?,
        )
    }

    async fn sentinel_replicas(
        &self,
        port: u16,
    ) -> Option<Vec<std::collections::HashMap<String, String>>> {
        match self
            .sentinel_query(port, &["SENTINEL", "REPLICAS", MASTER_NAME])
            .await?
        {
            redis::Value::Array(items) => items.iter().map(fields).collect(),
            _ => None,
        }
    }

    async fn sentinel_master_addr(&self, port: u16) -> Option<u16> {
        let args = ["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME];
        match self.sentinel_query(port, &args).await? {
            redis::Value::Array(items) => text(items.get(1)?)?.parse().ok(),
            _ => None,
        }
    }
}

/// Three masters in cluster mode, joined with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start(scope: &TestScope) -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ];
            nodes.push(RedisServer::start_with_args(scope, false, &args).await);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs (scripts/install-test-deps installs it)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        for node in &cluster.nodes {
            wait_until(
                Duration::from_secs(30),
                "the cluster to be up",
                async || {
                    let state = text(&node.query(&["CLUSTER", "INFO"]).await?)?;
                    state.contains("cluster_state:ok").then_some(())
                },
            )
            .await;
        }
        cluster
    }

    /// Every node's `host:port`, for `redis.cluster`.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    async fn id(node: &RedisServer) -> String {
        text(
            &node
                .query(&["CLUSTER", "MYID"])
                .await
                .expect("CLUSTER MYID"),
        )
        .expect("an id")
    }

    /// The index of the node that owns `slot`, as each node's own `CLUSTER COUNTKEYSINSLOT`
    /// cannot say: asked with `CLUSTER SLOTS` of the first node.
    pub async fn owner(&self, slot: u16) -> usize {
        let reply = self.nodes[0]
            .query(&["CLUSTER", "SLOTS"])
            .await
            .expect("CLUSTER SLOTS");
        let redis::Value::Array(ranges) = reply else {
            panic!("CLUSTER SLOTS answered {reply:?}");
        };
        for range in ranges {
            let redis::Value::Array(fields) = range else {
                continue;
            };
            let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
                (fields.first(), fields.get(1))
            else {
                continue;
            };
            if (*start..=*end).contains(&i64::from(slot)) {
                if let Some(redis::Value::Array(master)) = fields.get(2) {
                    if let Some(redis::Value::Int(port)) = master.get(1) {
                        return self
                            .nodes
                            .iter()
                            .position(|n| i64::from(n.port) == *port)
                            .expect("a node of the cluster");
                    }
                }
            }
        }
        panic!("no node owns slot {slot}");
    }

    /// Moves `slot` to node `to` the way `redis-cli --cluster reshard` does, one key at a time
    /// while the store keeps writing: `IMPORTING` on the target, `MIGRATING` on the source,
    /// `MIGRATE` of every key, then `SETSLOT … NODE` on every node. `midway` runs when half the
    /// keys have moved, the slot split between two nodes. Returns the keys moved.
    pub async fn move_slot(&self, slot: u16, to: usize, midway: impl AsyncFnOnce()) -> usize {
        let from = self.owner(slot).await;
        assert_ne!(from, to, "the slot is on node {to} already");
        let (source, target) = (&self.nodes[from], &self.nodes[to]);
        let (source_id, target_id) = (Self::id(source).await, Self::id(target).await);
        let slot_text = slot.to_string();
        let ok = |reply: Option<redis::Value>, what: &str| {
            assert!(reply.is_some(), "{what} failed");
        };
        ok(
            target
                .query(&["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &source_id])
                .await,
            "SETSLOT IMPORTING",
        );
        ok(
            source
                .query(&["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &target_id])
                .await,
            "SETSLOT MIGRATING",
        );
        let target_port = target.port.to_string();
        let keys = source
            .query(&["CLUSTER", "COUNTKEYSINSLOT", &slot_text])
            .await
            .expect("COUNTKEYSINSLOT");
        let half = match keys {
            redis::Value::Int(n) => usize::try_from(n / 2).expect("a count"),
            other => panic!("COUNTKEYSINSLOT answered {other:?}"),
        };
        let mut midway = Some(midway);
        let mut moved = 0;
        loop {
            if moved == half {
                if let Some(midway) = midway.take() {
                    midway().await;
                }
            }
            let keys = source
                .query(&["CLUSTER", "GETKEYSINSLOT", &slot_text, "1"])
                .await
                .expect("GETKEYSINSLOT");
            let redis::Value::Array(keys) = keys else {
                panic!("GETKEYSINSLOT answered {keys:?}");
            };
            let Some(key) = keys.first().and_then(text) else {
                break;
            };
            ok(
                source
                    .query(&[
                        "MIGRATE",
                        "127.0.0.1",
                        &target_port,
                        "",
                        "0",
                        "5000",
                        "KEYS",
                        &key,
                    ])
                    .await,
                "MIGRATE",
            );
            moved += 1;
        }
        for node in [target, source].into_iter().chain(
            self.nodes
                .iter()
                .filter(|n| n.port != source.port && n.port != target.port),
        ) {
            ok(
                node.query(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &target_id])
                    .await,
                "SETSLOT NODE",
            );
        }
        moved
    }
}
