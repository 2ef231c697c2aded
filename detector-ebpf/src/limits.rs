//! Decisions with expiry and per-source state with GCRA limits: shared by `aqd_xdp` and `aqd_tcp`.

use aya_ebpf::maps::{HashMap, LruHashMap};
use aya_ebpf::programs::XdpContext;
use detector_common::{AddrKey, Bucket, Decision, Reason, SourceState, flow::scratch_flag, policy_flag};

use crate::{
    clock::Clock,
    maps::{EXACT_BUCKETS, PREFIX_BUCKETS, RATE_CLASSES, SOURCES},
};

/// Whose budget a source's packets spend.
///
/// A throttle decision's budget is kept apart from `SOURCES` (which every new source enters, so a flood of
/// random sources evicts its entries) and is spent only by what the kernel can tell is the throttled party's:
/// a SYN spends the connection budget alone (the packet budget too only when the class has no connection
/// limit), packets of verified flows the packet budget, and `aqd_tcp` drops TCP packets of no verified flow
/// (`DropUnverifiedThrottled`) instead of charging them. Forged packets inside a throttled /24 can then spend
/// its connection budget — new connections of its honest users wait — but never the packet budget of their
/// established connections. UDP cannot be verified and charges the packet budget as it comes.
///
/// One of three: no bits (the source's own bucket in its `SOURCES` entry: rate class 0, a
/// fingerprint's throttle), [`Budget::EXACT`] (a throttle decision on the exact address: its bucket in
/// `EXACT_BUCKETS`) or [`Budget::PREFIX`] (a throttle decision on the /24 or /64: the prefix's shared bucket in
/// `PREFIX_BUCKETS`).
///
/// Kept as the budget bits of the policy outcome, not as an enum: decoding them into one of three constants
/// (branches) early in `aqd_xdp` gave the verifier one copy of every path between the decode and the charge
/// per constant, which on kernels that prune less (Debian's 6.1) took `aqd_xdp` over its instruction budget.
/// Masked bits read from map memory are one unknown value on every path; the three-way choice is made only
/// where the bucket is looked up ([`limit_source`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Budget(u8);

impl Budget {
    /// A throttle decision on the exact address.
    pub const EXACT: Self = Self(policy_flag::EXACT_LIMIT);
    /// A throttle decision on the /24 or /64 (wins if both bits are set; a walk sets one).
    pub const PREFIX: Self = Self(policy_flag::PREFIX_LIMIT);

    /// From the budget bits of a cached policy outcome (`policy_flag`) or of `Scratch::flags` (`scratch_flag`
    /// uses the same bits for them). A mask, no branch.
    #[inline(always)]
    pub fn of_flags(flags: u8) -> Self {
        Self(flags & (Self::EXACT.0 | Self::PREFIX.0))
    }

    /// `scratch_flag` bits that hand this budget to `aqd_tcp`: the same bits.
    #[inline(always)]
    pub fn scratch_flags(self) -> u8 {
        const _: () = assert!(
            scratch_flag::EXACT_LIMIT == Budget::EXACT.0 && scratch_flag::PREFIX_LIMIT == Budget::PREFIX.0
        );
        self.0
    }

    /// A throttle decision's budget (exact or prefix), not the source's own.
    #[inline(always)]
    pub fn is_decision(self) -> bool {
        self.0 != 0
    }
}

/// A new decision bucket: TATs 0, a full burst.
static NEW_BUCKET: Bucket = Bucket {
    packet_tat_ns: 0,
    conn_tat_ns: 0,
};

/// Map update flag: create only, never replace.
pub const NOEXIST: u64 = aya_ebpf::bindings::BPF_NOEXIST as u64;

/// What a new `SOURCES` entry starts from, in read-only global data: a 72-byte value built on the stack would
/// push `aqd_tcp` over the 512-byte BPF stack.
static NEW_SOURCE: SourceState = SourceState::NEW;

/// A live decision's action, rate class and expiry (0 = never).
pub struct LiveDecision {
    pub action: u8,
    pub rate_class: u8,
    pub expires_ns: u64,
}

