//! The fleet's Redis client (tokio): atomic writes through Redis Functions, a stream follower that keeps the
//! fleet's view, full snapshots, a bounded outbox while Redis is unreachable, and epochs that reveal a Redis
//! restarted empty.
//!
//! - [`Engine`] publishes (`FCALL aqd_put` / `aqd_del` on a [`ConnectionManager`]); a record that cannot be sent
//!   goes to the [`Outbox`] (deduplicated by key and slot, bounded, overflow counted) and is flushed on reconnect.
//! - [`Follower`] reads `dec:log` with `XREAD BLOCK` on its own connection (a blocking read must not share the
//!   writer's response timeout), applies records to its [`KeyState`]s, and resynchronises by snapshot when its
//!   position was trimmed away or the epoch changed; on an epoch change the engine also re-publishes this host's
//!   own records. It reconnects with full-jitter exponential backoff.
//! - The functions re-check the merge rule server-side: a put not newer than the key's unblock (or than its own
//!   slot) is rejected atomically, so a stale outbox replay cannot undo an unblock even between hosts.

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use redis::{
    AsyncConnectionConfig, Client, RedisError, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
};
use thiserror::Error;

use super::{
    clock::{self, Skew},
    merge::{KeyState, Outcome},
    wire::{FleetKey, HostName, Op, Record, WireError},
};

/// Every Redis name the fleet uses.
pub mod keys {
    use super::FleetKey;

    /// Prefix of the per-key decision hashes: `dec:<scope>:<key>`.
    pub const DECISION_PREFIX: &str = "dec:";
    /// ZSET of decision keys by the latest time each matters (snapshot scan, sweep).
    pub const EXPIRY_INDEX: &str = "dec:exp";
    /// The decision log (stream).
    pub const LOG: &str = "dec:log";
    /// Random value set (NX) by the first host to reach a Redis that started empty.
    pub const EPOCH: &str = "fleet:epoch";
    /// The Redis Function library.
    pub const LIBRARY: &str = "aqd";
    pub const FN_PUT: &str = "aqd_put";
    pub const FN_DEL: &str = "aqd_del";

    /// The hash of one key.
    pub fn decision(key: &FleetKey) -> String {
        format!("{DECISION_PREFIX}{}", key.member())
    }
}

