//! `aqd_tcp`: TCP packets to protected ports, tail-called by `aqd_xdp` after the address rules passed them.
//!
//! ```text
//! SYN     → p0f signature (options walked in a bounded loop) → SYN_VERDICTS → source limits
//!           → connection event (unverified SYN statistics) → a HALF_OPEN entry
//! other   → FLOWS, or the ACK that completes a handshake (HALF_OPEN + the server ISN from `aqd_egress`,
//!           checksum) moves the flow there → a flow blocked by its fingerprint → DROP; throttled → its rate
//!           class → source limits → checksum, sequence numbers → request tracking (bursts of new client
//!           payload) → first client bytes to userspace (a segment at stream offset 0 goes through
//!           `aqd_hello`, which keys the ClientHello) → an accepted FIN/RST: flow end
//!         → no verified flow: under a throttle decision DROP (`DropUnverifiedThrottled`: forged packets must not
//!           spend the decision's budget); else source limits, a ClientHello verdict (stateless) — nothing
//!           recorded
//! ```
//! The packet is counted here (one reason, as in `aqd_xdp`): a tail call does not return.

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::generated::bpf_xdp_load_bytes, macros::xdp, programs::XdpContext,
};
use core::mem::size_of;
use detector_common::{
    Action, CONFIG_FLAG_CAPTURE, CONFIG_FLAG_CONN_EVENTS, CONFIG_FLAG_HANDSHAKE_ACK_ONLY,
    CONFIG_FLAG_NO_TCP_CHECKSUM, CONFIG_FLAG_REQUEST_EVENTS, Config, ConnEvent, EventKind, FlowEvent,
    FlowState, HalfOpen, PROG_INDEX_HELLO, Reason, Scratch, Verdict, capacity,
    flow::{CAPTURE_BYTES, DEFAULT_REQUEST_GAP_NS, HELLO_BUF, flow_flag, half_open_flag, scratch_flag},
    flow_counter,
    syn::{SYN_MAX_OPTIONS, ipv4_quirks, ipv6_quirks, option_kind, quirk, tcp_quirks},
};

use crate::{
    account::{account, count_event, count_flow, fill_header, wakeup_flag},
    capture::emit_payload,
    clock::Clock,
    csum::{Checksum, tcp_checksum},
    limits::{Budget, LiveDecision, live_decision, track_source},
    maps::{CONFIG, DEFAULT_CONFIG, EVENTS, FLOWS, HALF_OPEN, PROGRAMS, SCRATCH, SYN_VERDICTS},
    mem::{copy, zero},
    parse::read,
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// The TCP options area is at most 40 bytes.
const MAX_OPTION_BYTES: usize = 40;
/// Options walked at most (real stacks send 4–10); more is a `bad` quirk. Userspace applies the same limit
/// (`detector_common::syn::SYN_MAX_OPTIONS_WALKED`).
const MAX_OPTIONS_WALKED: usize = detector_common::syn::SYN_MAX_OPTIONS_WALKED;
const BUF_MASK: usize = HELLO_BUF - 1;

#[xdp]
pub fn aqd_tcp(ctx: XdpContext) -> u32 {
    let config = CONFIG.get(0).unwrap_or(&DEFAULT_CONFIG);
    let mut clock = Clock::new(config);
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Verdict::Pass.xdp_action();
    };
    // SAFETY: per-CPU map memory from a successful lookup; `aqd_xdp` filled it for this packet.
    let scratch = unsafe { &mut *scratch };
    let reason = handle(&ctx, scratch, config, &mut clock);
    account(&ctx, reason, Some(&scratch.flow), config, &mut clock);
    reason.verdict().xdp_action()
}

#[inline(always)]
fn handle(ctx: &XdpContext, scratch: &mut Scratch, config: &Config, clock: &mut Clock) -> Reason {
    let pass = Reason::from_u32(scratch.pass_reason as u32).unwrap_or(Reason::PassDefault);
    // `aqd_xdp` only hands over packets with the whole header in the frame.
    let Some(tcp) = read::<[u8; 20]>(ctx, scratch.l4_offset as usize) else {
        return pass;
    };
    if tcp[13] & (TCP_SYN | TCP_ACK) == TCP_SYN {
        syn(ctx, scratch, &tcp, pass, config, clock)
    } else {
        established(ctx, scratch, &tcp, pass, config, clock)
    }
}

