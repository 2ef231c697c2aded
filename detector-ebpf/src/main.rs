//! aqd's XDP program: one pass per packet, from the wire to a verdict.
//!
//! ```text
//! parse (Ethernet, ≤2 VLAN tags, IPv4 / IPv6 + ext headers, TCP / UDP)
//!   → allowlist (exact, prefix)            → PASS
//!   → denylist (exact, prefix)             → DROP
//!   → decision (exact, then /24 or /64)    → block: DROP · throttle: rate class · monitor: count
//!   → protected port? per-source state: counters + token buckets (GCRA) → over the limit: DROP
//!   → SYN to a protected port: connection event
//! ```
//! Every packet is counted under exactly one [`Reason`]; drops are sampled 1-in-N to the ring buffer; failed
//! ring-buffer reservations are counted. Malformed input is passed to the kernel stack (which drops it) and
//! counted; the program never returns `XDP_ABORTED`. Policy (what to block, which limits) lives in userspace;
//! the kernel only enforces what the maps say, and checks expiry itself.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_map_lookup_elem},
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::XdpContext,
};
use aya_log_ebpf::warn;
use core::mem::size_of;
use detector_common::{
    Action, AddrKey, Bucket, CONFIG_FLAG_CONN_EVENTS, Config, ConnEvent, Counters, Decision, DropEvent,
    EventHeader, EventKind, FlowTuple, ListEntry, MAX_EXPIRED_PREFIX_STEPS, RateClass, Reason, ReasonText,
    SourceState, Verdict, capacity,
};

use parse::{Packet, ParseError};

#[map(name = "ALLOW_EXACT")]
static ALLOW_EXACT: HashMap<AddrKey, ListEntry> = HashMap::with_max_entries(capacity::ALLOW_EXACT, 0);
#[map(name = "ALLOW_PREFIX")]
static ALLOW_PREFIX: LpmTrie<AddrKey, ListEntry> = LpmTrie::with_max_entries(capacity::ALLOW_PREFIX, 0);
#[map(name = "DENY_EXACT")]
static DENY_EXACT: HashMap<AddrKey, ListEntry> = HashMap::with_max_entries(capacity::DENY_EXACT, 0);
#[map(name = "DENY_PREFIX")]
static DENY_PREFIX: LpmTrie<AddrKey, ListEntry> = LpmTrie::with_max_entries(capacity::DENY_PREFIX, 0);
#[map(name = "DECISION_EXACT")]
static DECISION_EXACT: HashMap<AddrKey, Decision> = HashMap::with_max_entries(capacity::DECISION_EXACT, 0);
#[map(name = "DECISION_PREFIX")]
static DECISION_PREFIX: HashMap<AddrKey, Decision> = HashMap::with_max_entries(capacity::DECISION_PREFIX, 0);
#[map(name = "SOURCES")]
static SOURCES: LruHashMap<AddrKey, SourceState> = LruHashMap::with_max_entries(capacity::SOURCES, 0);
#[map(name = "RATE_CLASSES")]
static RATE_CLASSES: Array<RateClass> = Array::with_max_entries(capacity::RATE_CLASSES, 0);
/// Non-zero at index `port` when `port` (TCP or UDP destination) is a protected service port.
#[map(name = "PROTECTED_PORTS")]
static PROTECTED_PORTS: Array<u8> = Array::with_max_entries(capacity::PROTECTED_PORTS, 0);
#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);
/// Decision reason texts, for userspace only (see `detector_common::ReasonText`); pinned with the decisions.
#[map(name = "REASONS")]
static REASONS: Array<ReasonText> = Array::with_max_entries(capacity::REASONS, 0);
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

/// Set to 1 at load time (`detector_common::TEST_CLOCK_GLOBAL`) to take "now" from `Config::test_now_ns`.
/// Read-only: the verifier sees the constant and prunes the branch not taken.
#[unsafe(no_mangle)]
static AQD_TEST_CLOCK: u8 = 0;

static DEFAULT_CONFIG: Config = Config {
    drop_sample_every: 0,
    flags: 0,
    test_now_ns: 0,
};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// `FlowTuple::proto` when an IPv6 extension chain was too long to find the transport protocol.
const PROTO_UNKNOWN: u8 = 0;

#[xdp]
pub fn aqd_xdp(ctx: XdpContext) -> u32 {
    // An array lookup never fails for index 0; the fallback keeps the verifier (and a reader) sure of it.
    let config = CONFIG.get(0).unwrap_or(&DEFAULT_CONFIG);
    let mut clock = Clock::new(config);
    let (reason, packet) = match parse::parse(&ctx) {
        Ok(packet) => (classify(&ctx, &packet, config, &mut clock), Some(packet)),
        Err(ParseError::NotIp) => (Reason::PassNotIp, None),
        Err(ParseError::Malformed) => (Reason::PassMalformed, None),
    };
    account(&ctx, reason, packet.as_ref().map(|p| &p.flow), config, &mut clock);
    reason.verdict().xdp_action()
}

