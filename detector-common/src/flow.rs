//! Per-flow state for TCP connections to protected ports, and the hand-off between the XDP programs.
//!
//! A connection lives in two maps, so that nobody can forge or erase what the kernel observes:
//! - its SYN makes a [`HalfOpen`] entry (`HALF_OPEN`, LRU): the client's ISN and SYN signature key. The TC egress
//!   program (`aqd_egress`) adds the server's ISN when the server's SYN-ACK leaves the host;
//! - the client's ACK that acknowledges that ISN (with the right sequence number and a valid TCP checksum)
//!   completes the handshake: the flow moves into `FLOWS` (LRU, [`FlowState`]). Only such *verified* flows are
//!   keyed, captured and produce request events, and a spoofed SYN flood churns `HALF_OPEN` only, never `FLOWS`.
//!
//! A tracked flow follows the client's next sequence number: it ends only on an RST whose sequence number is
//! exactly the expected one (what the server accepts, RFC 5961 §3.2) or is marked closed by an in-sequence FIN;
//! anything else is counted and ignored. `FlowState` carries what the kernel needs to act on the flow's
//! fingerprints (the verdict found for the ClientHello), what it needs to capture the first client bytes once
//! (sequence numbers), and the request tracker: a burst of new client payload after an idle gap is one
//! request.

use crate::{FlowTuple, SynSignature};

/// Client payload bytes (from the first byte after the SYN) handed to userspace per flow: enough for a
/// ClientHello split over segments by large post-quantum key shares.
pub const CAPTURE_BYTES: u32 = 4096;
/// Most capture events per flow (a retransmission or tiny segments must not turn into an event stream).
pub const CAPTURE_MAX_EVENTS: u8 = 6;
/// Payload bytes carried by one capture event; a longer segment is cut (its `segment_len` says so).
/// A power of two: the kernel bounds its copy length by masking.
pub const CAPTURE_CHUNK: usize = 2048;
/// Bytes of the per-CPU buffer the ClientHello is copied into for parsing (a power of two: offsets are masked).
pub const HELLO_BUF: usize = 2048;
/// Default idle gap that separates two requests on one flow.
pub const DEFAULT_REQUEST_GAP_NS: u64 = 50_000_000;
/// The longest TCP segment (header + payload) whose checksum the kernel verifies: it is copied into the
/// per-CPU buffer first. Longer segments (jumbo frames, not seen at a 1500-byte MTU) count as data unverified;
/// they never end a flow or complete a handshake.
pub const CHECKSUM_MAX_BYTES: usize = HELLO_BUF;

/// `FlowState::flags` bits.
pub mod flow_flag {
    /// The first client payload segment has been seen (and the ClientHello key tried on it).
    pub const HELLO_SEEN: u8 = 1 << 0;
    /// The ClientHello continues past the first segment: the kernel could not key it; the daemon decides.
    pub const HELLO_SPLIT: u8 = 1 << 1;
    /// The capture budget is used up.
    pub const CAPTURE_DONE: u8 = 1 << 2;
    /// An ACK from the client has been seen (`ack_base` is set). Always set for a verified flow.
    pub const ACK_SEEN: u8 = 1 << 3;
    /// The client sent two different ClientHellos at stream offset 0 (a retransmission with other bytes, or
    /// overlapping segments that disagree): the stricter verdict of the two applies.
    pub const SUSPECT: u8 = 1 << 4;
    /// The client's in-sequence FIN was seen: the flow-end event is sent, later client data is not counted
    /// (the server discards it) and the entry stays until it is evicted, so its verdict keeps applying.
    pub const FIN_SEEN: u8 = 1 << 5;
}

/// `HalfOpen::flags` bits.
pub mod half_open_flag {
    /// The server's SYN-ACK was seen leaving (`server_isn` is set).
    pub const SERVER_ISN: u8 = 1 << 0;
}

/// `Scratch::flags` bits.
pub mod scratch_flag {
    /// The packet belongs to no verified flow: `aqd_hello` only enforces a ClientHello verdict on it (drop a
    /// blocked fingerprint) and records nothing.
    pub const STATELESS: u8 = 1 << 0;
    /// Set by `aqd_xdp`: the source is throttled by a prefix decision, so its limit is the prefix's shared
    /// bucket (`PREFIX_BUCKETS`). The same bit as in the cached policy, so one decoder reads both.
    pub const PREFIX_LIMIT: u8 = crate::policy_flag::PREFIX_LIMIT;
    /// Set by `aqd_xdp`: the source is throttled by a decision on its exact address (`EXACT_BUCKETS`).
    pub const EXACT_LIMIT: u8 = crate::policy_flag::EXACT_LIMIT;
    const _: () = assert!(STATELESS & (PREFIX_LIMIT | EXACT_LIMIT) == 0);
}