/// Whose budget the source spends, as `aqd_xdp` found it: a throttle decision's (exact or prefix) or its own.
#[inline(always)]
fn budget(scratch: &Scratch) -> Budget {
    Budget::of_flags(scratch.flags)
}

/// The reason a passing packet counts under once a throttle applies (a monitor or default pass is upgraded).
#[inline(always)]
fn throttled(pass: Reason) -> Reason {
    match pass {
        Reason::PassDefault | Reason::PassMonitor => Reason::PassThrottled,
        other => other,
    }
}

#[inline(always)]
fn syn(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    tcp: &[u8; 20],
    pass: Reason,
    config: &Config,
    clock: &mut Clock,
) -> Reason {
    signature(ctx, scratch, tcp);
    let key = scratch.syn.key();
    let mut class = scratch.rate_class as u32;
    let mut reason = pass;
    let mut action = 0u8;
    if let Some(LiveDecision {
        action: verdict,
        rate_class: verdict_class,
        ..
    }) = live_decision(&SYN_VERDICTS, &key, clock)
    {
        action = verdict;
        match Action::from_u8(verdict) {
            Some(Action::Block) => reason = Reason::DropSynFingerprint,
            Some(Action::Throttle) => {
                // A throttle on the source itself keeps its own class.
                if class == 0 {
                    class = verdict_class as u32;
                }
                reason = throttled(reason);
            }
            Some(Action::Monitor) if reason == Reason::PassDefault => reason = Reason::PassMonitor,
            _ => {}
        }
    }
    if reason.verdict() == Verdict::Pass
        && let Some(drop) = track_source(ctx, &scratch.flow.src, class, true, budget(scratch), clock)
    {
        reason = drop;
    }
    let isn = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let dropped = reason.verdict() == Verdict::Drop;
    if config.flags & CONFIG_FLAG_CONN_EVENTS != 0 {
        emit_conn(ctx, scratch, key, action, dropped, isn, clock);
    }
    if !dropped {
        remember_syn(scratch, key, isn, action, class, clock);
    }
    reason
}

/// Records the SYN in `HALF_OPEN`, unless the tuple has an entry already: a SYN never overwrites one (a
/// retransmission changes nothing; a second SYN with another ISN must not replace what the server's SYN-ACK
/// taught `aqd_egress`). A SYN never touches `FLOWS`: a SYN on a tracked connection is answered by the
/// server with a challenge ACK (RFC 5961 §4), not a new connection.
#[inline(always)]
fn remember_syn(scratch: &mut Scratch, key: u64, isn: u32, action: u8, class: u32, clock: &mut Clock) {
    let throttle = action == Action::Throttle as u8;
    let entry = &mut scratch.new_half_open;
    *entry = HalfOpen::default();
    entry.syn_key = key;
    entry.first_seen_ns = clock.coarse();
    entry.client_isn = isn;
    if throttle {
        entry.action = action;
        entry.rate_class = class as u8;
    }
    if HALF_OPEN
        .insert(&scratch.flow, &scratch.new_half_open, BPF_NOEXIST as u64)
        .is_ok()
    {
        count_flow(flow_counter::HALF_OPEN);
    }
}

