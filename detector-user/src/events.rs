//! Decodes ring-buffer records into events, and reads the ring buffer asynchronously.
//!
//! Decoding is pure (bytes in, event out) so it is tested and fuzzed without a kernel. Records shorter than
//! their header says, or of an unknown kind, decode to an error the reader counts and skips.

use std::net::IpAddr;

use aya::maps::{MapData, RingBuf};
use detector_common::{
    AddrKey, ConnEvent, DropEvent, EventHeader, EventKind, FlowEvent, FlowTuple, PayloadEvent, Reason,
    SynSignature,
};
use thiserror::Error;
use tokio::io::unix::AsyncFd;

use crate::maps::key_addr;

/// Event-reader statistics shared with the status and metrics views.
#[derive(Debug, Default)]
pub struct EventStats {
    /// Events read, by [`EventKind`] code.
    pub read: [std::sync::atomic::AtomicU64; detector_common::event::EVENT_KIND_COUNT],
    /// Records that did not decode.
    pub undecodable: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than an event header")]
    ShortHeader { len: usize },
    #[error("unknown event kind {kind}")]
    UnknownKind { kind: u16 },
    #[error("{kind} record of {len} bytes, expected at least {expected}")]
    ShortRecord {
        kind: &'static str,
        len: usize,
        expected: usize,
    },
}

/// Addresses and ports of a packet, in userspace types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

impl Flow {
    /// The kernel's key of this flow (the `FLOWS` map key: client → server, as the events carry it).
    pub fn tuple(&self) -> FlowTuple {
        let key = |a: IpAddr| match a {
            IpAddr::V4(a) => AddrKey::from_v4(a.octets()),
            IpAddr::V6(a) => AddrKey::from_v6(a.octets()),
        };
        FlowTuple {
            src: key(self.src),
            dst: key(self.dst),
            src_port: self.src_port,
            dst_port: self.dst_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

impl From<&FlowTuple> for Flow {
    fn from(f: &FlowTuple) -> Self {
        Self {
            src: key_addr(&f.src),
            dst: key_addr(&f.dst),
            src_port: f.src_port,
            dst_port: f.dst_port,
            proto: f.proto,
        }
    }
}

/// A request or a flow's end (see `detector_common::FlowEvent` for what the fields mean for each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowActivity {
    pub time_ns: u64,
    pub flow: Flow,
    pub syn_key: u64,
    pub hello_key: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub bytes: u64,
    pub response_bytes: u64,
    pub packets: u32,
    pub requests: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A SYN to a protected port, with its signature. Unverified: anyone can forge a SYN's source address.
    Conn {
        time_ns: u64,
        ifindex: u32,
        flow: Flow,
        syn: SynSignature,
        syn_key: u64,
        /// The fingerprint verdict's action code that applied (0 = none).
        action: u8,
        dropped: bool,
        isn: u32,
    },
    /// Client bytes from the start of a flow.
    Payload {
        time_ns: u64,
        flow: Flow,
        stream_offset: u32,
        segment_len: u16,
        hello_key: u64,
        hello_status: u8,
        action: u8,
        data: Vec<u8>,
    },
    /// A handshake completed: the flow is verified (`start_ns` is its SYN's time).
    Established(FlowActivity),
    Request(FlowActivity),
    FlowEnd(FlowActivity),
    /// A sampled drop.
    Drop {
        time_ns: u64,
        ifindex: u32,
        flow: Flow,
        reason: Option<Reason>,
        frame_len: u32,
    },
}

impl Event {
    /// When the kernel sent it (`bpf_ktime_get_ns`: CLOCK_MONOTONIC, comparable with `clock::monotonic_ns`).
    pub fn time_ns(&self) -> u64 {
        match self {
            Self::Conn { time_ns, .. } | Self::Payload { time_ns, .. } | Self::Drop { time_ns, .. } => {
                *time_ns
            }
            Self::Established(a) | Self::Request(a) | Self::FlowEnd(a) => a.time_ns,
        }
    }

    pub fn kind(&self) -> EventKind {
        match self {
            Self::Conn { .. } => EventKind::Conn,
            Self::Drop { .. } => EventKind::Drop,
            Self::Payload { .. } => EventKind::Payload,
            Self::Request(_) => EventKind::Request,
            Self::FlowEnd(_) => EventKind::FlowEnd,
            Self::Established(_) => EventKind::Established,
        }
    }
}

/// Reads a `T` from the start of `bytes` if it is long enough. Ring-buffer records are 8-byte aligned, but
/// decoding does not rely on that.
fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= size_of::<T>())
        // SAFETY: length checked; `T` is a plain-old-data #[repr(C)] type from detector-common.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let header: EventHeader = read(bytes).ok_or(DecodeError::ShortHeader { len: bytes.len() })?;
    let kind = EventKind::from_u16(header.kind).ok_or(DecodeError::UnknownKind { kind: header.kind })?;
    let short = |expected| DecodeError::ShortRecord {
        kind: kind.name(),
        len: bytes.len(),
        expected,
    };
    match kind {
        EventKind::Conn => {
            let e: ConnEvent = read(bytes).ok_or_else(|| short(size_of::<ConnEvent>()))?;
            Ok(Event::Conn {
                time_ns: e.header.time_ns,
                ifindex: e.header.ifindex,
                flow: Flow::from(&e.flow),
                syn: e.syn,
                syn_key: e.syn_key,
                action: e.action,
                dropped: e.dropped != 0,
                isn: e.isn,
            })
        }
        EventKind::Payload => {
            let e: PayloadEvent = read(bytes).ok_or_else(|| short(size_of::<PayloadEvent>()))?;
            let len = (e.len as usize).min(e.data.len());
            Ok(Event::Payload {
                time_ns: e.header.time_ns,
                flow: Flow::from(&e.flow),
                stream_offset: e.stream_offset,
                segment_len: e.segment_len,
                hello_key: e.hello_key,
                hello_status: e.hello_status,
                action: e.action,
                data: e.data[..len].to_vec(),
            })
        }
        EventKind::Request | EventKind::FlowEnd | EventKind::Established => {
            let e: FlowEvent = read(bytes).ok_or_else(|| short(size_of::<FlowEvent>()))?;
            let activity = FlowActivity {
                time_ns: e.header.time_ns,
                flow: Flow::from(&e.flow),
                syn_key: e.syn_key,
                hello_key: e.hello_key,
                start_ns: e.start_ns,
                end_ns: e.end_ns,
                bytes: e.bytes,
                response_bytes: e.response_bytes,
                packets: e.packets,
                requests: e.requests,
            };
            Ok(match kind {
                EventKind::Request => Event::Request(activity),
                EventKind::Established => Event::Established(activity),
                _ => Event::FlowEnd(activity),
            })
        }
        EventKind::Drop => {
            let e: DropEvent = read(bytes).ok_or_else(|| short(size_of::<DropEvent>()))?;
            Ok(Event::Drop {
                time_ns: e.header.time_ns,
                ifindex: e.header.ifindex,
                flow: Flow::from(&e.flow),
                reason: Reason::from_u32(e.reason),
                frame_len: e.frame_len,
            })
        }
    }
}

