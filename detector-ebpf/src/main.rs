//! aqd's XDP program: one pass per packet, from the wire to a verdict.
//!
//! ```text
//! parse (Ethernet, ≤2 VLAN tags, IPv4 / IPv6 + ext headers, TCP / UDP)
//!   → allowlist (exact, prefix)            → PASS
//!   → denylist (exact, prefix)             → DROP
//!   → decision (exact, then /24 or /64)    → block: DROP · throttle: rate class · monitor: count
//!   → protected port? per-source state: counters + token buckets (GCRA) → over the limit: DROP
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
    Action, AddrKey, CONFIG_FLAG_PASS_TCP_FRAGMENTS, ListEntry, MAX_EXPIRED_PREFIX_STEPS, PROG_INDEX_TCP,
    Reason, Verdict,
};

use account::account;
use clock::Clock;
use limits::{live_decision, track_source};
use maps::{
    ALLOW_EXACT, ALLOW_PREFIX, CONFIG, DECISION_EXACT, DECISION_PREFIX, DEFAULT_CONFIG, DENY_EXACT,
    DENY_PREFIX, PROGRAMS, PROTECTED_PORTS, SCRATCH,
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
    // No honest TLS client fragments TCP at the IP layer; a fragmented ClientHello or a tiny first fragment
    // would reach the server without passing flow handling.
    if packet.is_fragment
        && packet.flow.proto == IPPROTO_TCP
        && config_flags & CONFIG_FLAG_PASS_TCP_FRAGMENTS == 0
    {
        return Reason::DropTcpFragment;
    }
    if packet.flow.proto == IPPROTO_TCP && packet.tcp_full {
        hand_off_tcp(ctx, packet, pass_reason, rate_class);
        // Only reached when the tail call failed (the table entry is missing): limits still apply below.
    }
    let is_syn = packet.flow.proto == IPPROTO_TCP && packet.tcp_syn && !packet.tcp_ack;
    if let Some(drop) = track_source(ctx, src, rate_class, is_syn, clock) {
        return drop;
    }
    pass_reason
}

/// Writes what `aqd_tcp` needs into the per-CPU scratch and tail-calls it; returns only if the call failed.
#[inline(always)]
fn hand_off_tcp(ctx: &XdpContext, packet: &Packet, pass_reason: Reason, rate_class: u32) {
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
        (*scratch).flags = 0;
        PROGRAMS.tail_call(ctx, PROG_INDEX_TCP);
    }
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