/// Fills `scratch.syn` from the SYN's IP and TCP headers. The userspace twin is
/// `detector-user/src/fingerprint/syn.rs` (offline pcaps); both must read a SYN the same way.
#[inline(always)]
fn signature(ctx: &XdpContext, scratch: &mut Scratch, tcp: &[u8; 20]) {
    let l3 = scratch.l3_offset as usize;
    let l4 = scratch.l4_offset as usize;
    let frame_len = ctx.data_end() - ctx.data();
    let sig = &mut scratch.syn;
    // SAFETY: scratch memory; an all-zero signature is `SynSignature::default()`.
    unsafe { zero(sig) };
    let ip_end = if scratch.ip_version == 4 {
        let Some(h) = read::<[u8; 20]>(ctx, l3) else {
            return;
        };
        sig.ip_version = 4;
        sig.ttl = h[8];
        sig.ip_opts_len = ((h[0] & 0x0f) * 4).saturating_sub(20);
        sig.quirks |= ipv4_quirks(&h);
        l3 + u16::from_be_bytes([h[2], h[3]]) as usize
    } else {
        let Some(h) = read::<[u8; 8]>(ctx, l3) else {
            return;
        };
        sig.ip_version = 6;
        sig.ttl = h[7];
        sig.quirks |= ipv6_quirks(&h);
        l3 + 40 + u16::from_be_bytes([h[4], h[5]]) as usize
    };
    let ip_end = if ip_end < frame_len { ip_end } else { frame_len };

    sig.window = u16::from_be_bytes([tcp[14], tcp[15]]);
    sig.quirks |= tcp_quirks(tcp);
    let data_offset = (tcp[12] >> 4) as usize * 4;
    let header_len = if data_offset < 20 { 20 } else { data_offset };
    if ip_end > l4 + header_len {
        sig.payload = 1;
    }
    options(ctx, scratch, l4, header_len, frame_len);
}

