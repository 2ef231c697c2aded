//! Counting every packet under its reason, and writing events to the ring buffer.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    programs::XdpContext,
};
use core::mem::size_of;
use detector_common::{Config, DropEvent, EventHeader, EventKind, FlowTuple, Reason, Verdict, capacity};

use crate::{
    clock::{Clock, jiffies},
    maps::{COUNTERS, CPU_STATE, EVENTS},
};

/// Counts the packet under its reason and samples drops to the ring buffer.
#[inline(always)]
pub fn account(
    ctx: &XdpContext,
    reason: Reason,
    flow: Option<&FlowTuple>,
    config: &Config,
    clock: &mut Clock,
) {
    let Some(counters) = COUNTERS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU map memory for this CPU, from a successful lookup.
    let counters = unsafe { &mut *counters };
    // `black_box`: a reason handed over from another program (scratch memory) is in range by the enum's
    // invariant, so the compiler drops the bounds check — which the verifier then misses. Keep the check.
    if let Some(c) = counters.by_reason.get_mut(core::hint::black_box(reason as usize)) {
        *c += 1;
    }
    if reason.verdict() != Verdict::Drop || config.drop_sample_every == 0 {
        return;
    }
    // Every Nth drop, counted up and reset rather than by `%`: a 64-bit division on every drop costs more
    // than the rest of the drop path's accounting.
    counters.drop_sample_tick += 1;
    if counters.drop_sample_tick < config.drop_sample_every as u64 {
        return;
    }
    counters.drop_sample_tick = 0;
    let kind = EventKind::Drop as usize;
    match EVENTS.reserve::<DropEvent>(0) {
        Some(mut slot) => {
            // Filled in place: building the record on the stack first would cost BPF stack space.
            let event = slot.as_mut_ptr();
            // SAFETY: `event` is the reserved, exclusively owned ring-buffer slot of a DropEvent's size.
            unsafe {
                fill_header(
                    &raw mut (*event).header,
                    ctx,
                    EventKind::Drop,
                    size_of::<DropEvent>(),
                    clock,
                );
                match flow {
                    Some(f) => (*event).flow = *f,
                    None => (*event).flow = FlowTuple::default(),
                }
                (*event).reason = reason as u32;
                (*event).frame_len = (ctx.data_end() - ctx.data()) as u32;
            }
            slot.submit(wakeup_flag());
            bump(&mut counters.events_sent, kind);
        }
        None => bump(&mut counters.events_lost, kind),
    }
}

/// Ring-buffer wake-ups are batched: a wake-up (an inter-processor interrupt to the reader, a VM exit in a
/// guest: microseconds) only once an eighth of the ring is waiting, and at most once per jiffy per CPU — a
/// reader that falls behind (or a ring nobody drains) would otherwise make every later event pay for one
/// (1-in-64 drop samples then cost ~100 ns per dropped packet on average). The daemon also drains the ring on
/// a short timer, so events still arrive within milliseconds at low rates.
#[inline(always)]
pub fn wakeup_flag() -> u64 {
    let now = jiffies();
    let Some(cpu) = CPU_STATE.get_ptr_mut(0) else {
        return BPF_RB_NO_WAKEUP as u64;
    };
    // SAFETY: per-CPU map memory from a successful lookup; nothing else runs on this CPU meanwhile.
    unsafe {
        if (*cpu).wakeup_jiffies == now
            || EVENTS.query(BPF_RB_AVAIL_DATA as u64) < (capacity::EVENTS_BYTES / 8) as u64
        {
            return BPF_RB_NO_WAKEUP as u64;
        }
        (*cpu).wakeup_jiffies = now;
    }
    BPF_RB_FORCE_WAKEUP as u64
}

#[inline(always)]
pub fn bump<const N: usize>(counters: &mut [u64; N], index: usize) {
    if let Some(c) = counters.get_mut(index) {
        *c += 1;
    }
}

/// # Safety
/// `header` must point to writable memory for an `EventHeader` (a reserved ring-buffer slot).
#[inline(always)]
pub unsafe fn fill_header(
    header: *mut EventHeader,
    ctx: &XdpContext,
    kind: EventKind,
    len: usize,
    clock: &mut Clock,
) {
    // SAFETY: `ctx.ctx` is the xdp_md the kernel passed in; `header` is valid per the caller's contract.
    unsafe {
        (*header).kind = kind as u16;
        (*header).len = len as u16;
        (*header).ifindex = (*ctx.ctx).ingress_ifindex;
        (*header).time_ns = clock.now();
    }
}

/// Counts one connection-bookkeeping step (`detector_common::flow_counter` index).
#[inline(always)]
pub fn count_flow(index: usize) {
    if let Some(counters) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU map memory for this CPU, from a successful lookup.
        bump(unsafe { &mut (*counters).flows }, index);
    }
}

/// Counts one event of `kind`: sent, lost (ring full), or shed (deliberately not sent under load).
#[inline(always)]
pub fn count_event(kind: EventKind, sent: bool, shed: bool) {
    if let Some(counters) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU map memory for this CPU, from a successful lookup.
        let counters = unsafe { &mut *counters };
        let slot = if shed {
            &mut counters.events_shed
        } else if sent {
            &mut counters.events_sent
        } else {
            &mut counters.events_lost
        };
        bump(slot, kind as usize);
    }
}
