//! The Redis store, for many hosts: one Lua script applies a whole batch and its position in
//! one round trip, atomically.
//!
//! Every key carries the hash tag `{pleiades}`, so they share one slot and the script works on
//! Redis Cluster. Layout: `{pleiades}:day:<day>` hash (counter → value), `{pleiades}:all` hash,
//! `{pleiades}:days` sorted set (the index of days with data), `{pleiades}:positions` hash
//! (source → next position). Readers use HGETALL and ZRANGE on known keys: nothing scans.

use super::redis_link::{RedisLink, Request, Topology};
use super::{Applied, Batch, Counters, StoreError};
use crate::config::RedisConfig;
use crate::metrics::StoreMetrics;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The hash tag of every key: Redis Cluster puts all of them in the slot of `pleiades`, so
/// the apply script and every multi-key read work there.
pub const HASH_TAG: &str = "{pleiades}";
const POSITIONS: &str = "{pleiades}:positions";
const DAYS: &str = "{pleiades}:days";
const ALL_TIME: &str = "{pleiades}:all";

fn day_key(day: i64) -> String {
    format!("{HASH_TAG}:day:{day}")
}

/// The keys the store writes for the days `days`: what a test of their slots checks.
pub fn keys_for(days: &[i64]) -> Vec<String> {
    let mut keys = vec![POSITIONS.to_owned(), DAYS.to_owned(), ALL_TIME.to_owned()];
    keys.extend(days.iter().map(|day| day_key(*day)));
    keys
}

