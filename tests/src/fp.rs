//! Fingerprint test support: SYN signature keys, verdicts and ClientHello records for the kernel tests.

use detector_common::{Action, Decision, Origin};
use detector_user::fingerprint::{
    hello_key::key_of_client_hello,
    ja4::{ClientHello, build},
    syn::parse_ip_tcp,
};

use crate::packet::Segment;

/// The `SYN_VERDICTS` key of a segment's signature, computed in userspace.
pub fn syn_key_of(segment: &Segment) -> u64 {
    parse_ip_tcp(&segment.ip_packet())
        .expect("a well-formed TCP segment")
        .signature
        .key()
}

/// A fingerprint verdict as the daemon would install it.
pub fn verdict(action: Action, rate_class: u8, expires_ns: u64) -> Decision {
    Decision {
        expires_ns,
        hits: 0,
        action: action as u8,
        rate_class,
        reason: 0,
        origin: Origin::Cli as u8,
        _pad: [0; 3],
    }
}

pub fn block_verdict() -> Decision {
    verdict(Action::Block, 0, 0)
}

/// A Chrome-like ClientHello with an X25519-only key share: one TLS record of about 600 bytes, small enough
/// for the kernel to key.
pub fn small_hello() -> build::HelloBuilder {
    let mut hello = build::chrome_like();
    if let Some(exts) = hello.extensions.as_mut() {
        for (kind, body) in exts.iter_mut() {
            if *kind == 0x0033 {
                let mut list = Vec::new();
                list.extend_from_slice(&0x001du16.to_be_bytes());
                list.extend_from_slice(&32u16.to_be_bytes());
                list.extend_from_slice(&[0x42; 32]);
                *body = (list.len() as u16).to_be_bytes().to_vec();
                body.extend(list);
            }
        }
    }
    hello
}

/// [`small_hello`] as one TLS record.
pub fn client_hello_record() -> Vec<u8> {
    small_hello().records(16_384)
}

/// The userspace key of the ClientHello in the (single) record `record`.
pub fn hello_key_of_record(record: &[u8]) -> u64 {
    let hello = ClientHello::parse_message(&record[5..]).expect("a ClientHello record");
    key_of_client_hello(&hello)
}