/// Walks the TCP options into `scratch.syn`: copied into the scratch buffer first (one helper call), so the
/// walk reads map memory at masked offsets instead of bounds-checking packet reads at variable offsets.
#[inline(always)]
fn options(ctx: &XdpContext, scratch: &mut Scratch, l4: usize, header_len: usize, frame_len: usize) {
    let options_end = header_len - 20;
    if options_end == 0 {
        return;
    }
    // Bytes of the options area actually in the frame; reading past them is a `bad` quirk, as in userspace.
    let start = l4 + 20;
    let present = frame_len.saturating_sub(start);
    let avail = if present < options_end {
        present
    } else {
        options_end
    };
    if avail > 0 && avail <= MAX_OPTION_BYTES {
        // Written so the verifier sees a length in 1..=64 (LLVM folds a plain `avail` check into a form it
        // cannot follow, and without `black_box` folds this back to `avail`); `avail` is 1..=40, so it is.
        let len = ((core::hint::black_box(avail as u32) - 1) & 0x3f) + 1;
        // SAFETY: `hello` is map memory of HELLO_BUF ≥ 64 bytes; the helper bounds-checks the packet side.
        let rc = unsafe { bpf_xdp_load_bytes(ctx.ctx, start as u32, scratch.hello.as_mut_ptr().cast(), len) };
        if rc != 0 {
            scratch.syn.quirks |= quirk::BAD;
            return;
        }
    }
    // As in hello.rs: the walk's cursor, bounds and results live in scratch memory (volatile), not registers,
    // and the loop guards its body instead of breaking out. In registers, every path through an iteration
    // (each option kind, each malformation) carried its own bounds into the next one and the walk alone cost
    // the verifier 220,000 instructions; this way iterations' states coincide and are pruned.
    const CURSOR: usize = 0;
    const END: usize = 1;
    const AVAIL: usize = 2;
    const DONE: usize = 3;
    const EOL_AT: usize = 4;
    const AT: usize = 5;
    let walk = &raw mut scratch.walk;
    let put =
        move |i: usize, v: usize| unsafe { core::ptr::write_volatile(&raw mut (*walk)[i & 7], v as u32) };
    let get = |i: usize| unsafe { core::ptr::read_volatile(&raw const (*walk)[i & 7]) as usize };
    let sig = &raw mut scratch.syn;
    let add_quirk = move |bits: u32| unsafe {
        let q = core::ptr::read_volatile(&raw const (*sig).quirks);
        core::ptr::write_volatile(&raw mut (*sig).quirks, q | bits);
    };
    let buf = &raw const scratch.hello;
    let byte = |i: usize| unsafe { core::ptr::read_volatile(&raw const (*buf)[i & BUF_MASK]) };
    put(CURSOR, 0);
    put(END, options_end);
    put(AVAIL, avail);
    put(DONE, 0);
    put(EOL_AT, usize::MAX);
    for _ in 0..MAX_OPTIONS_WALKED {
        let o = get(CURSOR);
        if get(DONE) != 0 || o >= get(END) {
            continue;
        }
        if o >= get(AVAIL) {
            add_quirk(quirk::BAD);
            put(DONE, 1);
            continue;
        }
        let kind = byte(o);
        // SAFETY: `sig` points into this CPU's scratch map value.
        unsafe {
            let count = core::ptr::read_volatile(&raw const (*sig).option_count) as usize;
            if count < SYN_MAX_OPTIONS {
                core::ptr::write_volatile(&raw mut (*sig).options[count & (SYN_MAX_OPTIONS - 1)], kind);
                core::ptr::write_volatile(&raw mut (*sig).option_count, count as u8 + 1);
            }
        }
        if kind == option_kind::EOL {
            put(EOL_AT, o);
            put(DONE, 1);
            continue;
        }
        if kind == option_kind::NOP {
            put(CURSOR, o + 1);
            continue;
        }
        let avail = get(AVAIL);
        if o + 1 >= avail {
            add_quirk(quirk::BAD);
            put(DONE, 1);
            continue;
        }
        let len = byte(o + 1) as usize;
        if len < 2 || o + len > get(END) {
            add_quirk(quirk::BAD);
            put(DONE, 1);
            continue;
        }
        put(CURSOR, o + len);
        // SAFETY: as above.
        match (kind, len) {
            (option_kind::MSS, 4) => {
                if o + 3 < avail {
                    let mss = u16::from_be_bytes([byte(o + 2), byte(o + 3)]);
                    unsafe { core::ptr::write_volatile(&raw mut (*sig).mss, mss) };
                }
            }
            (option_kind::WS, 3) => {
                if o + 2 < avail {
                    let v = byte(o + 2);
                    unsafe { core::ptr::write_volatile(&raw mut (*sig).wscale, v) };
                    if v > 14 {
                        add_quirk(quirk::EXWS);
                    }
                }
            }
            (option_kind::TIMESTAMP, 10) => {
                if o + 10 <= avail {
                    if byte(o + 2) | byte(o + 3) | byte(o + 4) | byte(o + 5) == 0 {
                        add_quirk(quirk::TS1_MINUS);
                    }
                    if byte(o + 6) | byte(o + 7) | byte(o + 8) | byte(o + 9) != 0 {
                        add_quirk(quirk::TS2_PLUS);
                    }
                }
            }
            (option_kind::MSS | option_kind::WS | option_kind::TIMESTAMP, _) => add_quirk(quirk::BAD),
            _ => {}
        }
    }
    if get(DONE) == 0 && get(CURSOR) < get(END) {
        // More options than any real stack sends (NOP padding): stop, as userspace does.
        add_quirk(quirk::BAD);
    }
    let eol_at = get(EOL_AT);
    let avail = get(AVAIL);
    if eol_at < options_end {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&raw mut (*sig).eol_pad, (options_end - eol_at - 1) as u8) };
        for i in 1..MAX_OPTION_BYTES {
            let at = eol_at + i;
            if at < options_end && at < avail {
                // Through scratch memory, so LLVM keeps `byte`'s index mask (it drops it as `at < options_end`
                // bounds it, but 6.1's verifier learns no bound from comparing two registers: unbounded read).
                put(AT, at);
                if byte(get(AT)) != 0 {
                    add_quirk(quirk::OPT_PLUS);
                }
            }
        }
    }
}