/// The function library: the merge's accept/reject rule, the key's expiry, the index and the log, atomically.
/// Hash values are those of [`Record::to_hash_value`]. Numbers are formatted with `%.0f` (Lua 5.1 would print
/// large integers in exponent form).
pub const LIBRARY_SOURCE: &str = r#"#!lua name=aqd
local function split(s)
  local t = {}
  for p in string.gmatch(s .. '|', '([^|]*)|') do t[#t + 1] = p end
  return t
end
local function stamp(v)
  local t = split(v)
  if t[1] == 'p' then return tonumber(t[6]), t[7] end
  if t[1] == 'd' then return tonumber(t[2]), t[3] end
  return tonumber(t[2]), t[4]
end
local function newer(ts1, h1, ts2, h2)
  if ts1 ~= ts2 then return ts1 > ts2 end
  return h1 > h2
end
local function relevant_until(v, retain)
  local t = split(v)
  if t[1] == 'p' then
    if t[5] == '-' then return nil end
    return tonumber(t[5])
  end
  if t[1] == 'd' then return tonumber(t[2]) + retain end
  local u = tonumber(t[2]) + retain
  if t[3] ~= '-' and tonumber(t[3]) > u then u = tonumber(t[3]) end
  return u
end
local function write(keys, args, unblock)
  local key, zkey, log = keys[1], keys[2], keys[3]
  local member, field, value = args[1], args[2], args[3]
  local ts, host, maxlen, retain = tonumber(args[4]), args[5], args[6], tonumber(args[7])
  local tomb = redis.call('HGET', key, 'unblock')
  if tomb then
    local tts, th = stamp(tomb)
    if not newer(ts, host, tts, th) then return {0, 'not newer than the unblock'} end
  end
  if unblock then
    local all = redis.call('HGETALL', key)
    for i = 1, #all, 2 do
      if all[i] ~= 'unblock' then
        local s, h = stamp(all[i + 1])
        if not newer(s, h, ts, host) then redis.call('HDEL', key, all[i]) end
      end
    end
  else
    local cur = redis.call('HGET', key, field)
    if cur then
      local s, h = stamp(cur)
      if not newer(ts, host, s, h) then return {0, 'superseded'} end
    end
  end
  redis.call('HSET', key, field, value)
  local all = redis.call('HGETALL', key)
  local permanent, last = false, 0
  for i = 2, #all, 2 do
    local u = relevant_until(all[i], retain)
    if u == nil then permanent = true elseif u > last then last = u end
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if permanent then
    redis.call('PERSIST', key)
    redis.call('ZADD', zkey, '+inf', member)
  elseif last <= now then
    redis.call('DEL', key)
    redis.call('ZREM', zkey, member)
  else
    local s = string.format('%.0f', last)
    redis.call('PEXPIREAT', key, s)
    redis.call('ZADD', zkey, s, member)
  end
  redis.call('ZREMRANGEBYSCORE', zkey, '-inf', string.format('(%.0f', now))
  local x = {log, 'MAXLEN', '~', maxlen, '*'}
  for i = 8, #args do x[#x + 1] = args[i] end
  return {1, redis.call('XADD', unpack(x))}
end
redis.register_function('aqd_put', function(keys, args) return write(keys, args, false) end)
redis.register_function('aqd_del', function(keys, args) return write(keys, args, args[2] == 'unblock') end)
"#;

/// Errors of the fleet engine, naming the operation.
#[derive(Debug, Error)]
pub enum FleetError {
    #[error("invalid Redis URL {url:?}")]
    Url {
        url: String,
        #[source]
        source: RedisError,
    },
    #[error("redis {what} failed")]
    Redis {
        what: &'static str,
        #[source]
        source: RedisError,
    },
    #[error("malformed fleet record at {place}")]
    Wire {
        place: String,
        #[source]
        source: WireError,
    },
    #[error("unexpected reply to {what}: {reply}")]
    Reply { what: &'static str, reply: String },
    #[error("not connected to Redis")]
    Disconnected,
}

fn redis_err(what: &'static str) -> impl FnOnce(RedisError) -> FleetError {
    move |source| FleetError::Redis { what, source }
}

/// A connection problem (queue and retry) rather than an answer from the server.
fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.code().is_none()
}

fn is_function_missing(e: &RedisError) -> bool {
    e.to_string().contains("Function not found")
}

/// Settings of one engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// `redis://host:port` or `rediss://…` (TLS when the client is built with a TLS feature).
    pub url: String,
    /// This host's name in the fleet.
    pub host: HostName,
    /// Records kept for Redis while it is unreachable (distinct key/slot pairs).
    pub outbox_capacity: usize,
    /// Approximate `MAXLEN` of `dec:log`.
    pub stream_maxlen: u64,
    /// How long unblocks and withdraws are kept in Redis to reject stale replays.
    pub retain: Duration,
    /// Longest remaining TTL accepted from the fleet.
    pub max_ttl: Duration,
    /// `XREAD BLOCK` time; also the longest a follower waits before checking the epoch and its position.
    pub read_block: Duration,
    /// Entries per `XREAD`.
    pub read_count: usize,
    /// Keys per `ZSCAN` page of a snapshot.
    pub snapshot_page: usize,
    /// Reconnect backoff: full jitter between 0 and min(max, min × 2ⁿ).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Own records are re-published after an epoch change after a random delay up to this (no stampede).
    pub republish_jitter: Duration,
}

impl EngineConfig {
    pub fn new(url: &str, host: HostName) -> Self {
        Self {
            url: url.to_owned(),
            host,
            outbox_capacity: 100_000,
            stream_maxlen: 2_000_000,
            retain: Duration::from_secs(86_400),
            max_ttl: Duration::from_secs(7 * 86_400),
            read_block: Duration::from_millis(1_000),
            read_count: 1_000,
            snapshot_page: 1_000,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            republish_jitter: Duration::from_secs(5),
        }
    }
}

/// What happened to a published record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Published {
    /// Accepted; the stream entry's id.
    Applied { id: String },
    /// Refused by the merge rule on the server (e.g. older than the key's unblock).
    Rejected { reason: String },
    /// Redis is unreachable: kept in the outbox.
    Queued,
}

