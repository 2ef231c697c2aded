//! Client fingerprints in userspace: JA4 of TLS ClientHellos and p0f-style signatures of TCP SYNs — for
//! `aqd fingerprint` on captures, and as the reference for what the kernel extracts live.
//!
//! - [`ja4`]: ClientHello → JA4, JA4_r (and JA4_o, JA4_ro), per FoxIO's spec; TLS over TCP only (no QUIC);
//! - [`reassembly`]: the first client bytes of a TCP flow by sequence number (≤ 16 KiB) → the ClientHello,
//!   across TCP segments and TLS records;
//! - [`syn`]: raw IPv4/IPv6 + TCP headers → [`detector_common::SynSignature`] (as the kernel fills it) and
//!   p0f's text form `ver:ittl:olen:mss:wsize,scale:olayout:quirks:pclass`;
//! - [`p0f`]: the `[tcp:request]` section of p0f v3's `p0f.fp`, and matching SYN signatures against it;
//! - [`offline`]: pcap/pcapng → one [`OfflineRecord`] per ClientHello and per client SYN;
//! - [`hello_key`]: the kernel's ClientHello key from a parsed ClientHello or a JA4_r string;
//! - [`live`]: the daemon's pipeline: capture events → reassembly → JA4 / p0f label → fingerprint table,
//!   verdicts by fingerprint and escalation to source decisions.

pub mod hello_key;
pub mod ja4;
pub mod live;
pub mod offline;
pub mod p0f;
pub mod reassembly;
pub mod syn;

pub use ja4::{ClientHello, Ja4, Ja4Error, ja4_throughput};
pub use offline::{ClientHelloRecord, OfflineRecord, SynRecord, fingerprint_file};
pub use p0f::{P0fDb, P0fMatch};