/// A packet that is not a SYN: of a verified flow, one completing a handshake, or of no known flow.
#[inline(always)]
fn established(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    tcp: &[u8; 20],
    pass: Reason,
    config: &Config,
    clock: &mut Clock,
) -> Reason {
    let ip_end = ip_end(ctx, scratch);
    let mut checksum = CachedChecksum::new(config);
    let mut flow = FLOWS.get_ptr_mut(&scratch.flow);
    let mut established_now = false;
    if flow.is_none() {
        match complete_handshake(ctx, scratch, tcp, ip_end, config, &mut checksum, clock) {
            Handshake::Completed => {
                flow = FLOWS.get_ptr_mut(&scratch.flow);
                established_now = true;
            }
            Handshake::BadChecksum => return anomaly(pass, Reason::PassBadChecksum),
            Handshake::None => {}
        }
    }
    let Some(f) = flow else {
        return unverified(ctx, scratch, tcp, ip_end, pass, clock);
    };
    // SAFETY: map memory from a successful lookup.
    let f = unsafe { &mut *f };
    let mut class = scratch.rate_class as u32;
    let mut reason = pass;
    match Action::from_u8(f.action) {
        Some(Action::Block) => return Reason::DropFlowFingerprint,
        Some(Action::Throttle) => {
            if class == 0 {
                class = f.rate_class as u32;
            }
            reason = throttled(reason);
        }
        _ => {}
    }
    if let Some(drop) = track_source(ctx, &scratch.flow.src, class, false, budget(scratch), clock) {
        return drop;
    }
    track_flow(
        ctx,
        scratch,
        f,
        tcp,
        ip_end,
        reason,
        established_now,
        config,
        &mut checksum,
        clock,
    )
}

/// How the packet fared as the possible end of a handshake.
enum Handshake {
    /// Not the end of a known handshake (no half-open entry, or the numbers do not match).
    None,
    /// The right numbers with a wrong checksum.
    BadChecksum,
    /// The flow is now in `FLOWS`.
    Completed,
}

/// The client's ACK that completes a handshake moves the flow from `HALF_OPEN` into `FLOWS`: its sequence
/// number follows the SYN's ISN and it acknowledges the server's ISN, which a forged source never sees
/// (with `CONFIG_FLAG_HANDSHAKE_ACK_ONLY` the server's ISN is not required), and its checksum is valid.
#[inline(always)]
fn complete_handshake(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    tcp: &[u8; 20],
    ip_end: usize,
    config: &Config,
    checksum: &mut CachedChecksum,
    clock: &mut Clock,
) -> Handshake {
    let Some(half_open) = HALF_OPEN.get_ptr_mut(&scratch.flow) else {
        return Handshake::None;
    };
    // SAFETY: map memory from a successful lookup; read before the entry is removed below.
    let half_open = unsafe { &*half_open };
    let flags = tcp[13];
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let server_isn_ok = if config.flags & CONFIG_FLAG_HANDSHAKE_ACK_ONLY != 0 {
        true
    } else {
        half_open.flags & half_open_flag::SERVER_ISN != 0 && ack == half_open.server_isn.wrapping_add(1)
    };
    if flags & (TCP_ACK | TCP_RST) != TCP_ACK || seq != half_open.client_isn.wrapping_add(1) || !server_isn_ok
    {
        count_flow(flow_counter::HANDSHAKE_FAILED);
        return Handshake::None;
    }
    if checksum.get(ctx, scratch, ip_end) != Checksum::Valid {
        count_flow(flow_counter::HANDSHAKE_FAILED);
        return Handshake::BadChecksum;
    }
    let now = clock.coarse();
    let throttle = half_open.action == Action::Throttle as u8;
    let state = &mut scratch.new_flow;
    // SAFETY: scratch memory; an all-zero flow state is `FlowState::default()`.
    unsafe { zero(state) };
    state.syn_key = half_open.syn_key;
    state.isn = half_open.client_isn;
    state.first_seen_ns = if half_open.first_seen_ns != 0 {
        half_open.first_seen_ns
    } else {
        now
    };
    state.last_seen_ns = now;
    state.ack_base = ack;
    state.last_ack = ack;
    state.ack_at_last_request = ack;
    state.next_seq = seq;
    state.flags = flow_flag::ACK_SEEN;
    if throttle {
        state.action = half_open.action;
        state.rate_class = half_open.rate_class;
    }
    // An LRU map evicts rather than fails; only verified flows get here, at the rate of real handshakes.
    if FLOWS.insert(&scratch.flow, &scratch.new_flow, 0).is_err() {
        return Handshake::None;
    }
    let _ = HALF_OPEN.remove(&scratch.flow);
    count_flow(flow_counter::ESTABLISHED);
    Handshake::Completed
}

