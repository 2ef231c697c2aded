//! Ageing of the kernel's connection tables (`FLOWS`, `HALF_OPEN`) and the flow-table figures of `aqd status`.
//!
//! Both are LRU maps: the kernel never deletes an idle entry, it only evicts the least recently used one when
//! a new entry needs room. Left alone, a table of idle and closed connections makes the kernel evict live
//! ones first. The daemon therefore deletes entries whose last packet is older than a timeout:
//! - a flow (`FLOWS`) idle longer than `[protection] flow_idle_timeout` (default 1 h: longer than the idle
//!   timeouts HTTP/1.1 keep-alive and HTTP/2 servers and clients use — minutes — and than TCP keep-alive
//!   probes of tuned servers; every client segment, a keep-alive probe or a bare ACK included, refreshes it);
//! - a closed flow (`FIN_SEEN`, kept so its verdict applies to the last segments) idle longer than
//!   `flow_fin_timeout` (default 60 s, as Linux's `tcp_fin_timeout`);
//! - a half-open entry (`HALF_OPEN`) older than `half_open_timeout` (default 30 s: a client gives up on a SYN
//!   after about 2 minutes of retransmissions, but a SYN-ACK retransmitted later re-creates the entry in
//!   `aqd_egress`, so nothing honest is lost).
//!
//! The kernel stamps `last_seen_ns` (flows) and `first_seen_ns` (half-open) with `bpf_ktime_get_coarse_ns`:
//! CLOCK_MONOTONIC at tick resolution, compared here with [`crate::clock::monotonic_ns`] (the coarse clock
//! lags by at most a tick, negligible against timeouts of seconds).
//!
//! The walk is incremental and needs no lock of the daemon: [`Ager::step`] reads a bounded number of entries
//! per call with `BPF_MAP_LOOKUP_BATCH` (its cursor is a hash bucket, so it survives entries evicted under it,
//! unlike `get_next_key`), and deletes an expired entry only after reading it again (a packet that arrived in
//! between refreshed it). The remaining race (a packet between that read and the delete) at worst makes a
//! connection idle for an hour untracked one packet early: it then counts as unverified.
//!
//! LRU evictions are not reported by the kernel; they are derived (see [`FlowFigures`]).

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Map, MapData},
};
use detector_common::{FlowState, FlowTuple, HalfOpen, capacity, flow::flow_flag, flow_counter, map_names};
use serde::Serialize;

use crate::{
    bpf_sys::{BPF_MAP_DELETE_ELEM, BPF_MAP_LOOKUP_BATCH, BPF_MAP_LOOKUP_ELEM, BatchAttr, ElemAttr, bpf},
    maps::CounterTotals,
};

/// Default `[protection] flow_idle_timeout`.
pub const DEFAULT_FLOW_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default `[protection] flow_fin_timeout`.
pub const DEFAULT_FLOW_FIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `[protection] half_open_timeout`.
pub const DEFAULT_HALF_OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Entries read per batch syscall.
const BATCH: usize = 4096;

/// When entries of the connection tables expire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AgingPolicy {
    pub flow_idle: Duration,
    pub fin_idle: Duration,
    pub half_open: Duration,
}

impl Default for AgingPolicy {
    fn default() -> Self {
        Self {
            flow_idle: DEFAULT_FLOW_IDLE_TIMEOUT,
            fin_idle: DEFAULT_FLOW_FIN_TIMEOUT,
            half_open: DEFAULT_HALF_OPEN_TIMEOUT,
        }
    }
}

/// Why a flow expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// Idle longer than `flow_idle_timeout`.
    Idle,
    /// Closed (in-sequence FIN seen) and idle longer than `flow_fin_timeout`.
    Closed,
}

fn older_than(stamp_ns: u64, now_ns: u64, timeout: Duration) -> bool {
    now_ns.saturating_sub(stamp_ns) > timeout.as_nanos().min(u64::MAX as u128) as u64
}

impl AgingPolicy {
    /// Whether a flow has expired at `now_ns` (CLOCK_MONOTONIC).
    pub fn flow_expired(&self, flow: &FlowState, now_ns: u64) -> Option<Expired> {
        let last = flow.last_seen_ns.max(flow.first_seen_ns);
        if flow.flags & flow_flag::FIN_SEEN != 0 {
            // A FIN flow ages out after the shorter of the two (a FIN timeout set longer never keeps it longer).
            let timeout = self.fin_idle.min(self.flow_idle);
            return older_than(last, now_ns, timeout).then_some(Expired::Closed);
        }
        older_than(last, now_ns, self.flow_idle).then_some(Expired::Idle)
    }