/// Async reader over the `EVENTS` ring buffer.
pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Records that failed to decode (counted, never fatal).
    pub undecodable: u64,
}

impl EventReader {
    pub fn new(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        // SAFETY: the reader owns the ring buffer (and so its fd) for as long as it is registered.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self { ring, undecodable: 0 })
    }

    /// Waits for records, then hands every available one to `sink`. Returns the number handled.
    pub async fn next_batch(&mut self, sink: impl FnMut(Event)) -> std::io::Result<usize> {
        let mut guard = self.ring.readable_mut().await?;
        guard.clear_ready();
        drop(guard);
        Ok(self.drain(sink))
    }

    /// Hands every record available now to `sink`, without waiting. The kernel batches wake-ups, so the
    /// daemon also calls this on a short timer.
    pub fn drain(&mut self, mut sink: impl FnMut(Event)) -> usize {
        let ring = self.ring.get_mut();
        let mut handled = 0;
        while let Some(record) = ring.next() {
            match decode(&record) {
                Ok(event) => sink(event),
                Err(e) => {
                    self.undecodable += 1;
                    tracing::debug!(error = %e, "skipping undecodable event");
                }
            }
            handled += 1;
        }
        handled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: T is a padding-free #[repr(C)] type.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn decodes_a_conn_event() {
        let e = ConnEvent {
            header: EventHeader {
                kind: 0,
                len: size_of::<ConnEvent>() as u16,
                ifindex: 3,
                time_ns: 42,
            },
            flow: FlowTuple {
                src: AddrKey::from_v4([10, 0, 0, 1]),
                dst: AddrKey::from_v4([10, 0, 0, 2]),
                src_port: 40000,
                dst_port: 443,
                proto: 6,
                _pad: [0; 3],
            },
            syn: SynSignature {
                ip_version: 4,
                ttl: 64,
                ..Default::default()
            },
            syn_key: 7,
            action: 3,
            dropped: 1,
            _pad: [0; 2],
            isn: 1234,
        };
        let got = decode(&bytes_of(&e)).unwrap();
        let Event::Conn {
            time_ns,
            ifindex,
            flow,
            syn_key,
            dropped,
            isn,
            ..
        } = got
        else {
            panic!("wrong kind")
        };
        assert_eq!((time_ns, ifindex, syn_key, dropped, isn), (42, 3, 7, true, 1234));
        assert_eq!(flow.src, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(flow.dst_port, 443);
        assert_eq!(
            flow.tuple(),
            e.flow,
            "a decoded flow maps back to the kernel's FLOWS key"
        );
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert_eq!(decode(&[0; 3]), Err(DecodeError::ShortHeader { len: 3 }));
        let mut unknown = bytes_of(&EventHeader {
            kind: 99,
            len: 16,
            ifindex: 0,
            time_ns: 0,
        });
        assert_eq!(decode(&unknown), Err(DecodeError::UnknownKind { kind: 99 }));
        unknown[0] = 1; // a drop header with no body
        assert!(matches!(decode(&unknown), Err(DecodeError::ShortRecord { .. })));
    }
}
