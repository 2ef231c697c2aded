//! aqd's XDP program: one pass per packet, from the wire to a verdict.
//!
//! ```text
//! parse (Ethernet, ≤2 VLAN tags, IPv4 / IPv6 + ext headers, TCP / UDP)
//!   → the source's cached policy outcome (`SOURCES`, valid for the current `POLICY_GEN`), or the walk:
//!       management networks                  → PASS (ahead of every rule, limit and fingerprint verdict)
//!       allowlist (exact, prefix)            → PASS
//!       denylist (exact, prefix)             → DROP
//!       decision (exact, then /24 or /64)    → block: DROP · throttle: rate class · monitor: count
//!   → protected port? per-source state: counters + GCRA limits (a prefix throttle: the prefix's shared
//!     bucket) → over the limit: DROP
//!   → TCP to a protected port: tail call to `aqd_tcp` (tcp.rs: SYN signature and its verdict, flows,
//!     requests, capture), which tail-calls `aqd_hello` (hello.rs) for a flow's first payload segment
//! ```
//! The TCP work is in separate programs so each is verified on its own: inlined into this one, the SYN option
//! walk and the ClientHello walk multiplied the verifier's paths through the classifier (loads took seconds).
//! Every packet is counted under exactly one [`Reason`]; drops are sampled 1-in-N to the ring buffer; failed
//! ring-buffer reservations are counted. Malformed input is passed to the kernel stack (which drops it) and
//! counted; the program never returns `XDP_ABORTED`. Policy (what to block, which limits) lives in userspace;
//! the kernel only enforces what the maps say, and checks expiry itself.
#![no_std]
#![no_main]
// `asm!` on the BPF target (the atomic add of the rate limiter, limits.rs).
#![feature(asm_experimental_arch)]
// Map keys and values are passed by reference: by value, aya's `impl Borrow<K>` copies them onto the 512-byte
// BPF stack first.
#![allow(clippy::needless_borrows_for_generic_args)]

mod account;
mod capture;
mod clock;
mod csum;
mod egress;
mod hello;
mod limits;
mod maps;
mod mem;
mod parse;
mod tcp;

use aya_ebpf::{
    cty::c_void,
    helpers::bpf_map_lookup_elem,
    macros::xdp,
    maps::{HashMap, LpmTrie, lpm_trie::Key},
    programs::XdpContext,
};
use detector_common::{
    ADMISSION_PER_WINDOW, ADMISSION_WINDOW_NS, Action, AddrKey, CONFIG_FLAG_PASS_TCP_FRAGMENTS, CacheWork,
    CachedPolicy, ListEntry, MAX_EXPIRED_PREFIX_STEPS, PROG_INDEX_TCP, Reason, Verdict, policy_flag,
};

use account::account;
use clock::Clock;
use limits::{Budget, NOEXIST, limit_source, live_decision, source_entry};
use maps::{
    ALLOW_EXACT, ALLOW_PREFIX, CACHE_WORK, CONFIG, DECISION_EXACT, DECISION_PREFIX, DEFAULT_CONFIG,
    DENY_EXACT, DENY_PREFIX, MANAGEMENT, POLICY_GEN, PROGRAMS, PROTECTED_PORTS, SCRATCH, SOURCES,
};
use parse::{Packet, ParseError};

pub const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// `FlowTuple::proto` when an IPv6 extension chain was too long to find the transport protocol.
const PROTO_UNKNOWN: u8 = 0;