    /// Whether a half-open entry has expired at `now_ns`.
    pub fn half_open_expired(&self, entry: &HalfOpen, now_ns: u64) -> bool {
        older_than(entry.first_seen_ns, now_ns, self.half_open)
    }
}

/// What the ager removed since the daemon started, and the policy in force (shared with `aqd status`).
#[derive(Debug, Default)]
pub struct AgingStats {
    pub flows_idle: AtomicU64,
    pub flows_closed: AtomicU64,
    pub half_open: AtomicU64,
    /// Completed walks over `FLOWS`.
    pub passes: AtomicU64,
    /// Entries read.
    pub scanned: AtomicU64,
    /// Failed steps (logged).
    pub errors: AtomicU64,
    pub policy: Mutex<AgingPolicy>,
}

impl AgingStats {
    pub fn new(policy: AgingPolicy) -> Self {
        Self {
            policy: Mutex::new(policy),
            ..Self::default()
        }
    }

    pub fn policy(&self) -> AgingPolicy {
        *self.policy.lock().expect("aging policy lock")
    }

    pub fn set_policy(&self, policy: AgingPolicy) {
        *self.policy.lock().expect("aging policy lock") = policy;
    }
}

/// Handles on `FLOWS` and `HALF_OPEN`, apart from [`crate::maps::KernelMaps`] so the ager needs no daemon lock.
pub struct FlowTables {
    flows: MapData,
    half_open: MapData,
}

/// A second handle on a loaded map, by its kernel id.
fn reopen(ebpf: &Ebpf, name: &'static str) -> anyhow::Result<MapData> {
    use anyhow::Context as _;
    let map = ebpf.map(name).with_context(|| format!("map {name} missing"))?;
    let data = match map {
        Map::HashMap(d) | Map::LruHashMap(d) => d,
        _ => anyhow::bail!("map {name} has an unexpected type"),
    };
    let id = data.info()?.id();
    Ok(MapData::from_id(id)?)
}

impl FlowTables {
    /// Opens both tables of a loaded program (before `KernelMaps::from_ebpf` takes them out).
    pub fn from_ebpf(ebpf: &Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            flows: reopen(ebpf, map_names::FLOWS)?,
            half_open: reopen(ebpf, map_names::HALF_OPEN)?,
        })
    }

    /// A second, independent handle on the same tables.
    pub fn try_clone(&self) -> anyhow::Result<Self> {
        Ok(Self {
            flows: MapData::from_id(self.flows.info()?.id())?,
            half_open: MapData::from_id(self.half_open.info()?.id())?,
        })
    }

    /// Entries in `FLOWS` and in `HALF_OPEN` (a walk in batches: some ms for a full table).
    pub fn entries(&self) -> std::io::Result<(u64, u64)> {
        Ok((
            count::<FlowTuple, FlowState>(&self.flows)?,
            count::<FlowTuple, HalfOpen>(&self.half_open)?,
        ))
    }

    /// One flow's state.
    pub fn flow(&self, key: &FlowTuple) -> Option<FlowState> {
        lookup(&self.flows, key)
    }

    /// One half-open entry.
    pub fn half_open(&self, key: &FlowTuple) -> Option<HalfOpen> {
        lookup(&self.half_open, key)
    }
}

// ---- raw map syscalls (aya 0.14 has no batch operations): `crate::bpf_sys` ----

fn lookup<K: aya::Pod, V: aya::Pod>(map: &MapData, key: &K) -> Option<V> {
    // SAFETY: Pod values are plain bytes; all-zero is a valid value.
    let mut value: V = unsafe { std::mem::zeroed() };
    let mut attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        flags: 0,
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).ok().map(|()| value)
}

/// Deletes `key`; `Ok(false)` when it was not there (evicted or removed meanwhile).
fn delete<K: aya::Pod>(map: &MapData, key: &K) -> std::io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: 0,
        flags: 0,
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A position in a batch walk: `None` before the first batch.
#[derive(Clone, Copy, Debug, Default)]
struct Cursor {
    token: Option<u32>,
}