/// The decision for `key`, if there is one and it has not expired; bumps its hits.
#[inline(always)]
pub fn live_decision<K>(map: &HashMap<K, Decision>, key: &K, clock: &mut Clock) -> Option<LiveDecision> {
    let ptr = map.get_ptr_mut(key)?;
    // SAFETY: `ptr` points into map memory returned by a successful lookup.
    let decision = unsafe { &mut *ptr };
    if decision.expires_ns != 0 && decision.expires_ns <= clock.now() {
        return None;
    }
    decision.hits = decision.hits.wrapping_add(1);
    Some(LiveDecision {
        action: decision.action,
        rate_class: decision.rate_class,
        expires_ns: decision.expires_ns,
    })
}

/// The source's `SOURCES` entry, created when missing (a new source starts with a full burst allowance: a TAT
/// of 0 is "any time before now"). `None` only if the insert failed (an LRU map evicts rather than fails).
#[inline(always)]
pub fn source_entry(src: &AddrKey, fresh: &SourceState) -> Option<*mut SourceState> {
    if let Some(state) = SOURCES.get_ptr_mut(src) {
        return Some(state);
    }
    // BPF_NOEXIST: when another CPU created the entry meanwhile, its entry (and the charges already on it) is
    // kept; replacing it would detach the bucket that CPU goes on charging.
    let _ = SOURCES.insert(src, fresh, NOEXIST);
    SOURCES.get_ptr_mut(src)
}

/// Counts the packet in its source's state and applies the rate class (`aqd_tcp`'s entry point: it looks the
/// state up itself); returns the drop reason when over a limit.
#[inline(always)]
pub fn track_source(
    ctx: &XdpContext,
    src: &AddrKey,
    class: u32,
    is_syn: bool,
    budget: Budget,
    clock: &mut Clock,
) -> Option<Reason> {
    // Cold path when the insert fails: the source passes unlimited this once.
    let state = source_entry(src, &NEW_SOURCE)?;
    // SAFETY: `state` points into map memory returned by a successful lookup.
    limit_source(ctx, unsafe { &mut *state }, src, class, is_syn, budget, clock)
}

/// Counts the packet in `state` and applies the rate class to `budget`: the source's own bucket, its exact
/// decision's, or its prefix decision's shared one (every address of a throttled prefix draws from one budget).
#[inline(always)]
pub fn limit_source(
    ctx: &XdpContext,
    state: &mut SourceState,
    src: &AddrKey,
    class: u32,
    is_syn: bool,
    budget: Budget,
    clock: &mut Clock,
) -> Option<Reason> {
    state.packets += 1;
    state.bytes += (ctx.data_end() - ctx.data()) as u64;
    state.last_seen_ns = clock.coarse();
    if is_syn {
        state.conns += 1;
    }
    // A decision bucket whose insert failed (cold path) falls back to the source's own.
    let decision = if budget.0 & Budget::PREFIX.0 != 0 {
        decision_bucket(&PREFIX_BUCKETS, &src.prefix_scope())
    } else if budget.0 & Budget::EXACT.0 != 0 {
        decision_bucket(&EXACT_BUCKETS, src)
    } else {
        None
    };
    let bucket = decision.unwrap_or(&raw mut state.bucket);
    let verdict = rate_limit(bucket, class, is_syn, budget.is_decision(), clock);
    if verdict.is_some() {
        state.rate_drops += 1;
    }
    verdict
}

/// A throttle decision's bucket under `key` (the address, or its /24 or /64), created when missing. Only
/// called for a live throttle decision, so unknown sources never create one.
#[inline(always)]
fn decision_bucket(map: &LruHashMap<AddrKey, Bucket>, key: &AddrKey) -> Option<*mut Bucket> {
    if let Some(bucket) = map.get_ptr_mut(key) {
        return Some(bucket);
    }
    // BPF_NOEXIST: two CPUs creating it at once keep the first one's state.
    let _ = map.insert(key, &NEW_BUCKET, NOEXIST);
    map.get_ptr_mut(key)
}