/// A bare `XDP_PASS`: the floor the benchmark measures aqd against, in the same object and load. Never attached.
#[xdp]
pub fn aqd_floor(_ctx: XdpContext) -> u32 {
    Verdict::Pass.xdp_action()
}

/// The verdict for a parsed packet. Emits the connection event for accepted SYNs to protected ports.
#[inline(always)]
fn classify(ctx: &XdpContext, packet: &Packet, config: &Config, clock: &mut Clock) -> Reason {
    let src = &packet.flow.src;
    if list_hit_exact(&ALLOW_EXACT, src, clock) {
        return Reason::PassAllowExact;
    }
    if list_hit_prefix(&ALLOW_PREFIX, src, clock) {
        return Reason::PassAllowPrefix;
    }
    if list_hit_exact(&DENY_EXACT, src, clock) {
        return Reason::DropDenyExact;
    }
    if list_hit_prefix(&DENY_PREFIX, src, clock) {
        return Reason::DropDenyPrefix;
    }

    // The most specific live decision wins: the exact address, then its /24 or /64.
    let mut rate_class: u32 = 0;
    let mut pass_reason = Reason::PassDefault;
    let (decision, exact) = match live_decision(&DECISION_EXACT, src, clock) {
        Some(d) => (Some(d), true),
        None => (live_decision(&DECISION_PREFIX, &src.prefix_scope(), clock), false),
    };
    if let Some((action, class)) = decision {
        match Action::from_u8(action) {
            Some(Action::Block) => {
                return if exact {
                    Reason::DropBlockExact
                } else {
                    Reason::DropBlockPrefix
                };
            }
            Some(Action::Throttle) => {
                rate_class = class as u32;
                pass_reason = Reason::PassThrottled;
            }
            Some(Action::Monitor) => pass_reason = Reason::PassMonitor,
            None => {}
        }
    }

    // Limits apply only to the protected service ports, so SSH and health checks are never limited. A TCP/UDP
    // packet whose ports cannot be read (a non-first fragment, an over-long IPv6 extension chain) counts as
    // protected: otherwise fragmenting would be a way around the limits.
    let is_protected = if packet.has_ports {
        matches!(PROTECTED_PORTS.get(packet.flow.dst_port as u32), Some(p) if *p != 0)
    } else {
        matches!(packet.flow.proto, IPPROTO_TCP | IPPROTO_UDP | PROTO_UNKNOWN)
    };
    if !is_protected {
        return pass_reason;
    }
    let is_syn = packet.flow.proto == IPPROTO_TCP && packet.tcp_syn && !packet.tcp_ack;
    if let Some(drop) = track_source(ctx, src, rate_class, is_syn, clock) {
        return drop;
    }
    if is_syn && config.flags & CONFIG_FLAG_CONN_EVENTS != 0 {
        emit_conn(ctx, &packet.flow, clock);
    }
    pass_reason
}

/// Whether `key` has a live (unexpired) entry in an exact-address list; bumps its hit count.
#[inline(always)]
fn list_hit_exact(map: &HashMap<AddrKey, ListEntry>, key: &AddrKey, clock: &mut Clock) -> bool {
    match map.get_ptr_mut(key) {
        Some(entry) => hit_if_live(entry, clock),
        None => false,
    }
}

/// Whether `key` falls in a live prefix of a prefix list; bumps its hit count. The longest match wins; when it
/// has expired, the next shorter covering prefix is tried (bounded), so expiry never needs userspace's help.
#[inline(always)]
fn list_hit_prefix(map: &LpmTrie<AddrKey, ListEntry>, key: &AddrKey, clock: &mut Clock) -> bool {
    let mut lookup_key = Key::new(128, *key);
    for _ in 0..MAX_EXPIRED_PREFIX_STEPS {
        // aya-ebpf's LpmTrie::get only hands out a shared reference; the hit counter needs the writable
        // pointer the lookup helper returns, so call the helper directly (what `get` does inside).
        // SAFETY: `map` is a map definition in the maps section and `lookup_key` has the trie's key layout.
        let entry = unsafe {
            bpf_map_lookup_elem(
                map as *const LpmTrie<AddrKey, ListEntry> as *mut c_void,
                &lookup_key as *const Key<AddrKey> as *const c_void,
            )
        } as *mut ListEntry;
        if entry.is_null() {
            return false;
        }
        if hit_if_live(entry, clock) {
            return true;
        }
        // SAFETY: non-null result of a map lookup.
        let matched_len = unsafe { (*entry).prefix_len };
        if matched_len == 0 || matched_len > 128 {
            return false;
        }
        lookup_key = Key::new(matched_len - 1, *key);
    }
    false
}

