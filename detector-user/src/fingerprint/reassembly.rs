//! From TCP segments to the ClientHello: the first client bytes of a flow, put in sequence order, then the
//! first handshake message out of the TLS records carrying it.
//!
//! - [`StreamBuffer`] keeps one direction's first [`MAX_CLIENT_BYTES`] bytes by sequence number: segments may
//!   arrive out of order, be retransmitted, or overlap; whatever lies past the bound is dropped. The sequence
//!   base is the SYN's ISN + 1 when the SYN was seen, else the first data segment's sequence number.
//! - [`first_client_hello`] reads TLS records from the start of those bytes and joins the handshake fragments
//!   until the first handshake message is complete — a ClientHello may span several TCP segments (post-quantum
//!   key shares make it ~1.8 KB) *and* several TLS records. [`handshake_messages`] goes on past the first one
//!   (skipping ChangeCipherSpec records), for a ClientHello sent again after a HelloRetryRequest.
//!
//! Bytes that cannot begin a TLS handshake are rejected as soon as the first two bytes are in, so a non-TLS
//! flow costs two bytes of looking, not 16 KiB of buffering.

use std::collections::BTreeMap;

use super::ja4::Ja4Error;

/// Most client bytes kept per flow, and the largest ClientHello (with its record headers) accepted.
pub const MAX_CLIENT_BYTES: usize = 16 * 1024;

const CT_CHANGE_CIPHER_SPEC: u8 = 20;
const CT_HANDSHAKE: u8 = 22;
/// TLS 1.2's bound on a record's ciphertext (2^14 + 2048); plaintext handshake records must be smaller.
const MAX_RECORD_LEN: usize = (1 << 14) + 2048;

/// The first bytes of one direction of a TCP flow, in sequence order.
#[derive(Clone, Debug, Default)]
pub struct StreamBuffer {
    /// Sequence number of the first payload byte.
    base: Option<u32>,
    /// Contiguous bytes from `base`.
    data: Vec<u8>,
    /// Segments past a gap, by offset from `base`, clipped to the bound.
    pending: BTreeMap<usize, Vec<u8>>,
    pending_bytes: usize,
}

impl StreamBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the SYN's sequence number: data starts at `isn + 1`. Ignored once data has been seen.
    pub fn set_isn(&mut self, isn: u32) {
        if self.data.is_empty() && self.pending.is_empty() {
            self.base = Some(isn.wrapping_add(1));
        }
    }

    /// Contiguous bytes from the start of the stream.
    pub fn contiguous(&self) -> &[u8] {
        &self.data
    }

    /// Whether the bound is reached (nothing more will be kept).
    pub fn is_full(&self) -> bool {
        self.data.len() >= MAX_CLIENT_BYTES
    }

    /// Adds a segment; returns whether the contiguous prefix grew.
    pub fn push(&mut self, seq: u32, payload: &[u8]) -> bool {
        if payload.is_empty() {
            return false;
        }
        let base = *self.base.get_or_insert(seq);
        // Signed distance from the base, so a retransmission starting before it can still be trimmed.
        let rel = seq.wrapping_sub(base) as i32 as i64;
        let (offset, payload) = if rel < 0 {
            let skip = rel.unsigned_abs() as usize;
            if skip >= payload.len() {
                return false;
            }
            (0usize, &payload[skip..])
        } else {
            (rel as usize, payload)
        };
        if offset >= MAX_CLIENT_BYTES {
            return false;
        }
        let payload = &payload[..payload.len().min(MAX_CLIENT_BYTES - offset)];
        let before = self.data.len();
        if offset <= self.data.len() {
            let end = offset + payload.len();
            if end > self.data.len() {
                let start = self.data.len() - offset;
                self.data.extend_from_slice(&payload[start..]);
            }
            self.drain_pending();
        } else if self.pending_bytes + payload.len() <= MAX_CLIENT_BYTES {
            // Keep the longer one if a segment at this offset is already waiting.
            let replace = self.pending.get(&offset).is_none_or(|p| p.len() < payload.len());
            if replace {
                let old = self
                    .pending
                    .insert(offset, payload.to_vec())
                    .map_or(0, |p| p.len());
                self.pending_bytes = self.pending_bytes + payload.len() - old;
            }
        }
        self.data.len() > before
    }

    fn drain_pending(&mut self) {
        while let Some((&offset, _)) = self.pending.first_key_value() {
            if offset > self.data.len() {
                break;
            }
            let Some((_, bytes)) = self.pending.pop_first() else {
                break;
            };
            self.pending_bytes -= bytes.len();
            let end = offset + bytes.len();
            if end > self.data.len() {
                let start = self.data.len() - offset;
                self.data.extend_from_slice(&bytes[start..]);
            }
        }
    }
}

