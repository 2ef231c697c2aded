//! Records the XDP program writes to the `EVENTS` ring buffer.
//!
//! Every record starts with an [`EventHeader`]; its `kind` says which struct follows and `len` is the record's
//! total size, so a reader can skip kinds it does not know (an older daemon reading a newer program's events).

use crate::AddrKey;

#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A new TCP connection (SYN without ACK) to a protected port: [`ConnEvent`].
    Conn = 0,
    /// A sampled drop: [`DropEvent`].
    Drop = 1,
}

/// Number of [`EventKind`] values; the size of the per-kind event counters.
pub const EVENT_KIND_COUNT: usize = 2;

impl EventKind {
    pub const fn from_u16(v: u16) -> Option<Self> {
        match v {
            0 => Some(Self::Conn),
            1 => Some(Self::Drop),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Conn => "conn",
            Self::Drop => "drop_sample",
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

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    pub header: EventHeader,
    pub flow: FlowTuple,
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
const _: () = assert!(core::mem::size_of::<ConnEvent>() == 56);
const _: () = assert!(core::mem::size_of::<DropEvent>() == 64);