type SlotId = (FleetKey, &'static str);

/// Records waiting for Redis: one per key and slot (the newest), oldest dropped (and counted) when full.
#[derive(Debug)]
pub struct Outbox {
    capacity: usize,
    order: VecDeque<(SlotId, u64)>,
    items: HashMap<SlotId, (u64, Record)>,
    seq: u64,
    overflowed: u64,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            items: HashMap::new(),
            seq: 0,
            overflowed: 0,
        }
    }

    /// Queues `r`, replacing an older record of the same slot; a record older than the queued one is ignored.
    pub fn push(&mut self, r: Record) {
        let slot = (r.key, r.field());
        if let Some((_, old)) = self.items.get(&slot)
            && (old.ts_ms, &old.host) >= (r.ts_ms, &r.host)
        {
            return;
        }
        if !self.items.contains_key(&slot) && self.items.len() >= self.capacity {
            while let Some((s, seq)) = self.order.pop_front() {
                if self.items.get(&s).is_some_and(|(q, _)| *q == seq) {
                    self.items.remove(&s);
                    self.overflowed += 1;
                    break;
                }
            }
        }
        self.seq += 1;
        self.order.push_back((slot, self.seq));
        self.items.insert(slot, (self.seq, r));
    }

    /// Everything queued, oldest first.
    pub fn drain(&mut self) -> Vec<Record> {
        let mut out = Vec::with_capacity(self.items.len());
        for (slot, seq) in self.order.drain(..) {
            if self.items.get(&slot).is_some_and(|(q, _)| *q == seq)
                && let Some((_, r)) = self.items.remove(&slot)
            {
                out.push(r);
            }
        }
        self.items.clear();
        out
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Records dropped because the outbox was full.
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }
}

/// The engine's state as `aqd status` will show it.
#[derive(Clone, Debug)]
pub struct FleetStatus {
    pub connected: bool,
    pub disconnected_since: Option<SystemTime>,
    pub epoch: Option<String>,
    pub skew: Option<Skew>,
    pub outbox_len: usize,
    pub outbox_overflowed: u64,
    pub reconnects: u64,
    pub republished: u64,
}

struct Shared {
    outbox: Outbox,
    /// This host's newest record per key and slot (re-published after an epoch change).
    own: HashMap<SlotId, Record>,
    epoch: Option<String>,
    skew: Option<Skew>,
    connected: bool,
    disconnected_since: Option<SystemTime>,
    reconnects: u64,
    republished: u64,
    last_ts: u64,
}

struct Inner {
    cfg: EngineConfig,
    client: Client,
    writer: tokio::sync::Mutex<Option<ConnectionManager>>,
    shared: Mutex<Shared>,
}

/// The fleet engine of one host (cheap to clone).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// A stream position `ms-seq`.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (a, b) = id.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn random_u64() -> u64 {
    RandomState::new().hash_one(Instant::now())
}

fn jitter(max: Duration) -> Duration {
    let ms = max.as_millis() as u64;
    if ms == 0 {
        Duration::ZERO
    } else {
        Duration::from_millis(random_u64() % (ms + 1))
    }
}

impl Engine {
    /// Connects (loads the function library, sets or reads the epoch, measures skew). Fails when Redis cannot
    /// be reached now; use [`Engine::new_disconnected`] to start without it.
    pub async fn connect(cfg: EngineConfig) -> Result<Self, FleetError> {
        let e = Self::new_disconnected(cfg)?;
        e.ensure_writer().await?;
        Ok(e)
    }

    /// An engine that has not connected yet: publishes queue until a connection succeeds.
    pub fn new_disconnected(cfg: EngineConfig) -> Result<Self, FleetError> {
        let client = Client::open(cfg.url.as_str()).map_err(|source| FleetError::Url {
            url: cfg.url.clone(),
            source,
        })?;
        let shared = Shared {
            outbox: Outbox::new(cfg.outbox_capacity),
            own: HashMap::new(),
            epoch: None,
            skew: None,
            connected: false,
            disconnected_since: Some(SystemTime::now()),
            reconnects: 0,
            republished: 0,
            last_ts: 0,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                client,
                writer: tokio::sync::Mutex::new(None),
                shared: Mutex::new(shared),
            }),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.inner.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// "Now" on the fleet's clock (local wall clock + measured skew), Unix ms.
    pub fn fleet_now_ms(&self) -> u64 {
        let wall = clock::wall_now_ms();
        self.shared().skew.map_or(wall, |s| s.fleet_now_ms(wall))
    }