/// The GCRA limits of `class` applied to a bucket (a source's own or a decision's). On a decision's bucket
/// a SYN is held to the connection limit only, when the class has one (see [`Budget`]).
#[inline(always)]
fn rate_limit(
    bucket: *mut Bucket,
    class: u32,
    is_syn: bool,
    decision: bool,
    clock: &mut Clock,
) -> Option<Reason> {
    let limits = RATE_CLASSES.get(class)?;
    let limit_conns = is_syn && limits.conn_interval_ns != 0;
    let limit_packets = limits.packet_interval_ns != 0 && !(decision && limit_conns);
    if !limit_packets && !limit_conns {
        return None;
    }
    // The precise clock only when a limit applies: GCRA needs ns; nothing else on this path does.
    let now = clock.now();
    // SAFETY: `bucket` points into map memory from a successful lookup (a `SOURCES` or `PREFIX_BUCKETS` value).
    let (packet_tat, conn_tat) =
        unsafe { (&raw mut (*bucket).packet_tat_ns, &raw mut (*bucket).conn_tat_ns) };
    // Both limits are checked before either is charged: a packet refused by one costs the other nothing.
    if limit_packets && !conforms(packet_tat, now, limits.packet_tolerance_ns) {
        return Some(Reason::DropRatePackets);
    }
    if limit_conns && !conforms(conn_tat, now, limits.conn_tolerance_ns) {
        return Some(Reason::DropRateConnections);
    }
    if limit_packets {
        charge(packet_tat, now, limits.packet_interval_ns);
    }
    if limit_conns {
        charge(conn_tat, now, limits.conn_interval_ns);
    }
    None
}

/// GCRA ("virtual scheduling"): a limit keeps the theoretical arrival time (TAT) of the next packet; a packet
/// conforms when it arrives no earlier than TAT minus the burst tolerance. No division, one u64 per limit.
#[inline(always)]
fn conforms(tat: *mut u64, now: u64, tolerance: u64) -> bool {
    // SAFETY: `tat` points into map memory (see `rate_limit`).
    let tat = unsafe { core::ptr::read_volatile(tat) };
    tat <= now || tat - now <= tolerance
}

/// Charges one packet: TAT = max(TAT, now) + interval. Several receive queues may charge one bucket at once, so
/// every update is atomic: a busy bucket (TAT ahead of now) is advanced with an atomic add (every conforming
/// packet moves TAT by exactly one interval, so the long-run rate holds with any number of CPUs), an idle one
/// is restarted at now + interval with a compare-and-swap, and when another CPU got there first (the swap
/// fails) the charge is an add on top of what it wrote. Nothing is ever overwritten, so no charge is lost
/// however long a CPU stalls between its read and its write (a vCPU preempted by the hypervisor, say). CPUs
/// that passed `conforms` in the same instant can overshoot the burst by one packet per extra CPU; that credit
/// is paid back at once (TAT moved for each).
#[inline(always)]
fn charge(tat: *mut u64, now: u64, interval: u64) {
    // SAFETY: `tat` points into map memory (see `rate_limit`), 8-byte aligned (a u64 field of a repr(C) value).
    unsafe {
        let seen = core::ptr::read_volatile(tat);
        if seen > now || compare_and_swap(tat, seen, now + interval) != seen {
            atomic_add(tat, interval);
        }
    }
}

/// `*dst = new` if `*dst == expected`, as one BPF atomic instruction (`BPF_CMPXCHG`, Linux 5.12+); returns the
/// value `*dst` held. Asm for the same reason as [`atomic_add`]; the instruction compares with and returns in
/// r0.
///
/// # Safety
/// `dst` must point to an 8-byte aligned u64 in map memory.
#[inline(always)]
unsafe fn compare_and_swap(dst: *mut u64, expected: u64, new: u64) -> u64 {
    let previous: u64;
    // SAFETY: per the caller's contract; the instruction reads and writes only `*dst` (and r0).
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({dst} + 0, r0, {new})",
            dst = in(reg) dst,
            new = in(reg) new,
            inout("r0") expected => previous,
            options(nostack),
        );
    }
    previous
}

/// `*dst += value` as one BPF atomic instruction (`BPF_ATOMIC | BPF_ADD`, the old `XADD`, accepted by every
/// kernel aqd supports). Written as asm because Rust's BPF target has no atomic read-modify-write types
/// (`AtomicU64::fetch_add` is not there), and `XADD` is what LLVM would emit for one whose result is unused.
///
/// # Safety
/// `dst` must point to an 8-byte aligned u64 in map memory.
#[inline(always)]
unsafe fn atomic_add(dst: *mut u64, value: u64) {
    // SAFETY: per the caller's contract; the instruction reads and writes only `*dst`.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({dst} + 0) += {value}",
            dst = in(reg) dst,
            value = in(reg) value,
            options(nostack),
        );
    }
}
