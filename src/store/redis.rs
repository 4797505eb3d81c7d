//! The Redis store, for many hosts: one Lua script applies a whole batch and its position in
//! one round trip, atomically.
//!
//! Every key carries the hash tag `{pleiades}`, so they share one slot and the script works on
//! Redis Cluster. Layout: `{pleiades}:day:<day>` hash (counter → value), `{pleiades}:all` hash,
//! `{pleiades}:days` sorted set (the index of days with data), `{pleiades}:positions` hash
//! (source → next position). Readers use HGETALL and ZRANGE on known keys: nothing scans.

use super::{Applied, Batch, Counters, StoreError};
use deadpool_redis::redis::{self, AsyncCommands};
use deadpool_redis::{Pool, Runtime};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

const POSITIONS: &str = "{pleiades}:positions";
const DAYS: &str = "{pleiades}:days";
const ALL_TIME: &str = "{pleiades}:all";

fn day_key(day: i64) -> String {
    format!("{{pleiades}}:day:{day}")
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

/// A pool of connections to one Redis; cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    pool: Pool,
    /// The URL with any password hidden, for errors and logs.
    peer: Arc<str>,
    script: Arc<redis::Script>,
    /// The longest one operation may take (`redis.timeout`).
    deadline: std::time::Duration,
}

impl RedisStore {
    /// A pool for `url`; connections are made on first use. With `rediss://`, the server's
    /// certificate must be signed by an authority of `ca_file` (PEM) when given, else by one
    /// the system trusts.
    pub fn open(
        url: &str,
        ca_file: Option<&Path>,
        deadline: std::time::Duration,
    ) -> Result<Self, StoreError> {
        let peer: Arc<str> = crate::config::redact_url(url).into();
        let fail = |message: String| StoreError::Redis {
            url: peer.to_string(),
            message,
        };
        let info = connection_info(url, ca_file).map_err(|e| fail(e.to_string()))?;
        let manager = deadpool_redis::Manager::new(info).map_err(|e| fail(e.to_string()))?;
        let pool = Pool::builder(manager)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        Ok(RedisStore {
            pool,
            peer,
            script: Arc::new(redis::Script::new(APPLY)),
            deadline,
        })
    }

    /// Runs one store operation with a deadline, so that a Redis that hangs (rather than
    /// refusing) fails the call instead of stalling its caller, and shutdown, indefinitely.
    pub async fn bounded<T>(
        &self,
        operation: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.deadline, operation)
            .await
            .unwrap_or_else(|_| Err(self.err(format!("no answer within {:?}", self.deadline))))
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Redis {
            url: self.peer.to_string(),
            message: e.to_string(),
        }
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, StoreError> {
        self.pool.get().await.map_err(|e| self.err(e))
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub async fn position(&self, source: &str) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        let value: Option<u64> = conn
            .hget(POSITIONS, source)
            .await
            .map_err(|e| self.err(e))?;
        Ok(value.unwrap_or(0))
    }

    pub async fn apply(&self, batch: &Batch) -> Result<Applied, StoreError> {
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(POSITIONS)
            .key(DAYS)
            .key(ALL_TIME)
            .arg(&batch.source)
            .arg(batch.start)
            .arg(batch.end);
        invocation.arg(batch.tally.all_time.len());
        for (name, delta) in &batch.tally.all_time {
            invocation.arg(name).arg(*delta);
        }
        for (day, counters) in &batch.tally.days {
            invocation.key(day_key(*day));
            invocation.arg(*day).arg(counters.len());
            for (name, delta) in counters {
                invocation.arg(name).arg(*delta);
            }
        }
        let mut conn = self.conn().await?;
        let (counted, stored): (i64, u64) = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(if counted == 1 {
            Applied::Counted
        } else {
            Applied::Stale { stored }
        })
    }

    pub async fn days(&self) -> Result<Vec<i64>, StoreError> {
        let mut conn = self.conn().await?;
        let days: Vec<i64> = conn.zrange(DAYS, 0, -1).await.map_err(|e| self.err(e))?;
        Ok(days)
    }

    pub async fn day(&self, day: i64) -> Result<Option<Counters>, StoreError> {
        let mut conn = self.conn().await?;
        let values: HashMap<String, i64> =
            conn.hgetall(day_key(day)).await.map_err(|e| self.err(e))?;
        Ok((!values.is_empty()).then(|| values.into_iter().collect()))
    }

    pub async fn range(&self, from: i64, to: i64) -> Result<Vec<(i64, Counters)>, StoreError> {
        let mut conn = self.conn().await?;
        let days: Vec<i64> = conn
            .zrangebyscore(DAYS, from, to)
            .await
            .map_err(|e| self.err(e))?;
        if days.is_empty() {
            return Ok(Vec::new());
        }
        // One round trip for all the days.
        let mut pipe = redis::pipe();
        for day in &days {
            pipe.hgetall(day_key(*day));
        }
        let values: Vec<HashMap<String, i64>> =
            pipe.query_async(&mut conn).await.map_err(|e| self.err(e))?;
        Ok(days
            .into_iter()
            .zip(values)
            .map(|(day, counters)| (day, counters.into_iter().collect()))
            .collect())
    }

    pub async fn all_time(&self) -> Result<Counters, StoreError> {
        let mut conn = self.conn().await?;
        let values: HashMap<String, i64> = conn.hgetall(ALL_TIME).await.map_err(|e| self.err(e))?;
        Ok(values.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let store = RedisStore::open(
            &format!("redis://{addr}/"),
            None,
            std::time::Duration::from_millis(300),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let error = store.bounded(store.position("file:x")).await.unwrap_err();
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