    /// A record made on this host now: its stamp is strictly after every earlier one of this host.
    pub fn record(&self, key: FleetKey, origin: super::wire::FleetOrigin, op: Op) -> Record {
        let now = self.fleet_now_ms();
        let mut s = self.shared();
        let ts_ms = now.max(s.last_ts + 1);
        s.last_ts = ts_ms;
        Record {
            key,
            origin,
            host: self.inner.cfg.host.clone(),
            ts_ms,
            op,
        }
    }

    pub fn status(&self) -> FleetStatus {
        let s = self.shared();
        FleetStatus {
            connected: s.connected,
            disconnected_since: s.disconnected_since,
            epoch: s.epoch.clone(),
            skew: s.skew,
            outbox_len: s.outbox.len(),
            outbox_overflowed: s.outbox.overflowed(),
            reconnects: s.reconnects,
            republished: s.republished,
        }
    }

    fn mark_disconnected(&self) {
        let mut s = self.shared();
        if s.connected {
            s.connected = false;
            s.disconnected_since = Some(SystemTime::now());
        }
    }

    /// Loads the library, sets the epoch if Redis has none, reads it, measures skew. Returns the epoch.
    async fn prepare(&self, con: &mut impl ConnectionLike) -> Result<String, FleetError> {
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(LIBRARY_SOURCE)
            .query_async::<String>(con)
            .await
            .map_err(redis_err("FUNCTION LOAD"))?;
        let fresh = format!("{:016x}", random_u64());
        let _: Option<String> = redis::cmd("SET")
            .arg(keys::EPOCH)
            .arg(&fresh)
            .arg("NX")
            .query_async(con)
            .await
            .map_err(redis_err("SET epoch NX"))?;
        let epoch: String = redis::cmd("GET")
            .arg(keys::EPOCH)
            .query_async(con)
            .await
            .map_err(redis_err("GET epoch"))?;
        let mut samples = Vec::new();
        for _ in 0..3 {
            let before = clock::wall_now_us();
            let (secs, micros): (u64, u64) = redis::cmd("TIME")
                .query_async(con)
                .await
                .map_err(redis_err("TIME"))?;
            samples.push(Skew::measure(
                before,
                Skew::server_us(secs, micros),
                clock::wall_now_us(),
            ));
        }
        let mut s = self.shared();
        s.skew = Skew::best(samples);
        s.epoch = Some(epoch.clone());
        Ok(epoch)
    }

    async fn ensure_writer(&self) -> Result<ConnectionManager, FleetError> {
        let mut w = self.inner.writer.lock().await;
        if let Some(c) = w.as_ref() {
            return Ok(c.clone());
        }
        let cfg = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let mut con = self
            .inner
            .client
            .get_connection_manager_with_config(cfg)
            .await
            .map_err(redis_err("connect"))?;
        self.prepare(&mut con).await?;
        {
            let mut s = self.shared();
            s.connected = true;
            s.disconnected_since = None;
        }
        *w = Some(con.clone());
        Ok(con)
    }

    fn fcall(&self, r: &Record) -> redis::Cmd {
        let cfg = &self.inner.cfg;
        let f = match r.op {
            Op::Put(_) => keys::FN_PUT,
            Op::Del { .. } => keys::FN_DEL,
        };
        let mut c = redis::cmd("FCALL");
        c.arg(f)
            .arg(3)
            .arg(keys::decision(&r.key))
            .arg(keys::EXPIRY_INDEX)
            .arg(keys::LOG)
            .arg(r.key.member())
            .arg(r.field())
            .arg(r.to_hash_value())
            .arg(r.ts_ms)
            .arg(r.host.as_str())
            .arg(cfg.stream_maxlen)
            .arg(cfg.retain.as_millis() as u64);
        for (k, v) in r.to_stream_fields() {
            c.arg(k).arg(v);
        }
        c
    }

    fn remember_own(&self, r: &Record) {
        if r.host != self.inner.cfg.host {
            return;
        }
        let mut s = self.shared();
        let slot = (r.key, r.field());
        let newer = s
            .own
            .get(&slot)
            .is_none_or(|o| (o.ts_ms, &o.host) < (r.ts_ms, &r.host));
        if newer {
            s.own.insert(slot, r.clone());
        }
    }