/// Reads the next batch (≤ `keys.len()` entries) of a hash map into `keys`/`values`; returns how many were read
/// and whether the walk reached the end (the cursor is then reset).
fn lookup_batch<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    cursor: &mut Cursor,
    keys: &mut [K],
    values: &mut [V],
) -> std::io::Result<(usize, bool)> {
    let mut in_token = cursor.token.unwrap_or(0);
    let mut out_token = 0u32;
    let mut attr = BatchAttr {
        in_batch: if cursor.token.is_some() {
            &mut in_token as *mut u32 as u64
        } else {
            0
        },
        out_batch: &mut out_token as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: keys.len().min(values.len()) as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(()) => {
            cursor.token = Some(out_token);
            Ok((attr.count as usize, false))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            cursor.token = None;
            Ok((attr.count as usize, true))
        }
        Err(e) => {
            cursor.token = None;
            Err(e)
        }
    }
}

fn count<K: aya::Pod, V: aya::Pod>(map: &MapData) -> std::io::Result<u64> {
    // SAFETY: Pod types: all-zero bytes are valid values.
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut cursor = Cursor::default();
    let mut total = 0;
    loop {
        let (n, done) = lookup_batch(map, &mut cursor, &mut keys, &mut values)?;
        total += n as u64;
        if done {
            return Ok(total);
        }
    }
}

/// The incremental ager: owns its own handles on the tables and a cursor in each.
pub struct Ager {
    tables: FlowTables,
    flows_cursor: Cursor,
    half_open_cursor: Cursor,
    flow_keys: Vec<FlowTuple>,
    flow_values: Vec<FlowState>,
    half_open_keys: Vec<FlowTuple>,
    half_open_values: Vec<HalfOpen>,
}

/// What one [`Ager::step`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepReport {
    pub scanned: u64,
    pub flows_idle: u64,
    pub flows_closed: u64,
    pub half_open: u64,
    /// The walk over `FLOWS` reached its end in this step.
    pub flows_pass_done: bool,
}

impl Ager {
    pub fn new(tables: FlowTables) -> Self {
        // SAFETY: Pod types: all-zero bytes are valid values.
        let zero = || unsafe { std::mem::zeroed() };
        Self {
            tables,
            flows_cursor: Cursor::default(),
            half_open_cursor: Cursor::default(),
            flow_keys: vec![zero(); BATCH],
            flow_values: vec![FlowState::default(); BATCH],
            half_open_keys: vec![zero(); BATCH],
            half_open_values: vec![HalfOpen::default(); BATCH],
        }
    }

    /// Reads up to `budget` entries of each table (rounded up to whole batches), continuing where the previous
    /// step stopped, and deletes the expired ones. Counts into `stats`.
    pub fn step(
        &mut self,
        policy: &AgingPolicy,
        now_ns: u64,
        budget: usize,
        stats: &AgingStats,
    ) -> std::io::Result<StepReport> {
        let mut report = StepReport::default();
        let mut read = 0;
        while read < budget {
            let (n, done) = lookup_batch(
                &self.tables.flows,
                &mut self.flows_cursor,
                &mut self.flow_keys,
                &mut self.flow_values,
            )?;
            read += n.max(1);
            report.scanned += n as u64;
            for i in 0..n {
                if policy.flow_expired(&self.flow_values[i], now_ns).is_none() {
                    continue;
                }
                // Read again: a packet since the batch read refreshed it.
                let key = self.flow_keys[i];
                let Some(again) = lookup::<_, FlowState>(&self.tables.flows, &key) else {
                    continue;
                };
                let Some(why) = policy.flow_expired(&again, now_ns) else {
                    continue;
                };
                if delete(&self.tables.flows, &key)? {
                    match why {
                        Expired::Idle => report.flows_idle += 1,
                        Expired::Closed => report.flows_closed += 1,
                    }
                }
            }
            if done {
                report.flows_pass_done = true;
                break;
            }
        }
        let mut read = 0;
        while read < budget {
            let (n, done) = lookup_batch(
                &self.tables.half_open,
                &mut self.half_open_cursor,
                &mut self.half_open_keys,
                &mut self.half_open_values,
            )?;
            read += n.max(1);
            report.scanned += n as u64;
            for i in 0..n {
                if !policy.half_open_expired(&self.half_open_values[i], now_ns) {
                    continue;
                }
                let key = self.half_open_keys[i];
                let Some(again) = lookup::<_, HalfOpen>(&self.tables.half_open, &key) else {
                    continue;
                };
                if policy.half_open_expired(&again, now_ns) && delete(&self.tables.half_open, &key)? {
                    report.half_open += 1;
                }
            }
            if done {
                break;
            }
        }
        stats.flows_idle.fetch_add(report.flows_idle, Ordering::Relaxed);
        stats
            .flows_closed
            .fetch_add(report.flows_closed, Ordering::Relaxed);
        stats.half_open.fetch_add(report.half_open, Ordering::Relaxed);
        stats.scanned.fetch_add(report.scanned, Ordering::Relaxed);
        if report.flows_pass_done {
            stats.passes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(report)
    }

    /// Walks both tables to the end once (tests, and `aqd` commands that want a full pass now).
    pub fn full_pass(
        &mut self,
        policy: &AgingPolicy,
        now_ns: u64,
        stats: &AgingStats,
    ) -> std::io::Result<StepReport> {
        self.flows_cursor = Cursor::default();
        self.half_open_cursor = Cursor::default();
        self.step(policy, now_ns, usize::MAX, stats)
    }
}

/// The table contents and counters when the daemon started: evictions are derived from the changes since.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Baseline {
    pub flows: u64,
    pub half_open: u64,
    pub established: u64,
    pub reset: u64,
    pub half_open_created: u64,
}