/// How the kernel fared with the ClientHello key on the first payload segment (`PayloadEvent::hello_status`).
pub mod hello_status {
    /// Not the first segment, or not tried.
    pub const NONE: u8 = 0;
    /// A complete ClientHello in this segment; `hello_key` is set.
    pub const KEYED: u8 = 1;
    /// A ClientHello that continues in later segments: no key in the kernel.
    pub const SPLIT: u8 = 2;
    /// Not a TLS ClientHello.
    pub const NOT_HELLO: u8 = 3;
    /// A ClientHello with more entries than the kernel walks, or malformed: no key.
    pub const UNPARSED: u8 = 4;
}

/// Value of the `FLOWS` LRU map (key: the flow's [`FlowTuple`], client → server).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// [`SynSignature::key`] of the flow's SYN.
    pub syn_key: u64,
    /// Kernel ClientHello key (see `hello`), 0 until known or when the ClientHello could not be keyed.
    pub hello_key: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Start and last packet of the request being tracked (0 when none is open).
    pub burst_start_ns: u64,
    pub burst_last_ns: u64,
    /// Client payload bytes over the flow's life.
    pub client_bytes: u64,
    /// The client's initial sequence number: payload offset = seq − isn − 1.
    pub isn: u32,
    /// The server's ISN + 1, as the verified handshake acknowledged it.
    pub ack_base: u32,
    /// The highest acknowledgement number seen: `last_ack − ack_base` estimates the server bytes received.
    pub last_ack: u32,
    /// `last_ack` when the previous request event was sent (response bytes since = the last response).
    pub ack_at_last_request: u32,
    pub burst_bytes: u32,
    pub burst_packets: u32,
    /// Requests reported so far.
    pub requests: u32,
    /// Capture events sent.
    pub capture_events: u8,
    /// `flow_flag` bits.
    pub flags: u8,
    /// An `Action` set by a fingerprint verdict on this flow (0 = none). Block drops the flow's packets.
    pub action: u8,
    /// Rate class while throttled by a fingerprint verdict.
    pub rate_class: u8,
    /// The client's next sequence number: the end of the in-order client data seen (the server's `rcv_nxt`
    /// when nothing was lost after this host). Only in-order new data advances it.
    pub next_seq: u32,
    pub _pad: u32,
}

/// Value of the `HALF_OPEN` LRU map (key: the [`FlowTuple`], client → server): a SYN that passed, its handshake
/// not yet completed. `aqd_tcp` creates it from the first SYN of the tuple and never overwrites it; the
/// server's SYN-ACK, seen by `aqd_egress`, is the authority on both ISNs: it sets `client_isn` to what the
/// server acknowledged and `server_isn` to the server's own (creating the entry if a flood evicted it). So
/// a client that sends a second SYN with another ISN cannot make its real connection fail verification.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HalfOpen {
    /// [`SynSignature::key`] of the SYN.
    pub syn_key: u64,
    pub first_seen_ns: u64,
    pub client_isn: u32,
    /// The server's ISN (from its SYN-ACK), valid with [`half_open_flag::SERVER_ISN`].
    pub server_isn: u32,
    /// `half_open_flag` bits.
    pub flags: u8,
    /// The SYN signature verdict's `Action` when it throttles the flow (0 = none), and its rate class.
    pub action: u8,
    pub rate_class: u8,
    pub _pad: [u8; 5],
}

/// What `aqd_xdp` hands to the TCP program it tail-calls (per-CPU `SCRATCH`), plus that program's work space.
/// Large things live here, not on the 512-byte BPF stack.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scratch {
    pub flow: FlowTuple,
    /// Frame offsets of the IP and TCP headers.
    pub l3_offset: u16,
    pub l4_offset: u16,
    /// The `Reason` the packet passes with unless the TCP program decides otherwise.
    pub pass_reason: u8,
    /// Rate class from the source's decision (0 = default).
    pub rate_class: u8,
    pub ip_version: u8,
    /// `scratch_flag` bits, set by `aqd_tcp` for `aqd_hello`.
    pub flags: u8,
    /// Set by `aqd_tcp` before it tail-calls `aqd_hello`: where the segment's payload is, how long it is (IP
    /// length, never Ethernet padding), and its offset in the client's byte stream.
    pub payload_offset: u16,
    pub payload_len: u16,
    pub stream_offset: u32,
    /// Work space of the ClientHello walk: cursor and extension offsets kept in map memory, where the
    /// verifier does not track their values (see hello.rs).
    pub walk: [u32; 8],
    pub syn: SynSignature,
    /// Map values being built for an insert (`HALF_OPEN` at a SYN, `FLOWS` at a completed handshake): too big
    /// for the BPF stack next to everything else.
    pub new_flow: FlowState,
    pub new_half_open: HalfOpen,
    /// The ClientHello (or the first part of it) being keyed. Reads are at `offset & (HELLO_BUF - 1)`, and
    /// LLVM may fold `(i + 1) & mask` into `(i & mask) + 1`: the slack keeps that one byte in bounds too.
    pub hello: [u8; HELLO_BUF + 8],
}

const _: () = assert!(core::mem::size_of::<FlowState>() == 96);
const _: () = assert!(core::mem::size_of::<HalfOpen>() == 32);
const _: () = assert!(core::mem::size_of::<Scratch>() == 88 + 32 + 96 + 32 + HELLO_BUF + 8);
