//! `aqd_hello`: a segment at stream offset 0 of a verified flow (its ClientHello, or a retransmission or
//! overlap of it), or a packet of no verified flow that starts like a ClientHello (`scratch_flag::STATELESS`:
//! the verdict is enforced, nothing recorded), tail-called by `aqd_tcp`. When the segment holds a
//! whole TLS ClientHello, its kernel key (`detector_common::hello`) is computed here and looked up in
//! `HELLO_VERDICTS`, so a blocked fingerprint's ClientHello is dropped before the server ever sees it — no
//! race with the daemon. A ClientHello that continues in later segments (large post-quantum key shares) is
//! left to the daemon, which reassembles it from the capture events and sets the flow's verdict.
//!
//! The walk copies the ClientHello into the per-CPU scratch buffer (one helper call) and reads it at masked
//! offsets: every loop is bounded, every read in bounds by construction, whatever the bytes say.

use aya_ebpf::{helpers::generated::bpf_xdp_load_bytes, macros::xdp, programs::XdpContext};
use detector_common::{
    Action, CONFIG_FLAG_CAPTURE, Config, Reason, Scratch, Verdict,
    flow::{CAPTURE_BYTES, HELLO_BUF, flow_flag, hello_status, scratch_flag},
    hello::{
        EXT_ALPN, EXT_SERVER_NAME, EXT_SIGNATURE_ALGORITHMS, EXT_SUPPORTED_VERSIONS, HelloKeyParts,
        SIGALG_SEED, alpn_chars, cipher_item, extension_item, is_grease, sigalg_step, version_code,
    },
};

use crate::{
    account::account,
    capture::emit_payload,
    clock::Clock,
    limits::{LiveDecision, live_decision},
    maps::{CONFIG, DEFAULT_CONFIG, FLOWS, HELLO_VERDICTS, SCRATCH},
};

const BUF_MASK: usize = HELLO_BUF - 1;
/// Entries walked at most; a ClientHello with more is left to the daemon (real clients send ≤ ~50 ciphers
/// and ≤ ~25 extensions).
const MAX_CIPHERS: usize = 128;
const MAX_EXTENSIONS: usize = 48;
const MAX_SIGALGS: usize = 48;
const MAX_VERSIONS: usize = 16;
/// TLS record header (5) + handshake header (4).
const HEADERS: usize = 9;

#[xdp]
pub fn aqd_hello(ctx: XdpContext) -> u32 {
    let config = CONFIG.get(0).unwrap_or(&DEFAULT_CONFIG);
    let mut clock = Clock::new(config);
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Verdict::Pass.xdp_action();
    };
    // SAFETY: per-CPU map memory from a successful lookup; `aqd_tcp` filled it for this packet.
    let scratch = unsafe { &mut *scratch };
    let reason = handle(&ctx, scratch, config, &mut clock);
    account(&ctx, reason, Some(&scratch.flow), config, &mut clock);
    reason.verdict().xdp_action()
}

#[inline(always)]
fn handle(ctx: &XdpContext, scratch: &mut Scratch, config: &Config, clock: &mut Clock) -> Reason {
    let reason = Reason::from_u32(scratch.pass_reason as u32).unwrap_or(Reason::PassDefault);
    if scratch.flags & scratch_flag::STATELESS != 0 {
        // No verified flow: enforce the verdict on this packet, record nothing.
        let (status, key) = hello_key(ctx, scratch);
        if status == hello_status::KEYED
            && let Some(LiveDecision { action: verdict, .. }) = live_decision(&HELLO_VERDICTS, &key, clock)
            && verdict == Action::Block as u8
        {
            return Reason::DropHelloFingerprint;
        }
        return reason;
    }
    let Some(flow) = FLOWS.get_ptr_mut(&scratch.flow) else {
        return reason;
    };
    // SAFETY: map memory from a successful lookup.
    let flow = unsafe { &mut *flow };
    let (status, key) = hello_key(ctx, scratch);
    let first = flow.flags & flow_flag::HELLO_SEEN == 0;
    flow.flags |= flow_flag::HELLO_SEEN;
    if first {
        if status == hello_status::KEYED {
            flow.hello_key = key;
        } else if status == hello_status::SPLIT {
            flow.flags |= flow_flag::HELLO_SPLIT;
        }
    } else {
        // Offset 0 again. The server keeps the bytes it got first; a retransmission carries the same. Two
        // ClientHellos that disagree mean someone is showing the kernel one and the server another.
        let was_keyed = flow.hello_key != 0;
        let is_keyed = status == hello_status::KEYED;
        if was_keyed != is_keyed || (is_keyed && key != flow.hello_key) {
            flow.flags |= flow_flag::SUSPECT;
        }
    }
    let mut action = 0u8;
    let mut reason = reason;
    if status == hello_status::KEYED
        && let Some(LiveDecision {
            action: verdict,
            rate_class: class,
            ..
        }) = live_decision(&HELLO_VERDICTS, &key, clock)
    {
        action = verdict;
        // The stricter of this verdict and the flow's (block > throttle > monitor).
        match Action::from_u8(verdict) {
            Some(Action::Block) => {
                // Retransmissions of this ClientHello, and anything else on the flow, drop too.
                flow.action = verdict;
                reason = Reason::DropHelloFingerprint;
            }
            Some(Action::Throttle) if flow.action < verdict => {
                flow.action = verdict;
                if flow.rate_class == 0 {
                    flow.rate_class = class;
                }
            }
            _ => {}
        }
    }
    if config.flags & CONFIG_FLAG_CAPTURE != 0
        && flow.flags & flow_flag::CAPTURE_DONE == 0
        && scratch.stream_offset < CAPTURE_BYTES
    {
        emit_payload(ctx, scratch, flow, status, key, action, clock);
    }
    reason
}

