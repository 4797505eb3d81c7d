//! Counter spaces: a rebuild counts into a fresh space beside the live one, and the space takes
//! the live one's place in one atomic step of the store (one redb write transaction, one Redis
//! script), only when its positions equal the live ones.
//!
//! Readers and the daemon's aggregators only ever name the live space, so a switch changes
//! nothing they do: a reader sees the whole old space or the whole new one, and an aggregator
//! goes on from positions that the switch left exactly where they were.

use super::embedded::{EmbeddedStore, LIVE as LIVE_TABLES, REBUILD as REBUILD_TABLES};
use super::redis::{decimal_lua, RedisStore, LIVE as LIVE_KEYS, REBUILD as REBUILD_KEYS};
use super::StoreError;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How long a rebuild's lease lasts without being renewed. While it lasts, no other rebuild
/// starts and retention keeps the event segments the rebuild has not read yet; a rebuild that
/// died stops holding either once it runs out.
pub const LEASE: Duration = Duration::from_secs(60);

/// Positions by source.
pub type Positions = BTreeMap<String, u64>;

/// The days a switch takes from the live space instead of from the rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    /// Days before this one keep their live counters (`--from`).
    pub from: i64,
    /// Days after this one keep their live counters (`--to`).
    pub to: i64,
    /// Days up to this one keep their live counters: the bus no longer holds all their events.
    pub lost_through: Option<i64>,
}

impl Kept {
    /// True when `day` keeps its live counters.
    pub fn keeps(&self, day: i64) -> bool {
        day < self.from || day > self.to || self.lost_through.is_some_and(|last| day <= last)
    }
}

/// Whether a rebuild may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// This rebuild holds the lease; the rebuild space is empty.
    Taken,
    /// Another rebuild holds it for this many more milliseconds.
    HeldElsewhere { remaining_ms: u64 },
}

/// A source whose rebuilt position differs from the live one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lag {
    pub source: String,
    pub live: u64,
    pub rebuilt: u64,
}

/// The outcome of a switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Switch {
    /// The rebuilt space is now the live one.
    Switched,
    /// Nothing changed: these sources' positions differ (the live aggregators moved on).
    Behind(Vec<Lag>),
}

const LEASE_TABLE: TableDefinition<&str, i64> = TableDefinition::new("rebuild_lease");
const LEASE_UNTIL: &str = "until";

impl EmbeddedStore {
    /// A handle on the rebuild space of the same database.
    pub(super) fn rebuild_space(&self) -> EmbeddedStore {
        let mut space = self.clone();
        space.tables = REBUILD_TABLES;
        space
    }