/// A packet of no verified flow: the source's limits and a ClientHello verdict still apply (a blocked
/// fingerprint is dropped whether or not its handshake was seen), but nothing is recorded. Under a throttle
/// decision it is dropped instead: anyone can forge it, and charged it would let a spoofer inside a throttled
/// /24 spend the budget its honest users share (see `limits::Budget`). The price: a connection whose flow the
/// kernel lost (evicted, aged out while idle) stalls while its source is throttled.
#[inline(always)]
fn unverified(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    tcp: &[u8; 20],
    ip_end: usize,
    pass: Reason,
    clock: &mut Clock,
) -> Reason {
    let budget = budget(scratch);
    if budget.is_decision() {
        return Reason::DropUnverifiedThrottled;
    }
    let class = scratch.rate_class as u32;
    if let Some(drop) = track_source(ctx, &scratch.flow.src, class, false, budget, clock) {
        return drop;
    }
    count_flow(flow_counter::UNVERIFIED);
    let reason = pass;
    let payload_offset = payload_offset(scratch, tcp);
    // Record header: handshake (22), TLS 1.x; handshake message: ClientHello (1).
    if let Some(head) = read::<[u8; 6]>(ctx, payload_offset)
        && head[0] == 22
        && head[1] == 3
        && head[5] == 1
    {
        let payload_len = ip_end.saturating_sub(payload_offset);
        scratch.payload_offset = payload_offset as u16;
        scratch.payload_len = if payload_len > 0xffff {
            0xffff
        } else {
            payload_len as u16
        };
        scratch.stream_offset = 0;
        scratch.flags = scratch_flag::STATELESS;
        scratch.pass_reason = reason as u8;
        // SAFETY: a tail call with this program's context.
        unsafe { PROGRAMS.tail_call(ctx, PROG_INDEX_HELLO) };
    }
    reason
}

/// The reason for a packet that changes nothing because of what it is (bad checksum, ignored close): it
/// replaces a plain or decision pass, so the anomaly is counted.
#[inline(always)]
fn anomaly(pass: Reason, anomaly: Reason) -> Reason {
    if pass.verdict() == Verdict::Pass {
        anomaly
    } else {
        pass
    }
}

/// The TCP checksum of the packet, computed at most once and only when needed.
struct CachedChecksum {
    result: Option<Checksum>,
}

impl CachedChecksum {
    #[inline(always)]
    fn new(config: &Config) -> Self {
        let off = config.flags & CONFIG_FLAG_NO_TCP_CHECKSUM != 0;
        Self {
            result: if off { Some(Checksum::Valid) } else { None },
        }
    }

    #[inline(always)]
    fn get(&mut self, ctx: &XdpContext, scratch: &mut Scratch, ip_end: usize) -> Checksum {
        match self.result {
            Some(c) => c,
            None => {
                let c = tcp_checksum(ctx, scratch, ip_end);
                self.result = Some(c);
                c
            }
        }
    }
}

#[inline(always)]
fn payload_offset(scratch: &Scratch, tcp: &[u8; 20]) -> usize {
    let data_offset = (tcp[12] >> 4) as usize * 4;
    scratch.l4_offset as usize + if data_offset < 20 { 20 } else { data_offset }
}