    /// Sends a batch in one pipeline; on a missing library (Redis restarted) reloads it and retries once.
    async fn send(&self, recs: &[Record]) -> Result<Vec<Published>, RedisError> {
        let mut con = match self.ensure_writer().await {
            Ok(c) => c,
            Err(FleetError::Redis { source, .. }) => return Err(source),
            Err(_) => return Err(RedisError::from(std::io::Error::other("fleet connect failed"))),
        };
        for attempt in 0..2 {
            let mut p = redis::pipe();
            for r in recs {
                p.add_command(self.fcall(r));
            }
            match p.query_async::<Vec<(i64, String)>>(&mut con).await {
                Ok(replies) => {
                    return Ok(replies
                        .into_iter()
                        .map(|(ok, s)| {
                            if ok == 1 {
                                Published::Applied { id: s }
                            } else {
                                Published::Rejected { reason: s }
                            }
                        })
                        .collect());
                }
                Err(e) if attempt == 0 && is_function_missing(&e) => {
                    if let Err(FleetError::Redis { source, .. }) = self.prepare(&mut con).await {
                        return Err(source);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Publishes one record (made by [`Engine::record`] or received for re-publication).
    pub async fn publish(&self, r: Record) -> Result<Published, FleetError> {
        Ok(self
            .publish_batch(vec![r])
            .await?
            .pop()
            .unwrap_or(Published::Queued))
    }

    /// Publishes records in one pipeline (queued outbox records go first). A connection failure queues them
    /// all and answers [`Published::Queued`] for each; a server error for the batch is returned.
    pub async fn publish_batch(&self, recs: Vec<Record>) -> Result<Vec<Published>, FleetError> {
        for r in &recs {
            self.remember_own(r);
        }
        let queued = {
            let mut s = self.shared();
            if s.outbox.is_empty() {
                Vec::new()
            } else {
                s.outbox.drain()
            }
        };
        let n_queued = queued.len();
        let mut all = queued;
        all.extend(recs);
        match self.send(&all).await {
            Ok(mut res) => {
                self.shared().connected = true;
                Ok(res.split_off(n_queued))
            }
            Err(e) if is_connection_error(&e) => {
                self.mark_disconnected();
                let n = all.len() - n_queued;
                let mut s = self.shared();
                for r in all {
                    s.outbox.push(r);
                }
                Ok(vec![Published::Queued; n])
            }
            Err(source) => {
                // The server answered with an error: nothing was half-sent, keep what was queued.
                let mut s = self.shared();
                for r in all.into_iter().take(n_queued) {
                    s.outbox.push(r);
                }
                Err(FleetError::Redis {
                    what: "FCALL aqd_put/aqd_del",
                    source,
                })
            }
        }
    }

    /// Sends what the outbox holds. Returns how many were sent (0 when empty or still disconnected).
    pub async fn flush_outbox(&self) -> Result<usize, FleetError> {
        let n = self.shared().outbox.len();
        if n == 0 {
            return Ok(0);
        }
        self.publish_batch(Vec::new()).await?;
        Ok(n - self.shared().outbox.len().min(n))
    }

    /// Re-publishes this host's own records that still matter (after Redis came back empty).
    pub async fn republish_own(&self) -> Result<usize, FleetError> {
        tokio::time::sleep(jitter(self.inner.cfg.republish_jitter)).await;
        let now = self.fleet_now_ms();
        let recs: Vec<Record> = self
            .shared()
            .own
            .values()
            .filter(|r| r.relevant_until_ms().is_none_or(|u| u > now))
            .cloned()
            .collect();
        let n = recs.len();
        for chunk in recs.chunks(1_000) {
            self.publish_batch(chunk.to_vec()).await?;
        }
        self.shared().republished += n as u64;
        Ok(n)
    }

    /// A full snapshot through the writer connection.
    pub async fn snapshot(&self) -> Result<Snapshot, FleetError> {
        let mut con = self.ensure_writer().await?;
        self.snapshot_with(&mut con).await
    }

    /// A full snapshot: the stream position first, then every key still relevant (`ZSCAN dec:exp`, which returns
    /// every member present for the whole scan; offset paging can skip keys whose score moves) with pipelined
    /// `HGETALL`s. Records written during the scan are also after the position, so reading on from it misses
    /// nothing (re-applying one is harmless).
    pub async fn snapshot_with(&self, con: &mut impl ConnectionLike) -> Result<Snapshot, FleetError> {
        let position = stream_info(con).await?;
        let now = self.fleet_now_ms();
        let mut states = HashMap::new();
        let mut malformed = 0usize;
        let mut cursor = 0u64;
        loop {
            let (next, items): (u64, Vec<String>) = redis::cmd("ZSCAN")
                .arg(keys::EXPIRY_INDEX)
                .arg(cursor)
                .arg("COUNT")
                .arg(self.inner.cfg.snapshot_page)
                .query_async(con)
                .await
                .map_err(redis_err("ZSCAN dec:exp"))?;
            let mut members = Vec::new();
            for pair in items.chunks(2) {
                let [member, score] = pair else { continue };
                let live = score == "inf" || score.parse::<f64>().is_ok_and(|s| s > now as f64);
                if !live {
                    continue;
                }
                match FleetKey::parse_member(member) {
                    Ok(k) => members.push(k),
                    Err(_) => malformed += 1,
                }
            }
            let mut p = redis::pipe();
            for k in &members {
                p.cmd("HGETALL").arg(keys::decision(k));
            }
            let hashes: Vec<HashMap<String, String>> = if members.is_empty() {
                Vec::new()
            } else {
                p.query_async(con).await.map_err(redis_err("HGETALL dec:*"))?
            };
            for (k, fields) in members.into_iter().zip(hashes) {
                let mut st = KeyState::default();
                for (f, v) in &fields {
                    match Record::from_hash_field(k, f, v) {
                        Ok(r) => {
                            st.apply(&r);
                        }
                        Err(_) => malformed += 1,
                    }
                }
                if !st.is_empty() {
                    states.insert(k, st);
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        Ok(Snapshot {
            position,
            states,
            malformed,
        })
    }
}

/// A full copy of the fleet's decisions and the stream position to read on from.
#[derive(Debug)]
pub struct Snapshot {
    pub position: StreamPosition,
    pub states: HashMap<FleetKey, KeyState>,
    /// Hash fields or members that did not decode (skipped).
    pub malformed: usize,
}

/// Where a reader is in `dec:log`, with the stream's `entries-added` counter at that point, so trimming past it
/// is detected exactly: entries trimmed = `entries-added − length` (entries are never XDEL'd).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamPosition {
    pub last_id: String,
    pub entries_added: u64,
    pub length: u64,
}

/// `XINFO STREAM dec:log` (a missing stream is position `0-0`).
async fn stream_info(con: &mut impl ConnectionLike) -> Result<StreamPosition, FleetError> {
    let reply: Result<Vec<Value>, _> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(keys::LOG)
        .query_async(con)
        .await;
    let items = match reply {
        Ok(v) => v,
        Err(e) if e.to_string().contains("no such key") => {
            return Ok(StreamPosition {
                last_id: "0-0".into(),
                entries_added: 0,
                length: 0,
            });
        }
        Err(e) => return Err(redis_err("XINFO STREAM")(e)),
    };
    let mut pos = StreamPosition {
        last_id: String::new(),
        entries_added: 0,
        length: 0,
    };
    for pair in items.chunks(2) {
        let [k, v] = pair else { continue };
        let k: String = redis::from_redis_value_ref(k).unwrap_or_default();
        match k.as_str() {
            "length" => pos.length = redis::from_redis_value_ref(v).unwrap_or(0),
            "entries-added" => pos.entries_added = redis::from_redis_value_ref(v).unwrap_or(0),
            "last-generated-id" => pos.last_id = redis::from_redis_value_ref(v).unwrap_or_default(),
            _ => {}
        }
    }
    if parse_id(&pos.last_id).is_none() {
        return Err(FleetError::Reply {
            what: "XINFO STREAM",
            reply: format!("{items:?}"),
        });
    }
    Ok(pos)
}

/// One record read from the stream and what it did to the view.
#[derive(Clone, Debug)]
pub struct Received {
    pub id: String,
    pub record: Record,
    pub outcome: Outcome,
}

/// Why a follower took a full snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    /// First connection (no position yet).
    Start,
    /// The stream was trimmed past this host's position.
    Trimmed,
    /// Redis was restarted empty or replaced (the epoch changed).
    EpochChanged,
}

/// What one [`Follower::next`] call observed.
#[derive(Debug)]
pub enum FleetEvent {
    Records(Vec<Received>),
    Resynced {
        reason: ResyncReason,
        keys: usize,
    },
    /// Lost or could not get the connection; the next call retries after a jittered backoff.
    Disconnected {
        error: String,
    },
    /// Nothing new within the block time.
    Idle,
}

/// Reads the decision log on its own connection and keeps the fleet's view.
pub struct Follower {
    engine: Engine,
    conn: Option<MultiplexedConnection>,
    position: Option<StreamPosition>,
    /// Entries read since the snapshot position: with its `entries_added`, what this follower has covered.
    consumed: u64,
    epoch: Option<String>,
    need: Option<ResyncReason>,
    view: HashMap<FleetKey, KeyState>,
    failures: u32,
    last_check: Instant,
    /// Full snapshots taken.
    pub snapshots: u64,
    /// Stream entries that did not decode (skipped, counted).
    pub malformed: u64,
}

impl Follower {
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            conn: None,
            position: None,
            consumed: 0,
            epoch: None,
            need: Some(ResyncReason::Start),
            view: HashMap::new(),
            failures: 0,
            last_check: Instant::now(),
            snapshots: 0,
            malformed: 0,
        }
    }

    /// The fleet's merged state of every known key.
    pub fn view(&self) -> &HashMap<FleetKey, KeyState> {
        &self.view
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn backoff(&self) -> Duration {
        if self.failures == 0 {
            return Duration::ZERO;
        }
        let cfg = self.engine.config();
        let cap = cfg
            .backoff_min
            .saturating_mul(1u32 << self.failures.min(16))
            .min(cfg.backoff_max);
        jitter(cap)
    }

    async fn connect(&mut self) -> Result<MultiplexedConnection, FleetError> {
        let cfg = self.engine.config();
        let ac = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(cfg.read_block + Duration::from_secs(2)));
        let mut con = self
            .engine
            .inner
            .client
            .get_multiplexed_async_connection_with_config(&ac)
            .await
            .map_err(redis_err("connect (follower)"))?;
        let epoch = self.engine.prepare(&mut con).await?;
        self.adopt_epoch(epoch).await;
        Ok(con)
    }

    async fn adopt_epoch(&mut self, epoch: String) {
        if self.epoch.as_ref().is_some_and(|e| *e != epoch) {
            self.need = Some(ResyncReason::EpochChanged);
            // Best effort: if Redis went away again, the records stay queued and are re-sent later.
            let _ = self.engine.republish_own().await;
        }
        self.epoch = Some(epoch);
    }

    /// Waits for the next change (at most about the block time) and applies it to the view.
    pub async fn next(&mut self) -> FleetEvent {
        match self.step().await {
            Ok(ev) => ev,
            Err(e) => {
                self.conn = None;
                self.failures = self.failures.saturating_add(1);
                self.engine.mark_disconnected();
                FleetEvent::Disconnected {
                    error: format!(
                        "{e}: {}",
                        std::error::Error::source(&e)
                            .map(|s| s.to_string())
                            .unwrap_or_default()
                    ),
                }
            }
        }
    }

    async fn step(&mut self) -> Result<FleetEvent, FleetError> {
        let mut con = match self.conn.take() {
            Some(c) => c,
            None => {
                tokio::time::sleep(self.backoff()).await;
                let c = self.connect().await?;
                if self.failures > 0 {
                    self.engine.shared().reconnects += 1;
                }
                self.failures = 0;
                let _ = self.engine.flush_outbox().await;
                c
            }
        };
        let ev = self.step_on(&mut con).await;
        if ev.is_ok() {
            self.conn = Some(con);
        }
        ev
    }

    async fn step_on(&mut self, con: &mut MultiplexedConnection) -> Result<FleetEvent, FleetError> {
        if self.need.is_none() && self.last_check.elapsed() >= self.engine.config().read_block {
            self.last_check = Instant::now();
            let epoch: Option<String> = redis::cmd("GET")
                .arg(keys::EPOCH)
                .query_async(con)
                .await
                .map_err(redis_err("GET epoch"))?;
            match epoch {
                // Emptied while connected (FLUSHALL, or a restart the connection survived): set a new epoch.
                None => {
                    let e = self.engine.prepare(con).await?;
                    self.adopt_epoch(e).await;
                }
                Some(e) => self.adopt_epoch(e).await,
            }
            if self.need.is_none()
                && let Some(pos) = &self.position
            {
                let now = stream_info(con).await?;
                let trimmed = now.entries_added.saturating_sub(now.length);
                if trimmed > pos.entries_added + self.consumed || now.entries_added < pos.entries_added {
                    self.need = Some(ResyncReason::Trimmed);
                }
            }
            if !self.engine.shared().outbox.is_empty() {
                let _ = self.engine.flush_outbox().await;
            }
        }
        if let Some(reason) = self.need {
            let snap = self.engine.snapshot_with(con).await?;
            self.snapshots += 1;
            self.malformed += snap.malformed as u64;
            let keys = snap.states.len();
            self.view = snap.states;
            self.position = Some(snap.position);
            self.consumed = 0;
            self.need = None;
            return Ok(FleetEvent::Resynced { reason, keys });
        }
        let pos = self.position.as_mut().expect("a snapshot sets the position");
        let cfg = self.engine.config();
        type Entries = Vec<(String, Vec<(String, HashMap<String, String>)>)>;
        let reply: Option<Entries> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(cfg.read_count)
            .arg("BLOCK")
            .arg(cfg.read_block.as_millis() as u64)
            .arg("STREAMS")
            .arg(keys::LOG)
            .arg(&pos.last_id)
            .query_async(con)
            .await
            .map_err(redis_err("XREAD dec:log"))?;
        let Some(streams) = reply else {
            return Ok(FleetEvent::Idle);
        };
        let mut out = Vec::new();
        for (_, entries) in streams {
            for (id, fields) in entries {
                pos.last_id.clone_from(&id);
                self.consumed += 1;
                match Record::from_stream_fields(&fields) {
                    Ok(record) => {
                        let outcome = self.view.entry(record.key).or_default().apply(&record);
                        out.push(Received { id, record, outcome });
                    }
                    Err(_) => self.malformed += 1,
                }
            }
        }
        Ok(FleetEvent::Records(out))
    }
}

#[cfg(test)]
mod tests {
    use detector_common::Action;

    use super::*;
    use crate::fleet::wire::{Entry, FleetOrigin};

    fn rec(ip: &str, ts: u64) -> Record {
        Record {
            key: FleetKey::addr(ip.parse().unwrap()),
            origin: FleetOrigin::Model,
            host: HostName::new("h1").unwrap(),
            ts_ms: ts,
            op: Op::Put(Entry::new(Action::Block, None, None).unwrap()),
        }
    }

    #[test]
    fn outbox_dedups_by_slot_and_counts_overflow() {
        let mut o = Outbox::new(2);
        o.push(rec("10.0.0.1", 1));
        o.push(rec("10.0.0.1", 3));
        o.push(rec("10.0.0.1", 2)); // older than the queued one: ignored
        assert_eq!(o.len(), 1);
        o.push(rec("10.0.0.2", 4));
        o.push(rec("10.0.0.3", 5)); // full: the oldest (10.0.0.1) goes
        assert_eq!(o.overflowed(), 1);
        let d = o.drain();
        assert_eq!(d.iter().map(|r| r.ts_ms).collect::<Vec<_>>(), vec![4, 5]);
        assert!(o.is_empty());
        // An unblock and a put of the same key are different slots.
        let mut o = Outbox::new(10);
        o.push(rec("10.0.0.1", 1));
        let mut u = rec("10.0.0.1", 2);
        u.origin = FleetOrigin::Operator;
        u.op = Op::Del { hold_until_ms: None };
        o.push(u);
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn stream_ids_parse() {
        assert_eq!(parse_id("1700000000000-3"), Some((1_700_000_000_000, 3)));
        assert_eq!(parse_id("0-0"), Some((0, 0)));
        assert_eq!(parse_id("x"), None);
    }

    #[test]
    fn decision_key_names() {
        let k = FleetKey::source("198.51.100.0/24".parse().unwrap()).unwrap();
        assert_eq!(keys::decision(&k), "dec:p24:198.51.100.0");
    }
}