    pub(super) async fn positions(&self) -> Result<Positions, StoreError> {
        let tables = self.tables;
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = match txn.open_table(tables.positions) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Positions::new()),
                Err(e) => return Err(e.into()),
            };
            let mut positions = Positions::new();
            for entry in table.iter()? {
                let (key, value) = entry?;
                positions.insert(key.value().to_owned(), value.value());
            }
            Ok(positions)
        })
        .await
    }

    pub(super) async fn begin_rebuild(&self, now_ms: i64) -> Result<Lease, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            {
                let mut lease = txn.open_table(LEASE_TABLE)?;
                let until = lease.get(LEASE_UNTIL)?.map_or(i64::MIN, |v| v.value());
                if until > now_ms {
                    drop(lease);
                    txn.abort()?;
                    return Ok(Lease::HeldElsewhere {
                        remaining_ms: until.abs_diff(now_ms),
                    });
                }
                lease.insert(LEASE_UNTIL, now_ms.saturating_add(LEASE.as_millis() as i64))?;
            }
            txn.delete_table(REBUILD_TABLES.counters)?;
            txn.delete_table(REBUILD_TABLES.all_time)?;
            txn.delete_table(REBUILD_TABLES.days)?;
            txn.delete_table(REBUILD_TABLES.positions)?;
            txn.open_table(REBUILD_TABLES.counters)?;
            txn.open_table(REBUILD_TABLES.all_time)?;
            txn.open_table(REBUILD_TABLES.days)?;
            txn.open_table(REBUILD_TABLES.positions)?;
            txn.commit()?;
            Ok(Lease::Taken)
        })
        .await
    }

    pub(super) async fn renew_lease(&self, now_ms: i64) -> Result<(), StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            txn.open_table(LEASE_TABLE)?
                .insert(LEASE_UNTIL, now_ms.saturating_add(LEASE.as_millis() as i64))?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn end_rebuild(&self) -> Result<(), StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            txn.delete_table(LEASE_TABLE)?;
            txn.delete_table(REBUILD_TABLES.counters)?;
            txn.delete_table(REBUILD_TABLES.all_time)?;
            txn.delete_table(REBUILD_TABLES.days)?;
            txn.delete_table(REBUILD_TABLES.positions)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn rebuild_hold(&self, now_ms: i64) -> Result<Option<Positions>, StoreError> {
        let held = self
            .blocking(move |db| {
                let txn = db.begin_read()?;
                let lease = match txn.open_table(LEASE_TABLE) {
                    Ok(table) => table,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
                    Err(e) => return Err(e.into()),
                };
                Ok(lease
                    .get(LEASE_UNTIL)?
                    .is_some_and(|until| until.value() > now_ms))
            })
            .await?;
        if !held {
            return Ok(None);
        }
        self.rebuild_space().positions().await.map(Some)
    }

    pub(super) async fn switch(&self, kept: Kept, lost: &[String]) -> Result<Switch, StoreError> {
        let lost: BTreeSet<String> = lost.iter().cloned().collect();
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            {
                let live_positions = txn.open_table(LIVE_TABLES.positions)?;
                let mut positions = txn.open_table(REBUILD_TABLES.positions)?;
                let mut lags = Vec::new();
                let mut copied = Vec::new();
                for entry in live_positions.iter()? {
                    let (source, live) = entry?;
                    let (source, live) = (source.value().to_owned(), live.value());
                    if lost.contains(&source) {
                        copied.push((source, live));
                        continue;
                    }
                    let rebuilt = positions.get(source.as_str())?.map_or(0, |v| v.value());
                    if rebuilt != live {
                        lags.push(Lag {
                            source,
                            live,
                            rebuilt,
                        });
                    }
                }
                if !lags.is_empty() {
                    drop((live_positions, positions));
                    txn.abort()?;
                    return Ok(Switch::Behind(lags));
                }
                for (source, live) in copied {
                    positions.insert(source.as_str(), live)?;
                }
                let mut counters = txn.open_table(REBUILD_TABLES.counters)?;
                let mut all_time = txn.open_table(REBUILD_TABLES.all_time)?;
                let mut days = txn.open_table(REBUILD_TABLES.days)?;
                // A kept day's rebuilt counters give way to its live ones, in the day and in
                // the all-time sums.
                let rebuilt_days: Vec<i64> = days
                    .iter()?
                    .map(|entry| entry.map(|(day, _)| day.value()))
                    .collect::<Result<_, _>>()?;
                for day in rebuilt_days.into_iter().filter(|d| kept.keeps(*d)) {
                    let values = day_counters(&counters, day)?;
                    for (name, value) in &values {
                        add(&mut all_time, name, value.saturating_neg())?;
                        counters.remove((day, name.as_str()))?;
                    }
                    days.remove(day)?;
                }
                let live_counters = txn.open_table(LIVE_TABLES.counters)?;
                let live_days = txn.open_table(LIVE_TABLES.days)?;
                for entry in live_days.iter()? {
                    let (day, seen) = entry?;
                    let (day, seen) = (day.value(), seen.value());
                    if !kept.keeps(day) {
                        continue;
                    }
                    for (name, value) in day_counters(&live_counters, day)? {
                        add(&mut all_time, &name, value)?;
                        counters.insert((day, name.as_str()), value)?;
                    }
                    days.insert(day, seen)?;
                }
            }
            txn.delete_table(LIVE_TABLES.counters)?;
            txn.rename_table(REBUILD_TABLES.counters, LIVE_TABLES.counters)?;
            txn.delete_table(LIVE_TABLES.all_time)?;
            txn.rename_table(REBUILD_TABLES.all_time, LIVE_TABLES.all_time)?;
            txn.delete_table(LIVE_TABLES.days)?;
            txn.rename_table(REBUILD_TABLES.days, LIVE_TABLES.days)?;
            txn.delete_table(LIVE_TABLES.positions)?;
            txn.rename_table(REBUILD_TABLES.positions, LIVE_TABLES.positions)?;
            txn.delete_table(LEASE_TABLE)?;
            txn.commit()?;
            Ok(Switch::Switched)
        })
        .await
    }
}