/// Outcome of looking for the first ClientHello in a stream's first bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scan {
    /// The bytes so far are a valid beginning; more are needed.
    NeedMore,
    /// The complete first handshake message, which is a ClientHello (4-byte header included).
    Hello(Vec<u8>),
    /// Not a ClientHello, and more bytes will not change that.
    Rejected(Ja4Error),
}

/// How a record walk ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tail {
    /// The bytes ended inside a record or message: more may follow.
    NeedMore,
    /// A record that is neither handshake nor ChangeCipherSpec (e.g. application data): the walk stops.
    OtherRecord(u8),
    /// The bytes are not (or are no longer) a plausible TLS record stream.
    Invalid(Ja4Error),
}

fn record_header_ok(content_type: u8, major: u8) -> bool {
    major == 3 && (20..=24).contains(&content_type)
}

/// Complete handshake messages from the start of a client's TLS byte stream, in order, at most `limit`, and
/// how the walk ended. The stream must start with a handshake record; ChangeCipherSpec records between
/// handshake records are skipped (TLS 1.3 middlebox compatibility puts one before a second ClientHello).
pub fn handshake_messages(stream: &[u8], limit: usize) -> (Vec<Vec<u8>>, Tail) {
    let mut messages = Vec::new();
    let mut fragments: Vec<u8> = Vec::new();
    let mut pos = 0usize;
    // Early rejection of non-TLS bytes: the first record must be a handshake record of TLS (major 3).
    if let Some(&b) = stream.first()
        && b != CT_HANDSHAKE
    {
        return (messages, Tail::Invalid(Ja4Error::NotTls));
    }
    if let Some(&b) = stream.get(1)
        && b != 3
    {
        return (messages, Tail::Invalid(Ja4Error::NotTls));
    }
    loop {
        if messages.len() >= limit {
            return (messages, Tail::NeedMore);
        }
        let Some(header) = stream.get(pos..pos + 5) else {
            return (messages, Tail::NeedMore);
        };
        let (content_type, major) = (header[0], header[1]);
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if !record_header_ok(content_type, major) || len > MAX_RECORD_LEN {
            return (messages, Tail::Invalid(Ja4Error::NotTls));
        }
        if content_type != CT_HANDSHAKE && content_type != CT_CHANGE_CIPHER_SPEC {
            return (messages, Tail::OtherRecord(content_type));
        }
        if content_type == CT_HANDSHAKE && len == 0 {
            return (
                messages,
                Tail::Invalid(Ja4Error::Malformed("empty handshake record")),
            );
        }
        if pos + 5 + len > MAX_CLIENT_BYTES {
            return (messages, Tail::Invalid(Ja4Error::TooLarge));
        }
        let Some(fragment) = stream.get(pos + 5..pos + 5 + len) else {
            return (messages, Tail::NeedMore);
        };
        pos += 5 + len;
        if content_type == CT_CHANGE_CIPHER_SPEC {
            if !fragments.is_empty() {
                return (
                    messages,
                    Tail::Invalid(Ja4Error::Malformed("record interleaved in a message")),
                );
            }
            continue;
        }
        fragments.extend_from_slice(fragment);
        // Split off every complete message in the handshake byte stream.
        let mut start = 0usize;
        while fragments.len() - start >= 4 && messages.len() < limit {
            let m = &fragments[start..];
            let mlen = u32::from_be_bytes([0, m[1], m[2], m[3]]) as usize;
            if 4 + mlen > MAX_CLIENT_BYTES {
                return (messages, Tail::Invalid(Ja4Error::TooLarge));
            }
            if m.len() < 4 + mlen {
                break;
            }
            messages.push(m[..4 + mlen].to_vec());
            start += 4 + mlen;
        }
        fragments.drain(..start);
    }
}

