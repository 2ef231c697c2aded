//! Records the XDP program writes to the `EVENTS` ring buffer.
//!
//! Every record starts with an [`EventHeader`]; its `kind` says which struct follows and `len` is the record's
//! total size, so a reader can skip kinds it does not know (an older daemon reading a newer program's events).

use crate::{AddrKey, SynSignature, flow::CAPTURE_CHUNK};

#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A new TCP connection (SYN without ACK) to a protected port: [`ConnEvent`].
    Conn = 0,
    /// A sampled drop: [`DropEvent`].
    Drop = 1,
    /// Client payload from the start of a flow (the ClientHello): [`PayloadEvent`].
    Payload = 2,
    /// One request (a burst of client payload after an idle gap): [`FlowEvent`].
    Request = 3,
    /// A flow ended (an accepted FIN or RST from the client): [`FlowEvent`] with the flow's totals.
    FlowEnd = 4,
    /// A handshake completed (the client acknowledged the server's ISN): [`FlowEvent`] with `start_ns` the
    /// SYN's time and `end_ns` the ACK's. The first event of a verified flow; only verified flows send
    /// payload, request and flow-end events.
    Established = 5,
}

/// Number of [`EventKind`] values; the size of the per-kind event counters.
pub const EVENT_KIND_COUNT: usize = 6;

impl EventKind {
    /// Every kind, in code order (status views and metrics list them from here).
    pub const ALL: [Self; EVENT_KIND_COUNT] = [
        Self::Conn,
        Self::Drop,
        Self::Payload,
        Self::Request,
        Self::FlowEnd,
        Self::Established,
    ];

    pub const fn from_u16(v: u16) -> Option<Self> {
        match v {
            0 => Some(Self::Conn),
            1 => Some(Self::Drop),
            2 => Some(Self::Payload),
            3 => Some(Self::Request),
            4 => Some(Self::FlowEnd),
            5 => Some(Self::Established),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Conn => "conn",
            Self::Drop => "drop_sample",
            Self::Payload => "payload",
            Self::Request => "request",
            Self::FlowEnd => "flow_end",
            Self::Established => "established",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] value.
    pub kind: u16,
    /// Size of the whole record in bytes, header included.
    pub len: u16,
    /// Interface the packet arrived on.
    pub ifindex: u32,
    /// Monotonic clock, ns.
    pub time_ns: u64,
}

/// Addresses and ports of a packet. Ports are host byte order; 0 when the packet has no L4 header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTuple {
    pub src: AddrKey,
    pub dst: AddrKey,
    pub src_port: u16,
    pub dst_port: u16,
    /// IP protocol number of the transport header (6 TCP, 17 UDP, …).
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// A SYN to a protected port, with the client stack's signature. Sent for dropped SYNs too (`action` says
/// which fingerprint verdict applied), so the daemon sees who keeps trying. A SYN proves nothing about its
/// source address (anyone can forge one): these are SYN statistics, never evidence against a source; the
/// connection counts once its [`EventKind::Established`] event arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    pub header: EventHeader,
    pub flow: FlowTuple,
    pub syn: SynSignature,
    /// [`SynSignature::key`], as looked up in `SYN_VERDICTS`.
    pub syn_key: u64,
    /// The `Action` of the live SYN-signature verdict that applied (0 = none).
    pub action: u8,
    /// 1 when the SYN was dropped (by its signature or by the source's connection limit).
    pub dropped: u8,
    pub _pad: [u8; 2],
    /// The client's initial sequence number (payload offsets in [`PayloadEvent`] count from ISN + 1).
    pub isn: u32,
}

/// Client payload from the start of a flow, for the daemon's ClientHello reassembly and JA4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadEvent {
    pub header: EventHeader,
    pub flow: FlowTuple,
    /// Offset of `data[0]` in the client's byte stream (0 = first byte after the SYN).
    pub stream_offset: u32,
    /// Bytes of `data` that are valid.
    pub len: u16,
    /// Payload bytes the segment carried (more than `len` when cut to [`CAPTURE_CHUNK`]).
    pub segment_len: u16,
    /// The kernel's ClientHello key when it keyed this segment (`hello_status::KEYED`), else 0.
    pub hello_key: u64,
    /// A `flow::hello_status` value.
    pub hello_status: u8,
    /// The `Action` of the live ClientHello verdict that applied (0 = none).
    pub action: u8,
    /// The flow's `flow::flow_flag` bits after this segment (`SUSPECT`: two different ClientHellos).
    pub flow_flags: u8,
    pub _pad: [u8; 5],
    pub data: [u8; CAPTURE_CHUNK],
}

/// A request or the end of a flow.
///
/// - [`EventKind::Request`]: `start_ns..end_ns` is the burst of client payload, `bytes`/`packets` its size,
///   `response_bytes` the server bytes the client acknowledged since the previous request event (the response
///   to the previous request), `requests` this request's 1-based index in the flow (the first one or two are
///   the TLS handshake).
/// - [`EventKind::FlowEnd`]: `start_ns..end_ns` is the flow's life, `bytes` the client payload in total,
///   `response_bytes` the server bytes acknowledged in total, `requests` the requests reported.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub header: EventHeader,
    pub flow: FlowTuple,
    pub syn_key: u64,
    pub hello_key: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub bytes: u64,
    pub response_bytes: u64,
    pub packets: u32,
    pub requests: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    pub header: EventHeader,
    pub flow: FlowTuple,
    /// A [`crate::Reason`] value.
    pub reason: u32,
    /// Length of the dropped frame in bytes.
    pub frame_len: u32,
}

const _: () = assert!(core::mem::size_of::<EventHeader>() == 16);
const _: () = assert!(core::mem::size_of::<FlowTuple>() == 40);
const _: () = assert!(core::mem::size_of::<ConnEvent>() == 104);
const _: () = assert!(core::mem::size_of::<PayloadEvent>() == 80 + CAPTURE_CHUNK);
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 112);
const _: () = assert!(core::mem::size_of::<DropEvent>() == 64);
