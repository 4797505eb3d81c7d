//! The Redis store, for many hosts: one Lua script applies a whole batch and its position in
//! one round trip, atomically.
//!
//! Every key carries the hash tag `{pleiades}`, so they share one slot and the script works on
//! Redis Cluster. Layout: `{pleiades}:day:<day>` hash (counter → value), `{pleiades}:all` hash,
//! `{pleiades}:days` sorted set (the index of days with data), `{pleiades}:positions` hash
//! (source → next position). Readers use HGETALL and ZRANGE on known keys: nothing scans.
//!
//! The further dimensions live in two hashes that hold every day, so that a batch costs the
//! same handful of commands however many days it touches: `{pleiades}:hours`
//! (`<day>:<HH>:<counter>` → value) and `{pleiades}:sketches`. There each sketch (one per day,
//! kind and family, `<day>:<kind>:<family>`) is a `:base` in its stored form, and the deltas of
//! the batches since (`:<n>`, numbered from `:done` to `:next`). A batch only appends its
//! deltas, a copy of bytes for Redis; merging them into the base is Rust's work (the
//! sketches' merge rules exist once), done by the aggregator that sees [`COMPACT_AFTER`] deltas
//! waiting, in one script call that checks `:done` did not move meanwhile. A merge is a sum, a
//! minimum or a maximum, so when and by whom it happens changes nothing. Readers get a base
//! and its deltas in one script call, and merge them.

use super::redis_link::{RedisLink, Request, Topology};
use super::{Applied, Batch, Counters, SketchKind, StoreError};
use crate::config::RedisConfig;
use crate::counters::hour_counter;
use crate::coverage::{DayCoverage, Span, TopicPartition};
use crate::metrics::StoreMetrics;
use crate::project::Family;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The hash tag of every key: Redis Cluster puts all of them in the slot of `pleiades`, so
/// the apply script and every multi-key read work there.
pub const HASH_TAG: &str = "{pleiades}";
const POSITIONS: &str = "{pleiades}:positions";
const DAYS: &str = "{pleiades}:days";
const ALL_TIME: &str = "{pleiades}:all";
const HOURS: &str = "{pleiades}:hours";
const SKETCHES: &str = "{pleiades}:sketches";
/// Every day's coverage, one field per day (see the apply script's `cover`).
const COVERAGE: &str = "{pleiades}:coverage";

/// Deltas a sketch holds before the aggregator that appended the last one merges them into its
/// base: the bound on what a reader merges, and on the deltas' share of the store.
pub const COMPACT_AFTER: u32 = 8;

fn day_key(day: i64) -> String {
    format!("{HASH_TAG}:day:{day}")
}

/// The keys of one counter space: the live one, or the one a rebuild fills before it takes the
/// live one's place (`super::space`). Both carry the hash tag, so they share one slot.
#[derive(Debug, Clone, Copy)]
pub(super) struct Keys {
    pub positions: &'static str,
    pub days: &'static str,
    pub all_time: &'static str,
    /// A day's hash is this prefix followed by the day.
    pub day_prefix: &'static str,
    /// Whether the per-hour counters and the sketches are written too (the live space only).
    pub dimensions: bool,
}

impl Keys {
    pub fn day(&self, day: i64) -> String {
        format!("{}{day}", self.day_prefix)
    }
}

/// The space every reader and the daemon's aggregators use.
pub(super) const LIVE: Keys = Keys {
    positions: POSITIONS,
    days: DAYS,
    all_time: ALL_TIME,
    day_prefix: "{pleiades}:day:",
    dimensions: true,
};

/// The space a rebuild counts into.
pub(super) const REBUILD: Keys = Keys {
    positions: "{pleiades}:rebuild:positions",
    days: "{pleiades}:rebuild:days",
    all_time: "{pleiades}:rebuild:all",
    day_prefix: "{pleiades}:rebuild:day:",
    dimensions: false,
};

/// The keys the store writes for the days `days`: what a test of their slots checks.
pub fn keys_for(days: &[i64]) -> Vec<String> {
    let mut keys = vec![
        POSITIONS.to_owned(),
        DAYS.to_owned(),
        ALL_TIME.to_owned(),
        HOURS.to_owned(),
        SKETCHES.to_owned(),
        COVERAGE.to_owned(),
    ];
    keys.extend(days.iter().map(|day| day_key(*day)));
    keys
}