#[inline(always)]
fn byte(scratch: &Scratch, i: usize) -> usize {
    scratch.hello[i & BUF_MASK] as usize
}

#[inline(always)]
fn be16(scratch: &Scratch, i: usize) -> usize {
    (byte(scratch, i) << 8) | byte(scratch, i + 1)
}

/// The kernel key of the ClientHello at the start of the segment, with a `hello_status`.
#[inline(always)]
fn hello_key(ctx: &XdpContext, scratch: &mut Scratch) -> (u8, u64) {
    let segment = scratch.payload_len as usize;
    let copy = if segment < HELLO_BUF { segment } else { HELLO_BUF };
    if copy < HEADERS {
        return (hello_status::NOT_HELLO, 0);
    }
    // 1..=HELLO_BUF in a form the verifier follows (see `options` in tcp.rs); it equals `copy`.
    let len = ((core::hint::black_box(copy as u32) - 1) & (HELLO_BUF as u32 - 1)) + 1;
    // SAFETY: `hello` is HELLO_BUF bytes of map memory and `len` ≤ HELLO_BUF; the helper checks the packet.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            scratch.payload_offset as u32,
            scratch.hello.as_mut_ptr().cast(),
            len,
        )
    };
    if rc != 0 {
        return (hello_status::UNPARSED, 0);
    }
    let s = &*scratch;
    // Record: handshake (22), TLS 1.x; handshake: ClientHello (1).
    if byte(s, 0) != 22 || byte(s, 1) != 3 || byte(s, 5) != 1 {
        return (hello_status::NOT_HELLO, 0);
    }
    let record_len = be16(s, 3);
    let message_len = (byte(s, 6) << 16) | be16(s, 7);
    // The message must fit its first record and the segment; otherwise it continues elsewhere.
    if 4 + message_len > record_len || 5 + record_len > segment {
        return (hello_status::SPLIT, 0);
    }
    let end = HEADERS + message_len;
    if end > copy {
        return (hello_status::UNPARSED, 0);
    }
    let mut parts = HelloKeyParts {
        sigalg_chain: SIGALG_SEED,
        alpn: *b"00",
        ..Default::default()
    };
    let legacy_version = be16(s, HEADERS) as u16;
    // version (2) + random (32), then the session id.
    let mut p = HEADERS + 34;
    p += 1 + byte(s, p);
    let ciphers_end = p + 2 + be16(s, p);
    p += 2;
    if ciphers_end > end {
        return (hello_status::UNPARSED, 0);
    }
    // The walk keeps its counters, cursor and the offsets it finds in scratch memory (volatile, so they are
    // really there): in registers the verifier tracks each one's range, every combination of "found or
    // not" becomes its own state, and 48 iterations exceed the million-instruction budget.
    let walk = &raw mut scratch.walk;
    let put = |i: usize, v: usize| unsafe { core::ptr::write_volatile(&raw mut (*walk)[i & 7], v as u32) };
    let get = |i: usize| unsafe { core::ptr::read_volatile(&raw const (*walk)[i & 7]) as usize };
    const CURSOR: usize = 0;
    const ALPN_AT: usize = 1;
    const SIGALGS_AT: usize = 2;
    const VERSIONS_AT: usize = 3;
    const COUNT: usize = 4;
    const SNI: usize = 5;
    // A loop's first entry and its end: re-read every iteration, so the bounds the verifier learns from one
    // iteration's comparison do not split the next iteration's state.
    const START: usize = 6;
    const END: usize = 7;
    put(ALPN_AT, 0);
    put(SIGALGS_AT, 0);
    put(VERSIONS_AT, 0);
    put(COUNT, 0);
    put(SNI, 0);
    let s = &*scratch;
    // Loops here run their full bound and guard the body instead of breaking out: every early exit would be
    // a separate path through the rest of the program for the verifier (128 of them for this loop alone).
    if ciphers_end - p > 2 * MAX_CIPHERS {
        return (hello_status::UNPARSED, 0);
    }
    put(START, p);
    put(END, ciphers_end);
    for i in 0..MAX_CIPHERS {
        let at = get(START) + 2 * i;
        if at + 2 <= get(END) {
            let v = be16(s, at) as u16;
            if !is_grease(v) {
                parts.cipher_sum = parts.cipher_sum.wrapping_add(cipher_item(v));
                put(COUNT, get(COUNT) + 1);
            }
        }
    }
    let count = get(COUNT);
    parts.cipher_count = if count > 99 { 99 } else { count as u8 };
    // Through scratch memory, so LLVM keeps `byte`'s index mask: it knows `ciphers_end` ≤ 557 from the
    // cipher-length check and drops the mask, but that check came after the sum was formed, and 6.1's verifier
    // does not carry a bound learnt on one register to another derived from it before (unbounded index).
    put(CURSOR, ciphers_end);
    p = get(CURSOR);
    // Compression methods.
    p += 1 + byte(s, p);
    put(COUNT, 0);
    if p + 2 <= end {
        let extensions_end = p + 2 + be16(s, p);
        if extensions_end > end {
            return (hello_status::UNPARSED, 0);
        }
        put(CURSOR, p + 2);
        put(END, extensions_end);
        for _ in 0..MAX_EXTENSIONS {
            let p = get(CURSOR);
            if p + 4 > get(END) {
                continue;
            }
            let kind = be16(s, p) as u16;
            let body = p + 4;
            put(CURSOR, body + be16(s, p + 2));
            if is_grease(kind) {
                continue;
            }
            put(COUNT, get(COUNT) + 1);
            match kind {
                EXT_SERVER_NAME => put(SNI, 1),
                EXT_ALPN => put(ALPN_AT, body),
                _ => {
                    parts.extension_sum = parts.extension_sum.wrapping_add(extension_item(kind));
                    if kind == EXT_SIGNATURE_ALGORITHMS {
                        put(SIGALGS_AT, body);
                    } else if kind == EXT_SUPPORTED_VERSIONS {
                        put(VERSIONS_AT, body);
                    }
                }
            }
        }
        let p = get(CURSOR);
        if p + 4 <= extensions_end || p > extensions_end {
            return (hello_status::UNPARSED, 0);
        }
    }
    let count = get(COUNT);
    parts.sni = (get(SNI) != 0) as u8;
    let alpn_at = get(ALPN_AT);
    let sigalgs_at = get(SIGALGS_AT);
    let versions_at = get(VERSIONS_AT);
    parts.extension_count = if count > 99 { 99 } else { count as u8 };

    if alpn_at != 0 {
        // protocol_name_list length (2), then the first name: length (1) and bytes.
        let first_len = byte(s, alpn_at + 2);
        if be16(s, alpn_at) >= 1 && first_len > 0 {
            let first = byte(s, alpn_at + 3) as u8;
            let last = byte(s, alpn_at + 3 + first_len - 1) as u8;
            parts.alpn = alpn_chars(first, last);
        }
    }
    if sigalgs_at != 0 {
        let list_end = sigalgs_at + 2 + be16(s, sigalgs_at);
        let first = sigalgs_at + 2;
        if list_end - first > 2 * MAX_SIGALGS {
            return (hello_status::UNPARSED, 0);
        }
        put(START, first);
        put(END, list_end);
        for i in 0..MAX_SIGALGS {
            let q = get(START) + 2 * i;
            if q + 2 <= get(END) {
                let v = be16(s, q) as u16;
                if !is_grease(v) {
                    parts.sigalg_chain = sigalg_step(parts.sigalg_chain, v);
                }
            }
        }
    }
    let mut version = 0u16;
    if versions_at != 0 {
        // A one-byte list length in a ClientHello.
        let list_end = versions_at + 1 + byte(s, versions_at);
        let first = versions_at + 1;
        if list_end - first > 2 * MAX_VERSIONS {
            return (hello_status::UNPARSED, 0);
        }
        put(START, first);
        put(END, list_end);
        for i in 0..MAX_VERSIONS {
            let q = get(START) + 2 * i;
            if q + 2 <= get(END) {
                let v = be16(s, q) as u16;
                if !is_grease(v) && v > version {
                    version = v;
                }
            }
        }
    }
    if version == 0 {
        version = legacy_version;
    }
    parts.version = version_code(version);
    (hello_status::KEYED, parts.key())
}
