//! The TCP checksum of a segment, for the segments that change flow state or get keyed: a bad-checksum
//! segment is dropped by the server's stack, so acting on it would let a client show the kernel one thing
//! (a decoy ClientHello, a reset) while the server sees another.
//!
//! The segment is copied into the per-CPU scratch buffer (one helper call, bounds checked by the helper) and
//! summed there with `bpf_csum_diff` in ≤ 512-byte pieces (the helper's limit); the pseudo-header is added by
//! hand. No crate does this for BPF; it is the RFC 1071 sum.

use aya_ebpf::{
    helpers::generated::{bpf_csum_diff, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use detector_common::{Scratch, flow::CHECKSUM_MAX_BYTES};

/// `bpf_csum_diff` sums at most this many bytes per call.
const PIECE: usize = 512;
const PIECES: usize = CHECKSUM_MAX_BYTES / PIECE;
const IPPROTO_TCP: u64 = 6;

/// What the checksum check found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    Valid,
    Invalid,
    /// Longer than [`CHECKSUM_MAX_BYTES`]: not checked.
    TooLong,
}

/// Checks the TCP checksum of the segment at `l4..ip_end` of the frame (addresses from `scratch.flow`).
/// Uses `scratch.hello` as its buffer.
#[inline(always)]
pub fn tcp_checksum(ctx: &XdpContext, scratch: &mut Scratch, ip_end: usize) -> Checksum {
    let l4 = scratch.l4_offset as usize;
    let tcp_len = ip_end.saturating_sub(l4);
    if tcp_len < 20 {
        return Checksum::Invalid;
    }
    if tcp_len > CHECKSUM_MAX_BYTES {
        return Checksum::TooLong;
    }
    // 1..=CHECKSUM_MAX_BYTES in a form the verifier follows (see `options` in tcp.rs); it equals `tcp_len`.
    let len = ((core::hint::black_box(tcp_len as u32) - 1) & (CHECKSUM_MAX_BYTES as u32 - 1)) + 1;
    let buf = scratch.hello.as_mut_ptr();
    // SAFETY: `hello` is HELLO_BUF + 8 bytes of map memory and `len` ≤ HELLO_BUF; the helper checks the packet.
    if unsafe { bpf_xdp_load_bytes(ctx.ctx, l4 as u32, buf.cast(), len) } != 0 {
        return Checksum::Invalid;
    }
    // Zero the bytes up to the next multiple of 4 (the buffer has 8 bytes of slack past HELLO_BUF).
    for i in 0..3 {
        if let Some(byte) = scratch.hello.get_mut(len as usize + i) {
            *byte = 0;
        }
    }
    let rounded = (len as usize + 3) & !3;
    let mut sum: u64 = pseudo_header(scratch, tcp_len);
    for piece in 0..PIECES {
        let start = piece * PIECE;
        if start < rounded {
            let rest = rounded - start;
            let size = if rest < PIECE { rest } else { PIECE };
            // 4..=512 and a multiple of 4, visibly so for the verifier; equals `size`.
            let size = ((core::hint::black_box(size as u32) - 4) & (PIECE as u32 - 4)) + 4;
            // SAFETY: `start + size` ≤ CHECKSUM_MAX_BYTES ≤ the buffer's length; a null `from` of size 0 is
            // the helper's documented way to sum `to` alone.
            let part = unsafe {
                bpf_csum_diff(
                    core::ptr::null_mut(),
                    0,
                    scratch.hello.as_mut_ptr().add(start).cast(),
                    size,
                    0,
                )
            };
            if part < 0 {
                return Checksum::Invalid;
            }
            sum += part as u32 as u64;
        }
    }
    if fold(sum) == 0xffff {
        Checksum::Valid
    } else {
        Checksum::Invalid
    }
}

/// The pseudo-header's 16-bit words (addresses, protocol, TCP length), summed in memory order like
/// `bpf_csum_diff` sums. An IPv4 address is the last 4 bytes of its mapped key; the mapping's 0x0000 and
/// 0xffff words leave a ones'-complement sum unchanged, so both families sum all 16 bytes.
#[inline(always)]
fn pseudo_header(scratch: &Scratch, tcp_len: usize) -> u64 {
    let mut sum = 0u64;
    for addr in [&scratch.flow.src.addr, &scratch.flow.dst.addr] {
        for i in 0..8 {
            sum += u16::from_ne_bytes([addr[2 * i], addr[2 * i + 1]]) as u64;
        }
    }
    sum += u16::from_ne_bytes([0, IPPROTO_TCP as u8]) as u64;
    sum += u16::from_ne_bytes([(tcp_len >> 8) as u8, tcp_len as u8]) as u64;
    sum
}

/// Folds a sum of 16-bit words with end-around carries.
#[inline(always)]
fn fold(mut sum: u64) -> u64 {
    for _ in 0..4 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}