/// Sequence numbers, requests, capture and the end of a verified flow. May tail-call `aqd_hello` (then it
/// does not return).
///
/// Every segment that gets here has its checksum verified (one longer than `CHECKSUM_MAX_BYTES` only counts
/// as data). Only new in-order client data advances `next_seq` and counts towards requests: retransmissions
/// and segments past a gap (which the server holds back or drops) do not. An RST ends the flow only with
/// exactly the expected sequence number, a FIN only in sequence (RFC 5961: anything else in the window gets a
/// challenge ACK from the server, out of the window it is dropped); other FIN/RSTs are `PassCloseIgnored`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn track_flow(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    f: &mut FlowState,
    tcp: &[u8; 20],
    ip_end: usize,
    reason: Reason,
    established_now: bool,
    config: &Config,
    checksum: &mut CachedChecksum,
    clock: &mut Clock,
) -> Reason {
    let flags = tcp[13];
    let payload_offset = payload_offset(scratch, tcp);
    let payload_len = ip_end.saturating_sub(payload_offset);
    let closes = flags & (TCP_FIN | TCP_RST) != 0;
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    match checksum.get(ctx, scratch, ip_end) {
        Checksum::Valid => {}
        // Too long to check (jumbo frames): data counts, nothing that closes the flow.
        Checksum::TooLong if !closes => {}
        _ => return anomaly(reason, Reason::PassBadChecksum),
    }
    // Where the segment starts relative to the next expected byte (wrapping arithmetic, RFC 793 style).
    let rel = seq.wrapping_sub(f.next_seq) as i32;
    if closes && rel != 0 {
        return anomaly(reason, Reason::PassCloseIgnored);
    }
    if f.flags & flow_flag::FIN_SEEN != 0 {
        // The server discards client data after its FIN; the verdict (checked before) still applies.
        if flags & TCP_RST != 0 {
            let _ = FLOWS.remove(&scratch.flow);
            count_flow(flow_counter::RESET);
        }
        return reason;
    }
    f.last_seen_ns = clock.coarse();
    let mut ack_advanced = false;
    if flags & TCP_ACK != 0 {
        let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
        if (ack.wrapping_sub(f.last_ack) as i32) > 0 {
            f.last_ack = ack;
            ack_advanced = true;
        }
    }
    // New in-order bytes: the segment starts at or before `next_seq` and ends after it.
    let new_bytes = if payload_len > 0 && rel <= 0 && (rel as i64 + payload_len as i64) > 0 {
        (rel as i64 + payload_len as i64) as u32
    } else {
        0
    };
    let requests_on = config.flags & CONFIG_FLAG_REQUEST_EVENTS != 0;
    let events_on = requests_on || config.flags & CONFIG_FLAG_CONN_EVENTS != 0;

    // At most one flow event per packet, from one call site (each inlined emitter costs verifier time): the
    // handshake just completed; or the open request ends because new data arrives after an idle gap (before
    // that data joins a new one), the client acknowledges new server data (the response has started), or the
    // flow ends.
    let mut event = None;
    if established_now {
        if events_on {
            event = Some(EventKind::Established);
        }
    } else if requests_on && f.burst_packets != 0 {
        let idle = new_bytes > 0 && {
            let gap = if config.request_gap_ns != 0 {
                config.request_gap_ns
            } else {
                DEFAULT_REQUEST_GAP_NS
            };
            clock.now().saturating_sub(f.burst_last_ns) > gap
        };
        if idle || (new_bytes == 0 && (ack_advanced || closes)) {
            event = Some(EventKind::Request);
        }
    }
    if let Some(kind) = event {
        emit_flow_event(ctx, scratch, f, kind, clock);
    }
    if new_bytes > 0 {
        f.next_seq = f.next_seq.wrapping_add(new_bytes);
        f.client_bytes += new_bytes as u64;
        if requests_on {
            let now = clock.now();
            if f.burst_packets == 0 {
                f.burst_start_ns = now;
            }
            f.burst_bytes += new_bytes;
            f.burst_packets += 1;
            f.burst_last_ns = now;
        }
    }
    if closes {
        // A FIN carrying payload leaves that last request open; the flow-end totals include its bytes.
        if requests_on {
            emit_flow_event(ctx, scratch, f, EventKind::FlowEnd, clock);
        }
        if flags & TCP_RST != 0 {
            let _ = FLOWS.remove(&scratch.flow);
            count_flow(flow_counter::RESET);
            return reason;
        }
        f.next_seq = f.next_seq.wrapping_add(1);
        f.flags |= flow_flag::FIN_SEEN;
        count_flow(flow_counter::FIN);
    }

    if payload_len > 0 {
        let stream_offset = seq.wrapping_sub(f.isn).wrapping_sub(1);
        scratch.payload_offset = payload_offset as u16;
        scratch.payload_len = if payload_len > 0xffff {
            0xffff
        } else {
            payload_len as u16
        };
        scratch.stream_offset = stream_offset;
        if stream_offset == 0 {
            // The first ClientHello, or a segment at offset 0 again (a retransmission, or an overlap that
            // may disagree): `aqd_hello` keys it and compares (see there).
            scratch.pass_reason = reason as u8;
            // SAFETY: a tail call with this program's context.
            unsafe { PROGRAMS.tail_call(ctx, PROG_INDEX_HELLO) };
            // The table entry is missing: capture without the kernel key.
        }
        if config.flags & CONFIG_FLAG_CAPTURE != 0
            && f.flags & flow_flag::CAPTURE_DONE == 0
            && stream_offset < CAPTURE_BYTES
        {
            emit_payload(ctx, scratch, f, 0, 0, 0, clock);
        }
    }
    reason
}