/// The first handshake message of a client's stream, if it is complete and a ClientHello.
pub fn first_client_hello(stream: &[u8]) -> Scan {
    let (mut messages, tail) = handshake_messages(stream, 1);
    match messages.pop() {
        Some(msg) if msg[0] == super::ja4::HANDSHAKE_CLIENT_HELLO => Scan::Hello(msg),
        Some(msg) => Scan::Rejected(Ja4Error::NotClientHello(msg[0])),
        None => match tail {
            Tail::NeedMore if stream.len() >= MAX_CLIENT_BYTES => Scan::Rejected(Ja4Error::TooLarge),
            Tail::NeedMore => {
                // The handshake header is enough to know it is not a ClientHello.
                match stream.get(5) {
                    Some(&t) if t != super::ja4::HANDSHAKE_CLIENT_HELLO => {
                        Scan::Rejected(Ja4Error::NotClientHello(t))
                    }
                    _ => Scan::NeedMore,
                }
            }
            Tail::OtherRecord(_) => Scan::Rejected(Ja4Error::NotTls),
            Tail::Invalid(e) => Scan::Rejected(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::ja4::{build, ja4_from_stream};

    #[test]
    fn in_order_out_of_order_and_overlapping_segments() {
        let bytes: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let isn = u32::MAX - 100; // wraps inside the stream
        let mut s = StreamBuffer::new();
        s.set_isn(isn);
        let base = isn.wrapping_add(1);
        // Second half first, then an overlapping retransmission of the start, then the middle.
        assert!(!s.push(base.wrapping_add(2000), &bytes[2000..]));
        assert!(s.push(base, &bytes[..1200]));
        assert!(s.push(base.wrapping_add(1000), &bytes[1000..2100]));
        assert_eq!(s.contiguous(), &bytes[..]);
        // A retransmission starting before the base is trimmed, not misplaced.
        assert!(!s.push(base.wrapping_sub(5), &[9; 10]));
        assert_eq!(s.contiguous(), &bytes[..]);
    }

    #[test]
    fn bounded_to_16k() {
        let mut s = StreamBuffer::new();
        for i in 0..20u32 {
            s.push(1000 + i * 1400, &[0x16; 1400]);
        }
        assert_eq!(s.contiguous().len(), MAX_CLIENT_BYTES);
        assert!(s.is_full());
        // Far-future segments are not stored at all.
        let mut s = StreamBuffer::new();
        s.set_isn(0);
        assert!(!s.push(1 + MAX_CLIENT_BYTES as u32, &[1; 100]));
        assert_eq!(s.pending_bytes, 0);
    }

    #[test]
    fn hello_split_across_records_and_segments() {
        let hello = build::chrome_like();
        let whole = ja4_from_stream(&hello.records(16384)).unwrap().1;
        for fragment in [100, 517, 1000, 1500] {
            let stream = hello.records(fragment);
            for seg in [1, 7, 536, 1448, 1460] {
                let mut s = StreamBuffer::new();
                s.set_isn(77);
                let mut found = None;
                for (i, chunk) in stream.chunks(seg).enumerate() {
                    s.push(78 + (i * seg) as u32, chunk);
                    match first_client_hello(s.contiguous()) {
                        Scan::NeedMore => {}
                        Scan::Hello(_) => {
                            found = Some(ja4_from_stream(s.contiguous()).unwrap().1);
                            break;
                        }
                        Scan::Rejected(e) => panic!("fragment {fragment} segment {seg}: {e}"),
                    }
                }
                assert_eq!(found.as_ref(), Some(&whole), "fragment {fragment} segment {seg}");
            }
        }
    }

    #[test]
    fn early_rejection() {
        assert_eq!(first_client_hello(b"G"), Scan::Rejected(Ja4Error::NotTls));
        assert_eq!(first_client_hello(b"\x16\x01"), Scan::Rejected(Ja4Error::NotTls));
        assert_eq!(first_client_hello(b"\x16\x03"), Scan::NeedMore);
        // A ServerHello is recognised from its handshake type byte.
        assert_eq!(
            first_client_hello(b"\x16\x03\x03\x00\x50\x02"),
            Scan::Rejected(Ja4Error::NotClientHello(2))
        );
        // Application data first: not a handshake.
        assert_eq!(
            first_client_hello(b"\x17\x03\x03\x00\x05hello"),
            Scan::Rejected(Ja4Error::NotTls)
        );
    }

    #[test]
    fn second_hello_after_change_cipher_spec() {
        let hello = build::chrome_like();
        let mut stream = hello.records(16384);
        stream.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
        stream.extend(hello.records(600));
        let (messages, tail) = handshake_messages(&stream, usize::MAX);
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0], messages[1]);
        assert_eq!(tail, Tail::NeedMore);
    }
}