/// Applies a batch. Counters are read with HMGET and written with one HSET per hash (in chunks
/// of 500 fields) instead of one HINCRBY per counter, so a batch costs a handful of commands
/// however many counters it touches.
///
/// Lua numbers are doubles, exact only up to 2^53, so values and deltas travel as decimal
/// strings and are added as such: below 10^15 with Lua numbers (exact there), beyond with
/// digit-by-digit arithmetic, saturating at the bounds of a signed 64-bit integer as the
/// embedded store does. This keeps the stored values plain decimal integers (what HGETALL
/// readers and HINCRBY expect) and the command count unchanged. Positions are compared as the
/// strings they were written as.
const APPLY: &str = r"
local MAX, MIN_MAG = '9223372036854775807', '9223372036854775808'
local function cmp_mag(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local function add_mag(a, b)
  local out, carry, i, j = {}, 0, #a, #b
  while i > 0 or j > 0 or carry > 0 do
    local d = carry + (i > 0 and a:byte(i) - 48 or 0) + (j > 0 and b:byte(j) - 48 or 0)
    out[#out + 1] = string.char(48 + d % 10)
    carry = math.floor(d / 10)
    i, j = i - 1, j - 1
  end
  return string.reverse(table.concat(out))
end
local function sub_mag(a, b)
  local out, borrow, i, j = {}, 0, #a, #b
  while i > 0 do
    local d = a:byte(i) - 48 - borrow - (j > 0 and b:byte(j) - 48 or 0)
    if d < 0 then d, borrow = d + 10, 1 else borrow = 0 end
    out[#out + 1] = string.char(48 + d)
    i, j = i - 1, j - 1
  end
  local s = string.gsub(string.reverse(table.concat(out)), '^0+', '')
  if s == '' then return '0' end
  return s
end
local function add(x, y)
  if #x < 16 and #y < 16 then return string.format('%d', tonumber(x) + tonumber(y)) end
  local sx, mx, sy, my = 1, x, 1, y
  if x:sub(1, 1) == '-' then sx, mx = -1, x:sub(2) end
  if y:sub(1, 1) == '-' then sy, my = -1, y:sub(2) end
  local sign, mag
  if sx == sy then
    sign, mag = sx, add_mag(mx, my)
  else
    local c = cmp_mag(mx, my)
    if c == 0 then return '0' end
    if c > 0 then sign, mag = sx, sub_mag(mx, my) else sign, mag = sy, sub_mag(my, mx) end
  end
  if sign > 0 then
    if cmp_mag(mag, MAX) > 0 then return MAX end
    return mag
  end
  if cmp_mag(mag, MIN_MAG) > 0 then mag = MIN_MAG end
  return '-' .. mag
end
local stored = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
if stored ~= ARGV[2] then return {0, stored} end
local i = 4
local function merge(key)
  local n = tonumber(ARGV[i]); i = i + 1
  local done = 0
  while done < n do
    local m = math.min(n - done, 500)
    local fields, deltas = {}, {}
    for j = 1, m do fields[j] = ARGV[i]; deltas[j] = ARGV[i + 1]; i = i + 2 end
    local current = redis.call('HMGET', key, unpack(fields))
    local values = {}
    for j = 1, m do
      values[2 * j - 1] = fields[j]
      values[2 * j] = add(current[j] or '0', deltas[j])
    end
    redis.call('HSET', key, unpack(values))
    done = done + m
  end
end
merge(KEYS[3])
local zadd = {}
for k = 4, #KEYS do
  local day = ARGV[i]; i = i + 1
  zadd[#zadd + 1] = day
  zadd[#zadd + 1] = day
  merge(KEYS[k])
end
if #zadd > 0 then redis.call('ZADD', KEYS[2], unpack(zadd)) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return {1, ARGV[3]}
";

/// Why the Redis settings cannot be used; never repeats the URL (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("not a usable Redis URL ({0})")]
    Url(String),
    #[error("{path}: {reason}")]
    CaFile { path: String, reason: String },
}

impl SettingsError {
    /// The configuration key at fault.
    pub fn key(&self) -> &'static str {
        match self {
            SettingsError::Url(_) => "redis.url",
            SettingsError::CaFile { .. } => "redis.ca_file",
        }
    }
}

/// Parses `url` the way the client will use it, with the authorities of `ca_file` for TLS.
pub fn connection_info(
    url: &str,
    ca_file: Option<&Path>,
) -> Result<redis::ConnectionInfo, SettingsError> {
    use redis::IntoConnectionInfo as _;
    let info = url
        .into_connection_info()
        .map_err(|e| SettingsError::Url(e.category().to_owned()))?;
    let Some(ca_file) = ca_file else {
        return Ok(info);
    };
    let fail = |reason: String| SettingsError::CaFile {
        path: ca_file.display().to_string(),
        reason,
    };
    let root_cert = std::fs::read(ca_file).map_err(|e| fail(e.to_string()))?;
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(root_cert),
    };
    redis::Client::build_with_tls(info, certificates)
        .map(|client| client.get_connection_info().clone())
        .map_err(|e| fail(e.to_string()))
}

/// The Redis store; cheap to clone (one link to Redis underneath, shared by every clone).
#[derive(Clone)]
pub struct RedisStore {
    link: Arc<RedisLink>,
    /// The apply script's SHA1, for `EVALSHA`.
    script_hash: Arc<str>,
}

impl RedisStore {
    /// A store on the Redis `config` describes: one server at `redis.url`, the master the
    /// `redis.sentinels` name, or the master of the `{pleiades}` slot of `redis.cluster`.
    /// Nothing is connected before the first operation. With `rediss://`, servers' certificates
    /// must be signed by an authority of `redis.ca_file` (PEM) when given, else by one the
    /// system trusts.
    pub fn open(config: &RedisConfig, metrics: StoreMetrics) -> Result<Self, StoreError> {
        let template = connection_info(&config.url, config.ca_file.as_deref()).map_err(|e| {
            StoreError::Redis {
                url: crate::config::redact_url(&config.url),
                message: e.to_string(),
            }
        })?;
        let topology = Topology::of(config, template);
        Ok(RedisStore {
            link: Arc::new(RedisLink::new(
                topology,
                &config.url,
                config.timeout,
                metrics,
            )),
            script_hash: redis::Script::new(APPLY).get_hash().into(),
        })
    }

    /// The link's epoch: it moves whenever a new connection may reach a server that lacks
    /// writes an earlier one acknowledged (see [`RedisLink::epoch`]).
    pub async fn epoch(&self) -> u64 {
        self.link.epoch().await
    }

    /// Sends one command and decodes its reply.
    async fn one<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, StoreError> {
        let mut replies = self.link.send(&Request::one(cmd)).await?;
        self.decode(replies.pop().unwrap_or(redis::Value::Nil))
    }

    fn decode<T: redis::FromRedisValue>(&self, value: redis::Value) -> Result<T, StoreError> {
        redis::from_redis_value(value).map_err(|e| self.link.error(e))
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.one::<String>(redis::cmd("PING")).await.map(|_| ())
    }

    pub async fn position(&self, source: &str) -> Result<u64, StoreError> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(POSITIONS).arg(source);
        let value: Option<u64> = self.one(cmd).await?;
        Ok(value.unwrap_or(0))
    }

    pub async fn apply(&self, batch: &Batch) -> Result<Applied, StoreError> {
        let mut keys = vec![POSITIONS.to_owned(), DAYS.to_owned(), ALL_TIME.to_owned()];
        let mut args = vec![
            batch.source.clone(),
            batch.start.to_string(),
            batch.end.to_string(),
            batch.tally.all_time.len().to_string(),
        ];
        for (name, delta) in &batch.tally.all_time {
            args.push(name.clone());
            args.push(delta.to_string());
        }
        for (day, counters) in &batch.tally.days {
            keys.push(day_key(*day));
            args.push(day.to_string());
            args.push(counters.len().to_string());
            for (name, delta) in counters {
                args.push(name.clone());
                args.push(delta.to_string());
            }
        }
        let call = |verb: &str, script: &str| {
            let mut cmd = redis::cmd(verb);
            cmd.arg(script).arg(keys.len()).arg(&keys).arg(&args);
            cmd
        };
        let request = Request::Script {
            by_hash: call("EVALSHA", &self.script_hash),
            with_body: call("EVAL", APPLY),
        };
        let mut replies = self.link.send(&request).await?;
        let (counted, stored): (i64, u64) =
            self.decode(replies.pop().unwrap_or(redis::Value::Nil))?;
        Ok(if counted == 1 {
            Applied::Counted
        } else {
            Applied::Stale { stored }
        })
    }

    pub async fn days(&self) -> Result<Vec<i64>, StoreError> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(DAYS).arg(0).arg(-1);
        self.one(cmd).await
    }

    pub async fn day(&self, day: i64) -> Result<Option<Counters>, StoreError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(day_key(day));
        let values: HashMap<String, i64> = self.one(cmd).await?;
        Ok((!values.is_empty()).then(|| values.into_iter().collect()))
    }

    pub async fn range(&self, from: i64, to: i64) -> Result<Vec<(i64, Counters)>, StoreError> {
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(DAYS).arg(from).arg(to);
        let days: Vec<i64> = self.one(cmd).await?;
        if days.is_empty() {
            return Ok(Vec::new());
        }
        // One round trip for all the days.
        let commands = days
            .iter()
            .map(|day| {
                let mut cmd = redis::cmd("HGETALL");
                cmd.arg(day_key(*day));
                cmd
            })
            .collect();
        let replies = self.link.send(&Request::Commands(commands)).await?;
        let mut out = Vec::with_capacity(days.len());
        for (day, reply) in days.into_iter().zip(replies) {
            let counters: HashMap<String, i64> = self.decode(reply)?;
            out.push((day, counters.into_iter().collect()));
        }
        Ok(out)
    }

    pub async fn all_time(&self) -> Result<Counters, StoreError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(ALL_TIME);
        let values: HashMap<String, i64> = self.one(cmd).await?;
        Ok(values.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_lives_in_the_slot_of_the_hash_tag() {
        use super::super::redis_link::key_slot;
        let slot = key_slot(HASH_TAG.as_bytes());
        assert_eq!(slot, key_slot(b"pleiades"));
        for key in keys_for(&[i64::MIN, -1, 0, 19_337, 20_000, i64::MAX]) {
            assert!(key.starts_with(HASH_TAG), "{key}");
            assert_eq!(key_slot(key.as_bytes()), slot, "{key}");
        }
    }

    #[tokio::test]
    async fn a_server_that_never_answers_fails_the_call_in_time() {
        // Accepts connections and reads, but never writes a byte back.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let config = RedisConfig {
            url: format!("redis://{addr}/"),
            timeout: std::time::Duration::from_millis(300),
            ..RedisConfig::default()
        };
        let metrics = crate::metrics::Metrics::new(1).unwrap();
        let store = RedisStore::open(&config, metrics.store.clone()).unwrap();
        let started = std::time::Instant::now();
        let error = store.position("file:x").await.unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
        assert!(error.to_string().contains("no answer within"), "{error}");
    }

    #[test]
    fn passwords_never_reach_logs() {
        let redact = crate::config::redact_url;
        assert_eq!(
            redact("redis://:secret@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        // A URL that does not parse is still cut before its last @.
        assert_eq!(
            redact("rediss://:s3cr3t@[::1:6379/0"),
            "rediss://***@[::1:6379/0"
        );
        assert_eq!(redact("redis//user:s3cr3t@host"), "***@host");
        let error = connection_info("redis://:s3cr3t@host:notaport/", None).unwrap_err();
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
        assert_eq!(error.key(), "redis.url");
    }
}