/// End of the IP packet in the frame (the IP length, so Ethernet padding never counts as payload).
#[inline(always)]
fn ip_end(ctx: &XdpContext, scratch: &Scratch) -> usize {
    let l3 = scratch.l3_offset as usize;
    let frame_len = ctx.data_end() - ctx.data();
    let end = if scratch.ip_version == 4 {
        match read::<[u8; 4]>(ctx, l3) {
            Some(h) => l3 + u16::from_be_bytes([h[2], h[3]]) as usize,
            None => frame_len,
        }
    } else {
        match read::<[u8; 6]>(ctx, l3) {
            Some(h) => l3 + 40 + u16::from_be_bytes([h[4], h[5]]) as usize,
            None => frame_len,
        }
    };
    if end < frame_len { end } else { frame_len }
}

#[inline(always)]
fn emit_conn(
    ctx: &XdpContext,
    scratch: &Scratch,
    key: u64,
    action: u8,
    dropped: bool,
    isn: u32,
    clock: &mut Clock,
) {
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
                (*event).flow = scratch.flow;
                copy(&raw mut (*event).syn, &scratch.syn);
                (*event).syn_key = key;
                (*event).action = action;
                (*event).dropped = dropped as u8;
                (*event)._pad = [0; 2];
                (*event).isn = isn;
            }
            slot.submit(wakeup_flag());
            true
        }
        None => false,
    };
    count_event(EventKind::Conn, sent, false);
}

/// A request (the burst being tracked, which it resets) or the flow's end. Shed — not sent, counted — while
/// the ring buffer is more than half full: these are the events the model can best do without.
#[inline(always)]
fn emit_flow_event(
    ctx: &XdpContext,
    scratch: &Scratch,
    f: &mut FlowState,
    kind: EventKind,
    clock: &mut Clock,
) {
    let is_request = kind == EventKind::Request;
    let response = f.last_ack.wrapping_sub(if is_request {
        f.ack_at_last_request
    } else {
        f.ack_base
    });
    let (start, end, bytes, packets) = if is_request {
        (
            f.burst_start_ns,
            f.burst_last_ns,
            f.burst_bytes as u64,
            f.burst_packets,
        )
    } else {
        (f.first_seen_ns, f.last_seen_ns, f.client_bytes, 0)
    };
    if is_request {
        f.requests += 1;
        f.ack_at_last_request = f.last_ack;
        f.burst_bytes = 0;
        f.burst_packets = 0;
    }
    if EVENTS.query(aya_ebpf::bindings::BPF_RB_AVAIL_DATA as u64) > (capacity::EVENTS_BYTES / 2) as u64 {
        count_event(kind, false, true);
        return;
    }
    let sent = match EVENTS.reserve::<FlowEvent>(0) {
        Some(mut slot) => {
            let event = slot.as_mut_ptr();
            // SAFETY: `event` is the reserved, exclusively owned ring-buffer slot of a FlowEvent's size.
            unsafe {
                fill_header(&raw mut (*event).header, ctx, kind, size_of::<FlowEvent>(), clock);
                (*event).flow = scratch.flow;
                (*event).syn_key = f.syn_key;
                (*event).hello_key = f.hello_key;
                (*event).start_ns = start;
                (*event).end_ns = end;
                (*event).bytes = bytes;
                (*event).response_bytes = response as u64;
                (*event).packets = packets;
                (*event).requests = f.requests;
            }
            slot.submit(wakeup_flag());
            true
        }
        None => false,
    };
    count_event(kind, sent, false);
}