/// Adds `delta` to the all-time counter `name`, saturating.
fn add(all_time: &mut redb::Table<&str, i64>, name: &str, delta: i64) -> Result<(), redb::Error> {
    let current = all_time.get(name)?.map_or(0, |v| v.value());
    all_time.insert(name, current.saturating_add(delta))?;
    Ok(())
}

/// The counters of one day of a counters table.
fn day_counters(
    table: &impl ReadableTable<(i64, &'static str), i64>,
    day: i64,
) -> Result<Vec<(String, i64)>, redb::Error> {
    let mut values = Vec::new();
    for entry in table.range((day, "")..(day.saturating_add(1), ""))? {
        let (key, value) = entry?;
        values.push((key.value().1.to_owned(), value.value()));
    }
    Ok(values)
}

/// The lease key of a rebuild on Redis; it expires by itself.
const REDIS_LEASE: &str = "{pleiades}:rebuild:lease";

/// Takes the lease and empties the rebuild space. KEYS: lease, rebuild positions, days, all.
/// ARGV: the rebuild's day prefix, the lease in ms. Returns -1 when taken, else the lease's
/// remaining milliseconds.
const BEGIN: &str = r"
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then return ttl end
for _, day in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  redis.call('UNLINK', ARGV[1] .. day)
end
redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[4])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
return -1
";