#[inline(always)]
fn hit_if_live(entry: *mut ListEntry, clock: &mut Clock) -> bool {
    // SAFETY: `entry` points into map memory returned by a successful lookup.
    let entry = unsafe { &mut *entry };
    if entry.expires_ns != 0 && entry.expires_ns <= clock.now() {
        return false;
    }
    entry.hits = entry.hits.wrapping_add(1);
    true
}

/// Action and rate class of the decision for `key`, if there is one and it has not expired; bumps its hits.
#[inline(always)]
fn live_decision(map: &HashMap<AddrKey, Decision>, key: &AddrKey, clock: &mut Clock) -> Option<(u8, u8)> {
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
fn track_source(
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
            if let Err(errno) = SOURCES.insert(src, fresh, 0) {
                // Cold path (an LRU map evicts rather than fails); the source passes unlimited this once.
                warn!(ctx, "cannot track a new source (errno {})", errno);
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

/// Counts the packet under its reason and samples drops to the ring buffer.
#[inline(always)]
fn account(ctx: &XdpContext, reason: Reason, flow: Option<&FlowTuple>, config: &Config, clock: &mut Clock) {
    let Some(counters) = COUNTERS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU map memory for this CPU, from a successful lookup.
    let counters = unsafe { &mut *counters };
    if let Some(c) = counters.by_reason.get_mut(reason as usize) {
        *c += 1;
    }
    if reason.verdict() != Verdict::Drop || config.drop_sample_every == 0 {
        return;
    }
    counters.drop_sample_tick += 1;
    if counters.drop_sample_tick % config.drop_sample_every as u64 != 0 {
        return;
    }
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

/// Written out like the drop sample above rather than through one generic emitter: the generic version (a
/// closure filling the slot) compiled to more than the 512-byte BPF stack (this program uses 464).
#[inline(always)]
fn emit_conn(ctx: &XdpContext, flow: &FlowTuple, clock: &mut Clock) {
    let kind = EventKind::Conn as usize;
    let sent = match EVENTS.reserve::<ConnEvent>(0) {
        Some(mut slot) => {
            let event = slot.as_mut_ptr();
            // SAFETY: `event` is the reserved, exclusively owned ring-buffer slot of a ConnEvent's size.
            unsafe {
                fill_header(
                    &raw mut (*event).header,
                    ctx,
                    EventKind::Conn,
                    size_of::<ConnEvent>(),
                    clock,
                );
                (*event).flow = *flow;
            }
            slot.submit(wakeup_flag());
            true
        }
        None => false,
    };
    if let Some(counters) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU map memory for this CPU, from a successful lookup.
        let counters = unsafe { &mut *counters };
        bump(
            if sent {
                &mut counters.events_sent
            } else {
                &mut counters.events_lost
            },
            kind,
        );
    }
}

/// Ring-buffer wake-ups are batched: a wake-up (an interrupt to the reader, expensive in VMs) only once an
/// eighth of the ring is waiting; the daemon also drains the ring on a short timer, so events still arrive
/// within milliseconds at low rates.
#[inline(always)]
fn wakeup_flag() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= (capacity::EVENTS_BYTES / 8) as u64 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
fn bump<const N: usize>(counters: &mut [u64; N], index: usize) {
    if let Some(c) = counters.get_mut(index) {
        *c += 1;
    }
}

/// # Safety
/// `header` must point to writable memory for an `EventHeader` (a reserved ring-buffer slot).
#[inline(always)]
unsafe fn fill_header(
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

/// "Now", read at most once per packet and only when something needs it. Two resolutions: the precise clock
/// (`bpf_ktime_get_ns`, costly in VMs) for rate limits and event timestamps; the coarse one (same
/// CLOCK_MONOTONIC base, tick resolution, a memory read) for expiries and last-seen times.
struct Clock {
    now: u64,
    coarse: u64,
    test_now: u64,
}

impl Clock {
    #[inline(always)]
    fn new(config: &Config) -> Self {
        Self {
            now: 0,
            coarse: 0,
            test_now: config.test_now_ns,
        }
    }

    #[inline(always)]
    fn test_clock() -> bool {
        // SAFETY: a read-only global; volatile so the load is not folded at compile time.
        unsafe { core::ptr::read_volatile(&AQD_TEST_CLOCK) != 0 }
    }

    #[inline(always)]
    fn now(&mut self) -> u64 {
        if self.now == 0 {
            self.now = if Self::test_clock() {
                self.test_now
            } else {
                unsafe { bpf_ktime_get_ns() }
            };
        }
        self.now
    }

    #[inline(always)]
    fn coarse(&mut self) -> u64 {
        if self.now != 0 {
            return self.now;
        }
        if self.coarse == 0 {
            self.coarse = if Self::test_clock() {
                self.test_now
            } else {
                unsafe { bpf_ktime_get_coarse_ns() }
            };
        }
        self.coarse
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
