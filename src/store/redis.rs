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
use std::sync::Arc;

const POSITIONS: &str = "{pleiades}:positions";
const DAYS: &str = "{pleiades}:days";
const ALL_TIME: &str = "{pleiades}:all";

fn day_key(day: i64) -> String {
    format!("{{pleiades}}:day:{day}")
}

/// Applies a batch. Counters are read with HMGET and written with one HSET per hash (in chunks
/// of 500 fields) instead of one HINCRBY per counter, so a batch costs a handful of commands
/// however many counters it touches. `%d` keeps large values out of exponent notation.
const APPLY: &str = r"
local stored = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if stored ~= tonumber(ARGV[2]) then return {0, tostring(stored)} end
local i = 4
local function merge(key)
  local n = tonumber(ARGV[i]); i = i + 1
  local done = 0
  while done < n do
    local m = math.min(n - done, 500)
    local fields, deltas = {}, {}
    for j = 1, m do fields[j] = ARGV[i]; deltas[j] = tonumber(ARGV[i + 1]); i = i + 2 end
    local current = redis.call('HMGET', key, unpack(fields))
    local values = {}
    for j = 1, m do
      values[2 * j - 1] = fields[j]
      values[2 * j] = string.format('%d', (tonumber(current[j]) or 0) + deltas[j])
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
    /// A pool for `url`; connections are made on first use.
    pub fn open(url: &str, deadline: std::time::Duration) -> Result<Self, StoreError> {
        let peer: Arc<str> = crate::config::redact_url(url).into();
        let pool = deadpool_redis::Config::from_url(url)
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| StoreError::Redis {
                url: peer.to_string(),
                message: e.to_string(),
            })?;
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
    }
}