#[xdp]
pub fn aqd_xdp(ctx: XdpContext) -> u32 {
    // An array lookup never fails for index 0; the fallback keeps the verifier (and a reader) sure of it.
    let config = CONFIG.get(0).unwrap_or(&DEFAULT_CONFIG);
    let mut clock = Clock::new(config);
    let (reason, packet) = match parse::parse(&ctx) {
        Ok(packet) => (classify(&ctx, &packet, config.flags, &mut clock), Some(packet)),
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

/// The verdict for a parsed packet. TCP packets to protected ports continue in `aqd_tcp` (no return here).
#[inline(always)]
fn classify(ctx: &XdpContext, packet: &Packet, config_flags: u32, clock: &mut Clock) -> Reason {
    let src = &packet.flow.src;
    let Some(work) = CACHE_WORK.get_ptr_mut(0) else {
        return Reason::PassDefault;
    };
    let generation = POLICY_GEN.get(0).copied().unwrap_or(0);
    // One lookup answers the policy for a known source: the walk (two hash maps and a trie per list, then
    // the decisions) runs only for a new source, after a rule change or once the matched entry expired.
    let state = SOURCES.get_ptr_mut(src);
    // SAFETY: `work` and `state` are map memory from successful lookups (per-CPU for `work`).
    let policy = unsafe {
        match state {
            Some(s) if cache_valid(&(*s).policy, generation, clock) => (*s).policy,
            _ => {
                // `SourceState::NEW` is all zeros.
                mem::zero(&raw mut (*work).new_source);
                walk_policy(src, generation, &mut (*work).new_source.policy, clock);
                let policy = core::ptr::read_volatile(&(*work).new_source.policy);
                if let Some(s) = state {
                    // CPUs that race here write the same outcome.
                    (*s).policy = policy;
                }
                policy
            }
        }
    };
    let reason = Reason::from_u32(policy.reason as u32).unwrap_or(Reason::PassDefault);
    if policy.flags & policy_flag::FINAL != 0 {
        cache_only(src, state.is_none(), work, clock);
        return reason;
    }
    let rate_class = policy.rate_class as u32;
    let budget = Budget::of_flags(policy.flags);

    // Limits apply only to the protected service ports, so SSH and health checks are never limited. A TCP/UDP
    // packet whose ports cannot be read (a non-first fragment, an over-long IPv6 extension chain) counts as
    // protected: otherwise fragmenting would be a way around the limits.
    let is_protected = if packet.has_ports {
        matches!(PROTECTED_PORTS.get(packet.flow.dst_port as u32), Some(p) if *p != 0)
    } else {
        matches!(packet.flow.proto, IPPROTO_TCP | IPPROTO_UDP | PROTO_UNKNOWN)
    };
    if !is_protected {
        cache_only(src, state.is_none(), work, clock);
        return reason;
    }
    // No honest TLS client fragments TCP at the IP layer; a fragmented ClientHello or a tiny first fragment
    // would reach the server without passing flow handling.
    if packet.is_fragment
        && packet.flow.proto == IPPROTO_TCP
        && config_flags & CONFIG_FLAG_PASS_TCP_FRAGMENTS == 0
    {
        return Reason::DropTcpFragment;
    }
    if packet.flow.proto == IPPROTO_TCP && packet.tcp_full {
        if state.is_none() {
            // `aqd_tcp` finds the entry with the policy already cached.
            // SAFETY: as above.
            let _ = SOURCES.insert(src, unsafe { &(*work).new_source }, NOEXIST);
        }
        hand_off_tcp(ctx, packet, reason, rate_class, budget);
        // Only reached when the tail call failed (the table entry is missing): limits still apply below.
    }
    let is_syn = packet.flow.proto == IPPROTO_TCP && packet.tcp_syn && !packet.tcp_ack;
    let state = match state {
        Some(s) => Some(s),
        // SAFETY: as above.
        None => source_entry(src, unsafe { &(*work).new_source }),
    };
    // No entry only when the insert failed (cold path): the source passes unlimited this once.
    if let Some(s) = state
        // SAFETY: map memory from a successful lookup.
        && let Some(drop) = limit_source(ctx, unsafe { &mut *s }, src, rate_class, is_syn, budget, clock)
    {
        return drop;
    }
    reason
}

/// A source the limiter never sees (allowed, dropped, or to an unprotected port) gets a cache-only entry too,
/// so a flood of it costs one lookup per packet, at a bounded rate: a flood of random sources must not churn
/// the limiter state of others out of the LRU map. `new_source` holds the walk's outcome (no entry: it ran).
#[inline(always)]
fn cache_only(src: &AddrKey, missing: bool, work: *mut CacheWork, clock: &mut Clock) {
    // SAFETY: per-CPU map memory from a successful lookup.
    if missing && admit(unsafe { &mut *work }, clock) {
        // SAFETY: as above.
        let _ = SOURCES.insert(src, unsafe { &(*work).new_source }, NOEXIST);
    }
}

/// Whether a cached policy outcome still holds: same generation, and the entry it came from has not expired
/// (the coarse clock: an expiring entry may apply up to one tick, a few ms, longer).
#[inline(always)]
fn cache_valid(policy: &CachedPolicy, generation: u32, clock: &mut Clock) -> bool {
    policy.flags & policy_flag::VALID != 0
        && policy.generation == generation
        && (policy.expires_ns == 0 || policy.expires_ns > clock.coarse())
}

/// Whether this CPU may create another cache-only `SOURCES` entry in the current admission window.
#[inline(always)]
fn admit(window: &mut CacheWork, clock: &mut Clock) -> bool {
    let now = clock.coarse();
    if now.wrapping_sub(window.window_ns) >= ADMISSION_WINDOW_NS {
        window.window_ns = now;
        window.admitted = 0;
    }
    if window.admitted >= ADMISSION_PER_WINDOW {
        return false;
    }
    window.admitted += 1;
    true
}

/// The policy walk: management networks, allowlist, denylist (exact, then prefix), then the most specific live
/// decision (the exact address, then its /24 or /64). The outcome, written to `out`, carries the expiry of the entry that decided
/// it: map memory, whose values the verifier does not track, so the paths of the walk join again after it.
#[inline(always)]
fn walk_policy(src: &AddrKey, generation: u32, out: &mut CachedPolicy, clock: &mut Clock) {
    out.generation = generation;
    out.rate_class = 0;
    out._pad = 0;
    // Management first: a final pass, so no deny entry, decision, limit or fingerprint verdict (the TCP
    // programs are never reached) can cut the operator off.
    let list_hit = if let Some(expires) = list_hit_prefix(&MANAGEMENT, src, clock) {
        Some((Reason::PassManagement, expires))
    } else if let Some(expires) = list_hit_exact(&ALLOW_EXACT, src, clock) {
        Some((Reason::PassAllowExact, expires))
    } else if let Some(expires) = list_hit_prefix(&ALLOW_PREFIX, src, clock) {
        Some((Reason::PassAllowPrefix, expires))
    } else if let Some(expires) = list_hit_exact(&DENY_EXACT, src, clock) {
        Some((Reason::DropDenyExact, expires))
    } else if let Some(expires) = list_hit_prefix(&DENY_PREFIX, src, clock) {
        Some((Reason::DropDenyPrefix, expires))
    } else {
        None
    };
    if let Some((reason, expires)) = list_hit {
        out.reason = reason as u8;
        out.expires_ns = expires;
        out.flags = policy_flag::VALID | policy_flag::FINAL;
        return;
    }
    out.reason = Reason::PassDefault as u8;
    out.expires_ns = 0;
    out.flags = policy_flag::VALID;
    let (decision, exact) = match live_decision(&DECISION_EXACT, src, clock) {
        Some(d) => (Some(d), true),
        None => (live_decision(&DECISION_PREFIX, &src.prefix_scope(), clock), false),
    };
    let Some(decision) = decision else {
        return;
    };
    out.expires_ns = decision.expires_ns;
    match Action::from_u8(decision.action) {
        Some(Action::Block) => {
            out.flags |= policy_flag::FINAL;
            out.reason = if exact {
                Reason::DropBlockExact
            } else {
                Reason::DropBlockPrefix
            } as u8;
        }
        Some(Action::Throttle) => {
            out.rate_class = decision.rate_class;
            out.reason = Reason::PassThrottled as u8;
            out.flags |= if exact {
                policy_flag::EXACT_LIMIT
            } else {
                policy_flag::PREFIX_LIMIT
            };
        }
        Some(Action::Monitor) => out.reason = Reason::PassMonitor as u8,
        None => {}
    }
}

/// Writes what `aqd_tcp` needs into the per-CPU scratch and tail-calls it; returns only if the call failed.
#[inline(always)]
fn hand_off_tcp(ctx: &XdpContext, packet: &Packet, pass_reason: Reason, rate_class: u32, budget: Budget) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU map memory from a successful lookup; nothing else runs on this CPU meanwhile.
    unsafe {
        (*scratch).flow = packet.flow;
        (*scratch).l3_offset = packet.l3_offset;
        (*scratch).l4_offset = packet.l4_offset;
        (*scratch).pass_reason = pass_reason as u8;
        (*scratch).rate_class = rate_class as u8;
        (*scratch).ip_version = packet.ip_version;
        (*scratch).flags = budget.scratch_flags();
        PROGRAMS.tail_call(ctx, PROG_INDEX_TCP);
    }
}

/// The expiry (0 = never) of `key`'s live (unexpired) entry in an exact-address list; bumps its hit count.
#[inline(always)]
fn list_hit_exact(map: &HashMap<AddrKey, ListEntry>, key: &AddrKey, clock: &mut Clock) -> Option<u64> {
    hit_if_live(map.get_ptr_mut(key)?, clock)
}

/// The expiry of the live prefix `key` falls in, in a prefix list; bumps its hit count. The longest match wins; when it
/// has expired, the next shorter covering prefix is tried (bounded), so expiry never needs userspace's help.
#[inline(always)]
fn list_hit_prefix(map: &LpmTrie<AddrKey, ListEntry>, key: &AddrKey, clock: &mut Clock) -> Option<u64> {
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
            return None;
        }
        if let Some(expires) = hit_if_live(entry, clock) {
            return Some(expires);
        }
        // SAFETY: non-null result of a map lookup.
        let matched_len = unsafe { (*entry).prefix_len };
        if matched_len == 0 || matched_len > 128 {
            return None;
        }
        lookup_key = Key::new(matched_len - 1, *key);
    }
    None
}

/// The entry's expiry if it is live; bumps its hits (which count policy walks, not packets: a cached outcome
/// answers a source's later packets without touching the entry).
#[inline(always)]
fn hit_if_live(entry: *mut ListEntry, clock: &mut Clock) -> Option<u64> {
    // SAFETY: `entry` points into map memory returned by a successful lookup.
    let entry = unsafe { &mut *entry };
    if entry.expires_ns != 0 && entry.expires_ns <= clock.now() {
        return None;
    }
    entry.hits = entry.hits.wrapping_add(1);
    Some(entry.expires_ns)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