/// The switch. KEYS: live positions, days, all; rebuild positions, days, all; the lease.
/// ARGV: live day prefix, rebuild day prefix, from, to, lost-through ('' for none), the number
/// of lost sources, then those sources. Returns an empty list when switched, else
/// `source, live, rebuilt` triples of the positions that differ (and nothing is changed).
const SWITCH: &str = concat!(
    decimal_lua!(),
    r"
local lp, ld, la, rp, rd, ra = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local lprefix, rprefix = ARGV[1], ARGV[2]
local from, to = tonumber(ARGV[3]), tonumber(ARGV[4])
local lost_through = nil
if ARGV[5] ~= '' then lost_through = tonumber(ARGV[5]) end
local lost = {}
for k = 7, 6 + tonumber(ARGV[6]) do lost[ARGV[k]] = true end
local function kept(day)
  local d = tonumber(day)
  return d < from or d > to or (lost_through ~= nil and d <= lost_through)
end
local live = redis.call('HGETALL', lp)
local lags = {}
for k = 1, #live, 2 do
  if not lost[live[k]] then
    local rebuilt = redis.call('HGET', rp, live[k]) or '0'
    if rebuilt ~= live[k + 1] then
      lags[#lags + 1] = live[k]; lags[#lags + 1] = live[k + 1]; lags[#lags + 1] = rebuilt
    end
  end
end
if #lags > 0 then return lags end
for k = 1, #live, 2 do
  if lost[live[k]] then redis.call('HSET', rp, live[k], live[k + 1]) end
end
local function merge_all(values, negate)
  for k = 1, #values, 2 do
    local delta = values[k + 1]
    if negate then
      if delta:sub(1, 1) == '-' then delta = delta:sub(2) elseif delta ~= '0' then delta = '-' .. delta end
    end
    redis.call('HSET', ra, values[k], add(redis.call('HGET', ra, values[k]) or '0', delta))
  end
end
for _, day in ipairs(redis.call('ZRANGE', rd, 0, -1)) do
  if kept(day) then
    merge_all(redis.call('HGETALL', rprefix .. day), true)
    redis.call('UNLINK', rprefix .. day)
    redis.call('ZREM', rd, day)
  end
end
local live_days = redis.call('ZRANGE', ld, 0, -1)
for _, day in ipairs(live_days) do
  if kept(day) and redis.call('EXISTS', lprefix .. day) == 1 then
    merge_all(redis.call('HGETALL', lprefix .. day), false)
    redis.call('COPY', lprefix .. day, rprefix .. day, 'REPLACE')
    redis.call('ZADD', rd, day, day)
  end
end
for _, day in ipairs(live_days) do redis.call('UNLINK', lprefix .. day) end
for _, day in ipairs(redis.call('ZRANGE', rd, 0, -1)) do
  if redis.call('EXISTS', rprefix .. day) == 1 then redis.call('RENAME', rprefix .. day, lprefix .. day) end
end
redis.call('UNLINK', lp, ld, la)
for _, pair in ipairs({{rp, lp}, {rd, ld}, {ra, la}}) do
  if redis.call('EXISTS', pair[1]) == 1 then redis.call('RENAME', pair[1], pair[2]) end
end
redis.call('UNLINK', KEYS[7])
return {}
",
);

impl RedisStore {
    /// A handle on the rebuild space of the same Redis.
    pub(super) fn rebuild_space(&self) -> RedisStore {
        let mut space = self.clone();
        space.keys = REBUILD_KEYS;
        space
    }

    pub(super) async fn positions(&self) -> Result<Positions, StoreError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.keys.positions);
        let values: std::collections::HashMap<String, u64> = self.one(cmd).await?;
        Ok(values.into_iter().collect())
    }

    pub(super) async fn begin_rebuild(&self) -> Result<Lease, StoreError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(BEGIN)
            .arg(4)
            .arg(REDIS_LEASE)
            .arg(REBUILD_KEYS.positions)
            .arg(REBUILD_KEYS.days)
            .arg(REBUILD_KEYS.all_time)
            .arg(REBUILD_KEYS.day_prefix)
            .arg(LEASE.as_millis() as u64);
        let remaining: i64 = self.one(cmd).await?;
        Ok(if remaining < 0 {
            Lease::Taken
        } else {
            Lease::HeldElsewhere {
                remaining_ms: remaining as u64,
            }
        })
    }

    pub(super) async fn renew_lease(&self) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(REDIS_LEASE)
            .arg("1")
            .arg("PX")
            .arg(LEASE.as_millis() as u64);
        self.one::<String>(cmd).await.map(|_| ())
    }

    pub(super) async fn end_rebuild(&self) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(REDIS_LEASE);
        self.one::<i64>(cmd).await.map(|_| ())
    }

    pub(super) async fn rebuild_hold(&self) -> Result<Option<Positions>, StoreError> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(REDIS_LEASE);
        let held: i64 = self.one(cmd).await?;
        if held == 0 {
            return Ok(None);
        }
        self.rebuild_space().positions().await.map(Some)
    }

    pub(super) async fn switch(&self, kept: Kept, lost: &[String]) -> Result<Switch, StoreError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SWITCH)
            .arg(7)
            .arg(LIVE_KEYS.positions)
            .arg(LIVE_KEYS.days)
            .arg(LIVE_KEYS.all_time)
            .arg(REBUILD_KEYS.positions)
            .arg(REBUILD_KEYS.days)
            .arg(REBUILD_KEYS.all_time)
            .arg(REDIS_LEASE)
            .arg(LIVE_KEYS.day_prefix)
            .arg(REBUILD_KEYS.day_prefix)
            .arg(kept.from)
            .arg(kept.to)
            .arg(kept.lost_through.map_or(String::new(), |d| d.to_string()))
            .arg(lost.len())
            .arg(lost);
        let lags: Vec<String> = self.one(cmd).await?;
        if lags.is_empty() {
            return Ok(Switch::Switched);
        }
        let number = |text: &str| text.parse::<u64>().unwrap_or(0);
        Ok(Switch::Behind(
            lags.chunks(3)
                .filter_map(|lag| match lag {
                    [source, live, rebuilt] => Some(Lag {
                        source: source.clone(),
                        live: number(live),
                        rebuilt: number(rebuilt),
                    }),
                    _ => None,
                })
                .collect(),
        ))
    }
}