impl Baseline {
    pub fn take(tables: &FlowTables, counters: &CounterTotals) -> std::io::Result<Self> {
        let (flows, half_open) = tables.entries()?;
        Ok(Self {
            flows,
            half_open,
            established: counters.flows[flow_counter::ESTABLISHED],
            reset: counters.flows[flow_counter::RESET],
            half_open_created: counters.flows[flow_counter::HALF_OPEN],
        })
    }
}

/// The flow-table figures of `aqd status` and the metrics.
///
/// Every entry that leaves `FLOWS` leaves it by an accepted RST (`flow_counter::RESET`), by ageing (counted
/// here) or by an LRU eviction (counted nowhere), so since the daemon started
/// `evicted = flows at start + established − reset − aged − flows now`. The counters and the walk are not one
/// atomic snapshot: connections opened during the walk can skew it by a few (it is clamped at 0). For
/// `HALF_OPEN` the same balance (created by SYNs, removed by a completed handshake, ageing or eviction) is a
/// lower bound: entries `aqd_egress` re-creates for a SYN-ACK whose entry was evicted are not counted as created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FlowFigures {
    pub flows_entries: u64,
    pub flows_capacity: u32,
    pub established: u64,
    pub reset: u64,
    pub fin: u64,
    pub aged_idle: u64,
    pub aged_closed: u64,
    pub evicted: u64,
    pub half_open_entries: u64,
    pub half_open_capacity: u32,
    pub half_open_created: u64,
    pub half_open_aged: u64,
    pub half_open_evicted: u64,
}

