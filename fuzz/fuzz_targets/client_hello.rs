//! ClientHello reassembly and JA4: TCP segments with arbitrary sequence numbers (format: `aqd_fuzz::Flow`) go
//! into a `StreamBuffer`; after each segment that grows the stream, `first_client_hello` and `ja4_from_stream`
//! run on it, as the daemon and `aqd fingerprint` do; at the end, every ClientHello among the stream's first
//! handshake messages is parsed and fingerprinted.
//!
//! Checked besides "no panic": the contiguous bytes only ever grow, by appending, up to `MAX_CLIENT_BYTES`;
//! `push`'s result says whether they grew; the scan and `ja4_from_stream` agree; every JA4 has its fixed shape.

#![no_main]

use aqd_fuzz::{Flow, Payload};
use detector_user::fingerprint::{
    ja4::{self, ClientHello, Ja4, Ja4Error, Protocol, ja4_from_stream},
    reassembly::{MAX_CLIENT_BYTES, Scan, StreamBuffer, first_client_hello, handshake_messages},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let flow = Flow::decode(data);
    let mut buffer = StreamBuffer::new();
    if let Some(isn) = flow.isn {
        buffer.set_isn(isn);
    }
    let mut fill = Vec::new();
    let mut before: Vec<u8> = Vec::new();
    for segment in &flow.segments {
        let payload: &[u8] = match segment.payload {
            Payload::Bytes(bytes) => bytes,
            Payload::Fill { byte, len } => {
                fill.clear();
                fill.resize(len, byte);
                &fill
            }
        };
        let grew = buffer.push(segment.seq, payload);
        let now = buffer.contiguous();
        assert!(now.len() <= MAX_CLIENT_BYTES, "{} bytes kept", now.len());
        assert_eq!(grew, now.len() > before.len(), "push's result");
        assert!(now.starts_with(&before), "bytes already contiguous changed");
        assert_eq!(buffer.is_full(), now.len() == MAX_CLIENT_BYTES);
        if grew {
            check_stream(now);
            before.clear();
            before.extend_from_slice(now);
        }
    }
    // A ClientHello sent again after a HelloRetryRequest comes later in the same stream.
    let (messages, _) = handshake_messages(buffer.contiguous(), 4);
    for message in messages.iter().filter(|m| m[0] == ja4::HANDSHAKE_CLIENT_HELLO) {
        if let Ok(hello) = ClientHello::parse_message(message) {
            check_ja4(&ja4::ja4(&hello, Protocol::Tcp));
        }
    }
});

/// What the daemon does with a stream's first bytes.
fn check_stream(stream: &[u8]) {
    let result = ja4_from_stream(stream);
    match first_client_hello(stream) {
        Scan::Hello(message) => {
            assert_eq!(message[0], ja4::HANDSHAKE_CLIENT_HELLO);
            match (&result, ClientHello::parse_message(&message)) {
                (Ok((hello, fp)), Ok(parsed)) => {
                    assert_eq!(hello, &parsed);
                    check_ja4(fp);
                }
                (Err(a), Err(b)) => assert_eq!(a, &b),
                (a, b) => panic!("ja4_from_stream {a:?} but parse_message {b:?}"),
            }
        }
        Scan::NeedMore => assert_eq!(result.map(|_| ()), Err(Ja4Error::Truncated)),
        Scan::Rejected(e) => assert_eq!(result.map(|_| ()), Err(e)),
    }
}

/// `a_hash_hash` (36 characters); the raw forms start with the same `a` part.
fn check_ja4(fp: &Ja4) {
    assert_eq!(fp.ja4.len(), 36, "{}", fp.ja4);
    assert!(fp.ja4.is_ascii(), "{}", fp.ja4);
    let a = &fp.ja4[..11];
    assert!(a.ends_with('_'), "{}", fp.ja4);
    for other in [&fp.ja4_r, &fp.ja4_o, &fp.ja4_ro] {
        assert!(other.starts_with(a), "{} vs {other}", fp.ja4);
    }
    assert_eq!(fp.ja4_o.len(), 36, "{}", fp.ja4_o);
}