/// Lua functions that add signed decimal strings exactly, saturating at the bounds of i64;
/// the apply script and the rebuild's switch (`super::space`) share them.
macro_rules! decimal_lua {
    () => {
        r"
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
"
    };
}
pub(super) use decimal_lua;

/// Applies a batch. Counters are read with HMGET and written with one HSET per hash (in chunks
/// of 3,500 fields) instead of one HINCRBY per counter, so a batch costs a handful of commands
/// however many counters it touches. The further dimensions merge the same way, each with its
/// own rule: per-hour counters add; sketches get the batch's delta appended, for
/// [`RedisStore::compact`] to merge in Rust.
///
/// Lua numbers are doubles, exact only up to 2^53, so values and deltas travel as decimal
/// strings and are added as such: below 10^15 with Lua numbers (exact there), beyond with
/// digit-by-digit arithmetic, saturating at the bounds of a signed 64-bit integer as the
/// embedded store does. This keeps the stored values plain decimal integers (what HGETALL
/// readers and HINCRBY expect) and the command count unchanged. Positions are compared as the
/// strings they were written as.
const APPLY: &str = concat!(
    "local COMPACT_AFTER = 8\n",
    decimal_lua!(),
    r"
local stored = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
if stored ~= ARGV[2] then return {0, stored} end
local i = 4
-- Merges the next section of ARGV (a count, then field/value pairs) into the hash `key`, in
-- chunks of 3500 fields (HSET gets twice as many arguments, under Lua's unpack limit of 8000).
local function merge(key, combine)
  local n = tonumber(ARGV[i]); i = i + 1
  local done = 0
  while done < n do
    local m = math.min(n - done, 3500)
    local fields, deltas = {}, {}
    for j = 1, m do fields[j] = ARGV[i]; deltas[j] = ARGV[i + 1]; i = i + 2 end
    local current = redis.call('HMGET', key, unpack(fields))
    local values = {}
    for j = 1, m do
      values[2 * j - 1] = fields[j]
      values[2 * j] = combine(current[j], deltas[j])
    end
    redis.call('HSET', key, unpack(values))
    done = done + m
  end
end
local function sum(current, delta) return add(current or '0', delta) end
merge(KEYS[3], sum)
merge(KEYS[4], sum)
-- Sketch deltas (a count, then sketch/delta pairs): each becomes the field `<sketch>:<next>`
-- and `<sketch>:next` moves on. The sketches with COMPACT_AFTER or more deltas waiting are
-- returned, for the caller to merge into their bases.
local due = {}
local sketches = tonumber(ARGV[i]); i = i + 1
local appended = 0
while appended < sketches do
  local m = math.min(sketches - appended, 1000)
  local names, blobs, fields = {}, {}, {}
  for j = 1, m do
    names[j] = ARGV[i]; blobs[j] = ARGV[i + 1]; i = i + 2
    fields[2 * j - 1] = names[j] .. ':next'
    fields[2 * j] = names[j] .. ':done'
  end
  local counters = redis.call('HMGET', KEYS[5], unpack(fields))
  local values = {}
  for j = 1, m do
    local next = tonumber(counters[2 * j - 1] or '0')
    local first = tonumber(counters[2 * j] or '0')
    values[#values + 1] = names[j] .. ':' .. string.format('%d', next)
    values[#values + 1] = blobs[j]
    values[#values + 1] = names[j] .. ':next'
    values[#values + 1] = string.format('%d', next + 1)
    if next + 1 - first >= COMPACT_AFTER then due[#due + 1] = names[j] end
  end
  redis.call('HSET', KEYS[5], unpack(values))
  appended = appended + m
end
-- Coverage (a count, then day/spans pairs) joins each day's stored spans in `KEYS[6]`: two
-- commands per batch however many days it touches. A day's value is `;`-separated entries,
-- `<tp>,<first>,<last>,<first_ms>,<last_ms>` for a span of a topic-partition's offsets and
-- `u,<n>` for events without a position; joined, the spans are sorted and those that overlap
-- or touch merged, so a day holds one span per run of consecutive offsets.
local function cover(current, delta)
  local spans, unpositioned = {}, 0
  local function read(text)
    for entry in string.gmatch(text, '[^;]+') do
      local tp, a, b, c, d = string.match(entry, '^([^,]+),([^,]+),([^,]+),([^,]+),([^,]+)$')
      if tp then
        local list = spans[tp]
        if not list then list = {}; spans[tp] = list end
        list[#list + 1] = {tonumber(a), tonumber(b), c, d}
      else
        local n = string.match(entry, '^u,(%d+)$')
        if n then unpositioned = unpositioned + tonumber(n) end
      end
    end
  end
  read(current or '')
  read(delta)
  local tps = {}
  for tp in pairs(spans) do tps[#tps + 1] = tp end
  table.sort(tps)
  local out = {}
  local function emit(tp, span)
    out[#out + 1] = tp .. ',' .. string.format('%d', span[1]) .. ',' ..
      string.format('%d', span[2]) .. ',' .. span[3] .. ',' .. span[4]
  end
  for _, tp in ipairs(tps) do
    local list = spans[tp]
    table.sort(list, function(x, y)
      if x[1] ~= y[1] then return x[1] < y[1] end
      return x[2] < y[2]
    end)
    local run = nil
    for _, span in ipairs(list) do
      if run and span[1] <= run[2] + 1 then
        if span[2] > run[2] then run[2] = span[2]; run[4] = span[4] end
      else
        if run then emit(tp, run) end
        run = {span[1], span[2], span[3], span[4]}
      end
    end
    if run then emit(tp, run) end
  end
  if unpositioned > 0 then out[#out + 1] = 'u,' .. string.format('%d', unpositioned) end
  return table.concat(out, ';')
end
merge(KEYS[6], cover)
local zadd = {}
for k = 7, #KEYS do
  local day = ARGV[i]; i = i + 1
  zadd[#zadd + 1] = day
  zadd[#zadd + 1] = day
  merge(KEYS[k], sum)
end
if #zadd > 0 then redis.call('ZADD', KEYS[2], unpack(zadd)) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
local reply = {1, ARGV[3]}
for _, name in ipairs(due) do reply[#reply + 1] = name end
return reply
",
);

/// Merges sketch deltas into their bases: ARGV is a count, then per sketch its name, the
/// `:done` the caller read, the `:next` it read and the merged base. A sketch whose `:done`
/// moved meanwhile (another aggregator merged it first) is left alone; the others get their
/// new base, `:done` moves to the `:next` read, and the merged deltas are deleted. Returns how
/// many sketches were merged.
const COMPACT: &str = r"
local n = tonumber(ARGV[1])
local fields = {}
for j = 1, n do fields[j] = ARGV[2 + 4 * (j - 1)] .. ':done' end
local current = redis.call('HMGET', KEYS[1], unpack(fields))
local sets, dels, merged = {}, {}, 0
local function flush(command, list)
  if #list > 0 then redis.call(command, KEYS[1], unpack(list)) end
end
for j = 1, n do
  local k = 2 + 4 * (j - 1)
  local name, first, upto, base = ARGV[k], ARGV[k + 1], ARGV[k + 2], ARGV[k + 3]
  if (current[j] or '0') == first then
    merged = merged + 1
    sets[#sets + 1] = name .. ':base'; sets[#sets + 1] = base
    sets[#sets + 1] = name .. ':done'; sets[#sets + 1] = upto
    for d = tonumber(first), tonumber(upto) - 1 do
      dels[#dels + 1] = name .. ':' .. string.format('%d', d)
      if #dels >= 7000 then flush('HDEL', dels); dels = {} end
    end
    if #sets >= 7000 then flush('HSET', sets); sets = {} end
  end
end
flush('HSET', sets)
flush('HDEL', dels)
return merged
";

/// Reads sketches with their deltas, in one step so that no merge slips between the two: ARGV
/// are sketch names; the reply is, per sketch, its `:done`, its `:next`, its base and then its
/// deltas. The fields of every sketch are read together (one HMGET per 2,000 fields), so a
/// read of many sketches costs a few commands, not two per sketch.
const READ_SKETCHES: &str = r"
local function read(fields)
  local out, at = {}, 1
  while at <= #fields do
    local last = math.min(#fields, at + 1999)
    local got = redis.call('HMGET', KEYS[1], unpack(fields, at, last))
    for k = 1, #got do out[#out + 1] = got[k] end
    at = last + 1
  end
  return out
end
local heads = {}
for j = 1, #ARGV do
  heads[#heads + 1] = ARGV[j] .. ':done'
  heads[#heads + 1] = ARGV[j] .. ':next'
  heads[#heads + 1] = ARGV[j] .. ':base'
end
heads = read(heads)
local wanted, spans = {}, {}
for j = 1, #ARGV do
  local first = tonumber(heads[3 * j - 2] or '0')
  local next = tonumber(heads[3 * j - 1] or '0')
  spans[j] = {first, next}
  for d = first, next - 1 do wanted[#wanted + 1] = ARGV[j] .. ':' .. string.format('%d', d) end
end
local deltas = read(wanted)
local reply, at = {}, 1
for j = 1, #ARGV do
  local first, next = spans[j][1], spans[j][2]
  reply[#reply + 1] = first
  reply[#reply + 1] = next
  reply[#reply + 1] = heads[3 * j] or ''
  for d = first, next - 1 do
    reply[#reply + 1] = deltas[at] or ''
    at = at + 1
  end
end
return reply
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
    pub(super) link: Arc<RedisLink>,
    /// The scripts, each with its SHA1 for `EVALSHA`.
    apply: Arc<StoredScript>,
    compact: Arc<StoredScript>,
    read_sketches: Arc<StoredScript>,
    /// Whether a merge of sketch deltas is running ([`RedisStore::compact_in_background`]).
    compacting: Arc<AtomicBool>,
    /// The counter space this handle reads and writes.
    pub(super) keys: Keys,
}

/// Clears the store's `compacting` flag when a background merge ends, however it ends.
struct CompactingFlag(Arc<AtomicBool>);

impl Drop for CompactingFlag {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A Lua script's body and hash.
struct StoredScript {
    body: String,
    hash: String,
}

impl StoredScript {
    fn new(body: String) -> Self {
        let hash = redis::Script::new(&body).get_hash().to_owned();
        StoredScript { body, hash }
    }

    /// The call of the script on `keys` with `args`: by hash, and with the body for a server
    /// that does not know the hash yet.
    fn call<K: redis::ToRedisArgs, A: redis::ToRedisArgs>(&self, keys: &[K], args: A) -> Request {
        let call = |verb: &str, script: &str| {
            let mut cmd = redis::cmd(verb);
            cmd.arg(script).arg(keys.len()).arg(keys).arg(&args);
            cmd
        };
        Request::Script {
            by_hash: call("EVALSHA", &self.hash),
            with_body: call("EVAL", &self.body),
        }
    }
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
            apply: Arc::new(StoredScript::new(APPLY.replace(
                "COMPACT_AFTER = 8",
                &format!("COMPACT_AFTER = {COMPACT_AFTER}"),
            ))),
            compact: Arc::new(StoredScript::new(COMPACT.to_owned())),
            read_sketches: Arc::new(StoredScript::new(READ_SKETCHES.to_owned())),
            compacting: Arc::default(),
            keys: LIVE,
        })
    }

    /// The link's epoch: it moves whenever a new connection may reach a server that lacks
    /// writes an earlier one acknowledged (see [`RedisLink::epoch`]).
    pub async fn epoch(&self) -> u64 {
        self.link.epoch().await
    }

    /// Sends one command and decodes its reply.
    pub(super) async fn one<T: redis::FromRedisValue>(
        &self,
        cmd: redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut replies = self.link.send(&Request::one(cmd)).await?;
        self.decode(replies.pop().unwrap_or(redis::Value::Nil))
    }

    pub(super) fn decode<T: redis::FromRedisValue>(
        &self,
        value: redis::Value,
    ) -> Result<T, StoreError> {
        redis::from_redis_value(value).map_err(|e| self.link.error(e))
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.one::<String>(redis::cmd("PING")).await.map(|_| ())
    }

    pub async fn position(&self, source: &str) -> Result<u64, StoreError> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(self.keys.positions).arg(source);
        let value: Option<u64> = self.one(cmd).await?;
        Ok(value.unwrap_or(0))
    }

    /// Applies a batch; also returns the sketches that now have [`COMPACT_AFTER`] deltas
    /// waiting, for [`RedisStore::compact`].
    pub async fn apply(&self, batch: &Batch) -> Result<(Applied, Vec<String>), StoreError> {
        let space = self.keys;
        let mut keys = vec![
            space.positions.to_owned(),
            space.days.to_owned(),
            space.all_time.to_owned(),
            HOURS.to_owned(),
            SKETCHES.to_owned(),
            COVERAGE.to_owned(),
        ];
        let tally = &batch.tally;
        let mut args: Vec<Vec<u8>> = Vec::new();
        let text = |args: &mut Vec<Vec<u8>>, value: String| args.push(value.into_bytes());
        text(&mut args, batch.source.clone());
        text(&mut args, batch.start.to_string());
        text(&mut args, batch.end.to_string());
        let all_time = tally.all_time();
        text(&mut args, all_time.len().to_string());
        for (name, delta) in all_time {
            text(&mut args, name);
            text(&mut args, delta.to_string());
        }
        // The per-hour counters and the sketches have one space, the live one: a rebuild
        // recounts the counters and leaves them as the aggregators keep them.
        let no_hours = crate::counters::FastMap::default();
        let hours = if space.dimensions {
            &tally.hours
        } else {
            &no_hours
        };
        text(
            &mut args,
            hours.values().map(|c| c.len()).sum::<usize>().to_string(),
        );
        for (day, counters) in hours {
            for (name, delta) in counters {
                text(&mut args, format!("{day}:{name}"));
                text(&mut args, delta.to_string());
            }
        }
        let deltas = if space.dimensions {
            super::sketch_deltas(tally)
        } else {
            Vec::new()
        };
        text(&mut args, deltas.len().to_string());
        for (day, kind, family, bytes) in deltas {
            text(&mut args, sketch_name(day, kind, family));
            args.push(bytes);
        }
        // Coverage has one space, the live one, like the further dimensions: a rebuild reads
        // events whose offsets the live space already holds.
        let no_coverage = crate::counters::FastMap::default();
        let coverage = if space.dimensions {
            &tally.coverage
        } else {
            &no_coverage
        };
        text(&mut args, coverage.len().to_string());
        for (day, day_coverage) in coverage {
            text(&mut args, day.to_string());
            text(&mut args, coverage_text(day_coverage));
        }
        for (day, counters) in &tally.days {
            keys.push(space.day(*day));
            text(&mut args, day.to_string());
            text(&mut args, counters.len().to_string());
            for (name, delta) in counters {
                text(&mut args, name.clone());
                text(&mut args, delta.to_string());
            }
        }
        let reply: Vec<redis::Value> = self.first(self.apply.call(&keys, args)).await?;
        let number = |value: Option<&redis::Value>| -> Option<u64> {
            match value? {
                redis::Value::Int(n) => u64::try_from(*n).ok(),
                redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
                _ => None,
            }
        };
        let (Some(counted), Some(stored)) = (number(reply.first()), number(reply.get(1))) else {
            return Err(self
                .link
                .error(format!("the apply script answered {reply:?}")));
        };
        if counted != 1 {
            return Ok((Applied::Stale { stored }, Vec::new()));
        }
        let due: Vec<String> = reply[2..]
            .iter()
            .filter_map(|v| match v {
                redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                _ => None,
            })
            .collect();
        Ok((Applied::Counted, due))
    }

    /// Sends `request` and decodes its first reply.
    async fn first<T: redis::FromRedisValue>(&self, request: Request) -> Result<T, StoreError> {
        let mut replies = self.link.send(&request).await?;
        if replies.is_empty() {
            return self.decode(redis::Value::Nil);
        }
        self.decode(replies.swap_remove(0))
    }

    /// Merges the deltas of the sketches `names` into their bases on a task of its own, so
    /// that the batch that found them due does not wait for it (the merge reads and writes
    /// every delta and base: several times the batch's own work). At most one merge runs per
    /// store at a time; sketches found due meanwhile keep their deltas, which readers merge,
    /// and the next batch that touches them finds them due again. A merge cut short (a
    /// failure, a stop) changes nothing: the compact script checks that nothing merged the
    /// same deltas first, and writes a sketch's new base, `:done` and deletions at once.
    pub fn compact_in_background(&self, names: Vec<String>) {
        if self.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        let flag = CompactingFlag(self.compacting.clone());
        let store = self.clone();
        tokio::spawn(async move {
            let _flag = flag;
            if let Err(error) = store.compact(&names).await {
                tracing::warn!(%error, sketches = names.len(), "merging sketch deltas failed; a later batch merges them");
            }
        });
    }

    /// Whether a background merge is running.
    pub fn compacting(&self) -> bool {
        self.compacting.load(Ordering::Acquire)
    }

    /// Merges the deltas of the sketches `names` into their bases.
    pub async fn compact(&self, names: &[String]) -> Result<(), StoreError> {
        let read = self.read(names).await?;
        let mut count = 0;
        let mut args = Vec::new();
        for (name, stored) in names.iter().zip(read) {
            let Some(kind) = name.split(':').nth(1).and_then(SketchKind::parse) else {
                continue;
            };
            let parts = std::iter::once(stored.base.as_slice())
                .chain(stored.deltas.iter().map(Vec::as_slice))
                .filter(|part| !part.is_empty());
            let Some(merged) = super::merge_stored(kind, parts) else {
                tracing::warn!(sketch = %name, "a stored sketch or delta is unreadable; it is left as it is");
                continue;
            };
            args.push((name, stored.done, stored.next, merged));
            count += 1;
        }
        if count == 0 {
            return Ok(());
        }
        let mut argv: Vec<Vec<u8>> = vec![count.to_string().into_bytes()];
        for (name, done, next, merged) in args {
            argv.push(name.clone().into_bytes());
            argv.push(done.to_string().into_bytes());
            argv.push(next.to_string().into_bytes());
            argv.push(merged);
        }
        let _: i64 = self.first(self.compact.call(&[SKETCHES], argv)).await?;
        Ok(())
    }

    /// Each sketch's base and deltas, read in one step.
    async fn read(&self, names: &[String]) -> Result<Vec<StoredSketch>, StoreError> {
        let reply: Vec<redis::Value> = self
            .first(self.read_sketches.call(&[SKETCHES], names))
            .await?;
        let bad = || {
            self.link
                .error("the sketch read script answered something else than sketches")
        };
        let mut values = reply.into_iter();
        let mut sketches = Vec::with_capacity(names.len());
        for _ in names {
            let (Some(redis::Value::Int(done)), Some(redis::Value::Int(next))) =
                (values.next(), values.next())
            else {
                return Err(bad());
            };
            let mut blob = || match values.next() {
                Some(redis::Value::BulkString(b)) => Ok(b),
                _ => Err(bad()),
            };
            let base = blob()?;
            let mut deltas = Vec::new();
            for _ in done..next.max(done) {
                deltas.push(blob()?);
            }
            sketches.push(StoredSketch {
                done,
                next,
                base,
                deltas,
            });
        }
        Ok(sketches)
    }

    /// The stored form of one day's `kind` sketch of each of `families` that has one: its base
    /// and deltas merged.
    pub async fn sketches(
        &self,
        day: i64,
        kind: SketchKind,
        families: &[Family],
    ) -> Result<Vec<(Family, Vec<u8>)>, StoreError> {
        let names: Vec<String> = families
            .iter()
            .map(|family| sketch_name(day, kind, *family))
            .collect();
        let mut found = Vec::new();
        for (family, stored) in families.iter().zip(self.read(&names).await?) {
            let parts: Vec<&[u8]> = std::iter::once(stored.base.as_slice())
                .chain(stored.deltas.iter().map(Vec::as_slice))
                .filter(|part| !part.is_empty())
                .collect();
            if parts.is_empty() {
                continue;
            }
            let merged = super::merge_stored(kind, parts).ok_or_else(|| {
                self.link.error(format!(
                    "{SKETCHES} {}: an unreadable sketch",
                    sketch_name(day, kind, *family)
                ))
            })?;
            found.push((*family, merged));
        }
        Ok(found)
    }

    pub async fn days(&self) -> Result<Vec<i64>, StoreError> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(self.keys.days).arg(0).arg(-1);
        self.one(cmd).await
    }

    pub async fn day(&self, day: i64) -> Result<Option<Counters>, StoreError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.keys.day(day));
        let values: HashMap<String, i64> = self.one(cmd).await?;
        Ok((!values.is_empty()).then(|| values.into_iter().collect()))
    }

    pub async fn range(&self, from: i64, to: i64) -> Result<Vec<(i64, Counters)>, StoreError> {
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(self.keys.days).arg(from).arg(to);
        let days: Vec<i64> = self.one(cmd).await?;
        if days.is_empty() {
            return Ok(Vec::new());
        }
        // One round trip for all the days.
        let commands = days
            .iter()
            .map(|day| {
                let mut cmd = redis::cmd("HGETALL");
                cmd.arg(self.keys.day(*day));
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

    /// The stored coverage of each of `days` that has any: one HMGET.
    pub async fn coverage(&self, days: &[i64]) -> Result<BTreeMap<i64, DayCoverage>, StoreError> {
        let mut out = BTreeMap::new();
        if days.is_empty() {
            return Ok(out);
        }
        let fields: Vec<String> = days.iter().map(i64::to_string).collect();
        for (i, value) in self.fields(COVERAGE, &fields).await? {
            let coverage = std::str::from_utf8(&value)
                .ok()
                .and_then(stored_coverage)
                .ok_or_else(|| {
                    self.link
                        .error(format!("{COVERAGE} {}: unreadable coverage", fields[i]))
                })?;
            if coverage != DayCoverage::default() {
                out.insert(days[i], coverage);
            }
        }
        Ok(out)
    }

    pub async fn all_time(&self) -> Result<Counters, StoreError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.keys.all_time);
        let values: HashMap<String, i64> = self.one(cmd).await?;
        Ok(values.into_iter().collect())
    }

    /// HMGET of `fields` of `key`, the values that are set, by field index.
    async fn fields(
        &self,
        key: &str,
        fields: &[String],
    ) -> Result<Vec<(usize, Vec<u8>)>, StoreError> {
        if fields.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key).arg(fields);
        let values: Vec<Option<Vec<u8>>> = self.one(cmd).await?;
        Ok(values
            .into_iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i, v)))
            .collect())
    }

    pub async fn hours(&self, day: i64) -> Result<Counters, StoreError> {
        let names: Vec<String> = (0..24)
            .flat_map(|hour| {
                crate::counters::hourly_counters()
                    .into_iter()
                    .map(move |counter| hour_counter(hour, &counter))
            })
            .collect();
        let fields: Vec<String> = names.iter().map(|n| format!("{day}:{n}")).collect();
        let mut hours = Counters::new();
        for (i, value) in self.fields(HOURS, &fields).await? {
            let value = String::from_utf8_lossy(&value);
            let value = value.parse::<i64>().map_err(|_| {
                self.link
                    .error(format!("{HOURS} {} is not an integer", fields[i]))
            })?;
            hours.insert(names[i].clone(), value);
        }
        Ok(hours)
    }
}

/// A sketch's base, its deltas, and where its deltas begin and end.
struct StoredSketch {
    done: i64,
    next: i64,
    base: Vec<u8>,
    deltas: Vec<Vec<u8>>,
}

/// A day's coverage as the apply script joins it: `;`-separated entries,
/// `<partition>|<topic>,<first>,<last>,<first_ms>,<last_ms>` for a span and `u,<n>` for the
/// events without a position. Offsets are below 2^53, where Lua's numbers are exact.
fn coverage_text(coverage: &DayCoverage) -> String {
    let mut coverage = coverage.clone();
    coverage.coalesce();
    let mut entries: Vec<String> = Vec::new();
    for (tp, spans) in &coverage.spans {
        let tp = tp.key();
        for span in spans {
            entries.push(format!(
                "{tp},{},{},{},{}",
                span.first, span.last, span.first_ms, span.last_ms
            ));
        }
    }
    if coverage.unpositioned > 0 {
        entries.push(format!("u,{}", coverage.unpositioned));
    }
    entries.join(";")
}

/// Reads what [`coverage_text`] wrote (and the script joined); `None` when it is unreadable.
fn stored_coverage(text: &str) -> Option<DayCoverage> {
    let mut coverage = DayCoverage::default();
    for entry in text.split(';').filter(|e| !e.is_empty()) {
        let parts: Vec<&str> = entry.split(',').collect();
        match parts.as_slice() {
            ["u", n] => {
                coverage.unpositioned = coverage.unpositioned.saturating_add(n.parse().ok()?)
            }
            [tp, first, last, first_ms, last_ms] => {
                let span = Span {
                    first: first.parse().ok()?,
                    last: last.parse().ok()?,
                    first_ms: first_ms.parse().ok()?,
                    last_ms: last_ms.parse().ok()?,
                };
                coverage
                    .spans
                    .entry(TopicPartition::parse(tp)?)
                    .or_default()
                    .push(span);
            }
            _ => return None,
        }
    }
    coverage.coalesce();
    Some(coverage)
}

/// A sketch's name in `{pleiades}:sketches`: `<day>:<kind>:<family>`.
fn sketch_name(day: i64, kind: SketchKind, family: Family) -> String {
    format!("{day}:{}:{}", kind.as_str(), family.as_str())
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