impl FlowFigures {
    pub fn derive(
        baseline: &Baseline,
        counters: &CounterTotals,
        stats: &AgingStats,
        (flows_entries, half_open_entries): (u64, u64),
    ) -> Self {
        let c = &counters.flows;
        let aged_idle = stats.flows_idle.load(Ordering::Relaxed);
        let aged_closed = stats.flows_closed.load(Ordering::Relaxed);
        let half_open_aged = stats.half_open.load(Ordering::Relaxed);
        let established = c[flow_counter::ESTABLISHED];
        let reset = c[flow_counter::RESET];
        let created = c[flow_counter::HALF_OPEN];
        let balance = |start: u64, added: u64, removed: u64, now: u64| -> u64 {
            (start as i128 + added as i128 - removed as i128 - now as i128).max(0) as u64
        };
        let evicted = balance(
            baseline.flows,
            established.saturating_sub(baseline.established),
            reset.saturating_sub(baseline.reset) + aged_idle + aged_closed,
            flows_entries,
        );
        let half_open_evicted = balance(
            baseline.half_open,
            created.saturating_sub(baseline.half_open_created),
            established.saturating_sub(baseline.established) + half_open_aged,
            half_open_entries,
        );
        Self {
            flows_entries,
            flows_capacity: capacity::FLOWS,
            established,
            reset,
            fin: c[flow_counter::FIN],
            aged_idle,
            aged_closed,
            evicted,
            half_open_entries,
            half_open_capacity: capacity::HALF_OPEN,
            half_open_created: created,
            half_open_aged,
            half_open_evicted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn flow(last_seen_s: u64, flags: u8) -> FlowState {
        FlowState {
            first_seen_ns: S,
            last_seen_ns: last_seen_s * S,
            flags,
            ..FlowState::default()
        }
    }

    #[test]
    fn an_open_flow_expires_after_the_idle_timeout_only() {
        let p = AgingPolicy::default();
        let f = flow(100, flow_flag::ACK_SEEN);
        assert_eq!(p.flow_expired(&f, 100 * S), None);
        assert_eq!(
            p.flow_expired(&f, (100 + 3600) * S),
            None,
            "exactly the timeout is not past it"
        );
        assert_eq!(p.flow_expired(&f, (100 + 3600) * S + 1), Some(Expired::Idle));
        // A keep-alive connection idle for 10 minutes stays.
        assert_eq!(p.flow_expired(&f, (100 + 600) * S), None);
    }

    #[test]
    fn a_closed_flow_expires_after_the_fin_timeout() {
        let p = AgingPolicy::default();
        let f = flow(100, flow_flag::ACK_SEEN | flow_flag::FIN_SEEN);
        assert_eq!(p.flow_expired(&f, 159 * S), None);
        assert_eq!(p.flow_expired(&f, 161 * S), Some(Expired::Closed));
        // A FIN timeout above the idle one never keeps a closed flow longer than an open one.
        let p = AgingPolicy {
            flow_idle: Duration::from_secs(10),
            fin_idle: Duration::from_secs(60),
            ..p
        };
        assert_eq!(p.flow_expired(&f, 111 * S), Some(Expired::Closed));
    }

    #[test]
    fn stamps_in_the_future_or_missing_never_underflow() {
        let p = AgingPolicy::default();
        // The coarse kernel clock can be a tick ahead of a userspace read taken just before.
        assert_eq!(p.flow_expired(&flow(200, 0), 199 * S), None);
        // No last-seen stamp: the first-seen one counts.
        let f = FlowState {
            first_seen_ns: 50 * S,
            ..FlowState::default()
        };
        assert_eq!(p.flow_expired(&f, 60 * S), None);
        assert_eq!(p.flow_expired(&f, 50 * S + 3601 * S), Some(Expired::Idle));
    }

    #[test]
    fn half_open_entries_expire_after_their_timeout() {
        let p = AgingPolicy::default();
        let h = HalfOpen {
            first_seen_ns: 10 * S,
            ..HalfOpen::default()
        };
        assert!(!p.half_open_expired(&h, 40 * S));
        assert!(p.half_open_expired(&h, 41 * S));
    }

    #[test]
    fn evictions_are_what_the_balance_leaves() {
        let baseline = Baseline {
            flows: 10,
            half_open: 0,
            established: 100,
            reset: 5,
            half_open_created: 200,
        };
        let mut counters = CounterTotals::default();
        counters.flows[flow_counter::ESTABLISHED] = 150; // 50 new
        counters.flows[flow_counter::RESET] = 15; // 10 reset
        counters.flows[flow_counter::HALF_OPEN] = 1200; // 1000 new SYNs
        let stats = AgingStats::default();
        stats.flows_idle.store(4, Ordering::Relaxed);
        stats.flows_closed.store(6, Ordering::Relaxed);
        stats.half_open.store(100, Ordering::Relaxed);
        // 10 + 50 − 10 − 10 = 40 would be left; 30 are: 10 evicted.
        let f = FlowFigures::derive(&baseline, &counters, &stats, (30, 800));
        assert_eq!(f.evicted, 10);
        // 0 + 1000 − 50 − 100 − 800 = 50.
        assert_eq!(f.half_open_evicted, 50);
        // A skewed snapshot never shows a negative count.
        let f = FlowFigures::derive(&baseline, &counters, &stats, (45, 900));
        assert_eq!((f.evicted, f.half_open_evicted), (0, 0));
    }
}
