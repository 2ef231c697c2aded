//! Decisions with expiry and per-source state with GCRA limits: shared by `aqd_xdp` and `aqd_tcp`.

use aya_ebpf::maps::HashMap;
use aya_ebpf::programs::XdpContext;
use detector_common::{AddrKey, Bucket, Decision, Reason, SourceState};

use crate::{
    clock::Clock,
    maps::{RATE_CLASSES, SOURCES},
};

/// Action and rate class of the decision for `key`, if there is one and it has not expired; bumps its hits.
#[inline(always)]
pub fn live_decision<K>(map: &HashMap<K, Decision>, key: &K, clock: &mut Clock) -> Option<(u8, u8)> {
    let ptr = map.get_ptr_mut(key)?;
    // SAFETY: `ptr` points into map memory returned by a successful lookup.
    let decision = unsafe { &mut *ptr };
    if decision.expires_ns != 0 && decision.expires_ns <= clock.now() {
        return None;
    }
    decision.hits = decision.hits.wrapping_add(1);
    Some((decision.action, decision.rate_class))
}

/// Counts the packet in its source's state and applies the source's rate class; returns the drop reason when
/// over a limit.
///
/// GCRA ("virtual scheduling"): each limit keeps the theoretical arrival time (TAT) of the next packet; a packet
/// conforms when it arrives no earlier than TAT minus the burst tolerance. No division, one u64 per limit.
/// The state is read-modify-written without atomics: two CPUs racing on one source may admit one extra packet.
#[inline(always)]
pub fn track_source(
    ctx: &XdpContext,
    src: &AddrKey,
    class: u32,
    is_syn: bool,
    clock: &mut Clock,
) -> Option<Reason> {
    let state = match SOURCES.get_ptr_mut(src) {
        Some(s) => s,
        None => {
            // A new source starts with a full burst allowance: a TAT of 0 is "any time before now".
            let fresh = SourceState::default();
            if SOURCES.insert(src, fresh, 0).is_err() {
                // Cold path (an LRU map evicts rather than fails); the source passes unlimited this once. No
                // log here: aya-log's formatter is a BPF subprogram whose stack adds to the caller's.
                return None;
            }
            SOURCES.get_ptr_mut(src)?
        }
    };
    // SAFETY: `state` points into map memory returned by a successful lookup.
    let state = unsafe { &mut *state };
    state.packets += 1;
    state.bytes += (ctx.data_end() - ctx.data()) as u64;
    state.last_seen_ns = clock.coarse();
    if is_syn {
        state.conns += 1;
    }
    let verdict = rate_limit(&mut state.bucket, class, is_syn, clock);
    if verdict.is_some() {
        state.rate_drops += 1;
    }
    verdict
}

/// The GCRA limits of `class` applied to one source's bucket.
#[inline(always)]
fn rate_limit(bucket: &mut Bucket, class: u32, is_syn: bool, clock: &mut Clock) -> Option<Reason> {
    let limits = RATE_CLASSES.get(class)?;
    if limits.packet_interval_ns == 0 && (!is_syn || limits.conn_interval_ns == 0) {
        return None;
    }
    // The precise clock only when a limit applies: GCRA needs ns; nothing else on this path does.
    let now = clock.now();
    let mut packet_tat = bucket.packet_tat_ns;
    if limits.packet_interval_ns != 0 {
        match gcra(
            packet_tat,
            now,
            limits.packet_interval_ns,
            limits.packet_tolerance_ns,
        ) {
            Some(t) => packet_tat = t,
            None => return Some(Reason::DropRatePackets),
        }
    }
    let mut conn_tat = bucket.conn_tat_ns;
    if is_syn && limits.conn_interval_ns != 0 {
        match gcra(conn_tat, now, limits.conn_interval_ns, limits.conn_tolerance_ns) {
            Some(t) => conn_tat = t,
            None => return Some(Reason::DropRateConnections),
        }
    }
    bucket.packet_tat_ns = packet_tat;
    bucket.conn_tat_ns = conn_tat;
    None
}

/// One GCRA step: the new TAT if a packet arriving at `now` conforms, `None` if it is over the limit.
#[inline(always)]
fn gcra(tat: u64, now: u64, interval: u64, tolerance: u64) -> Option<u64> {
    let tat = if tat > now { tat } else { now };
    if tat - now > tolerance {
        None
    } else {
        Some(tat + interval)
    }
}
