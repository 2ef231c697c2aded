//! JA4 (TLS client fingerprint) from a ClientHello, per FoxIO's `technical_details/JA4.md` (BSD-3).
//!
//! ```text
//! JA4    = a _ sha256(sorted ciphers)[..12] _ sha256(sorted extensions w/o SNI, ALPN [_ sigalgs])[..12]
//! JA4_r  = a _ sorted ciphers               _ sorted extensions w/o SNI, ALPN [_ sigalgs]
//! JA4_o  = a _ sha256(ciphers, wire order)  _ sha256(extensions, wire order, SNI and ALPN kept [_ sigalgs])
//! JA4_ro = the same, unhashed
//! a      = proto version sni(d|i) cipher-count(2) extension-count(2) alpn(2)
//! ```
//!
//! - GREASE values (`0x?a?a` with equal bytes, draft-davidben-tls-grease) are ignored everywhere: ciphers,
//!   extensions (counts and lists), supported_versions and signature_algorithms.
//! - Version: the highest non-GREASE value in supported_versions (0x002b) if the extension is there and holds
//!   one, else the ClientHello's `legacy_version`; the record-layer version is never used.
//! - ALPN: first and last character of the first ALPN value; `00` without ALPN or with an empty first value;
//!   when the first or the last byte is not ASCII alphanumeric, the first and last hex digits of the whole value
//!   instead (`0xAB 0xCD` → `ad`). This is the spec's rule; FoxIO's Rust and Python tools and the Wireshark
//!   plugin print `99` for non-ASCII values instead (ja4#148, ja4#326) — we follow the spec, as s2n-tls does.
//! - Counts are capped at 99. An empty cipher list hashes to `000000000000`, as does an empty extension list
//!   (once SNI and ALPN are removed, or for `_o` with them).
//! - Protocol: `t` (TLS over TCP) is all [`super::offline`] produces. QUIC (`q`) is out of scope: its
//!   ClientHello sits in encrypted Initial packets, which would need QUIC Initial decryption first;
//!   [`Protocol::Quic`] only exists so that a caller holding a decrypted QUIC ClientHello can label it.
//!
//! Parsing uses `tls-parser` for the ClientHello's fixed fields and for the contents of the SNI, ALPN,
//! supported_versions and signature_algorithms extensions. The extension *list* is walked here, because
//! `tls-parser`'s list parser (`parse_tls_client_hello_extensions`, `many0(complete(..))`) silently stops at
//! the first extension whose body it cannot parse — dropping every later extension from the counts and
//! hashes — and it classes any type matching `0x?a?a` as GREASE, wider than the real GREASE set (`0x0a1a` is
//! not GREASE). Walking the `type, length, body` framing ourselves keeps every extension, in wire order, with
//! its exact type, including GREASE and unknown ones.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tls_parser::{TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_client_hello_extension};

use super::reassembly::{self, MAX_CLIENT_BYTES, Scan};

/// Handshake message type of a ClientHello.
pub const HANDSHAKE_CLIENT_HELLO: u8 = 1;

const EXT_SERVER_NAME: u16 = 0x0000;
const EXT_SIGNATURE_ALGORITHMS: u16 = 0x000d;
const EXT_ALPN: u16 = 0x0010;
const EXT_SUPPORTED_VERSIONS: u16 = 0x002b;

/// The hash written when a list is empty.
pub const EMPTY_HASH: &str = "000000000000";

/// Why no fingerprint came out of some bytes. Every malformed input maps to one of these; nothing panics.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Ja4Error {
    /// The bytes are not a TLS handshake record stream (HTTP, SSH, SSLv2, garbage, …).
    #[error("not a TLS handshake")]
    NotTls,
    /// The first handshake message is something other than a ClientHello (e.g. the server's side).
    #[error("first handshake message is type {0}, not a ClientHello")]
    NotClientHello(u8),
    /// The bytes end before the ClientHello does.
    #[error("truncated ClientHello")]
    Truncated,
    /// The ClientHello (or its records) would exceed the reassembly bound.
    #[error("ClientHello exceeds {MAX_CLIENT_BYTES} bytes")]
    TooLarge,
    /// Lengths inside the ClientHello disagree.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

/// The transport the ClientHello came over (JA4's first character).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TLS over TCP: `t`.
    #[default]
    Tcp,
    /// QUIC: `q`. Never produced here (see the module docs).
    Quic,
    /// DTLS: `d`.
    Dtls,
}

impl Protocol {
    fn letter(self) -> char {
        match self {
            Protocol::Tcp => 't',
            Protocol::Quic => 'q',
            Protocol::Dtls => 'd',
        }
    }
}

/// Whether `v` is a GREASE value (0x0a0a, 0x1a1a, …, 0xfafa).
pub const fn is_grease(v: u16) -> bool {
    (v & 0x0f0f) == 0x0a0a && (v >> 8) == (v & 0xff)
}

/// What JA4 needs from a ClientHello, raw: every list in wire order with GREASE still in it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// `legacy_version` of the ClientHello body (not the record layer's).
    pub legacy_version: u16,
    pub ciphers: Vec<u16>,
    /// Extension types in wire order.
    pub extensions: Vec<u16>,
    /// supported_versions (0x002b) contents, if the extension is present and parses.
    pub supported_versions: Vec<u16>,
    /// The first ALPN protocol name, if the ALPN extension is present and lists one.
    pub alpn_first: Option<Vec<u8>>,
    /// signature_algorithms (0x000d) contents.
    pub signature_algorithms: Vec<u16>,
    /// The first host name of the SNI extension (for display only; JA4 only uses its presence).
    pub server_name: Option<String>,
}

impl ClientHello {
    /// Parses one complete handshake message (4-byte header included) that must be a ClientHello.
    pub fn parse_message(msg: &[u8]) -> Result<Self, Ja4Error> {
        if msg.len() < 4 {
            return Err(Ja4Error::Truncated);
        }
        if msg[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(Ja4Error::NotClientHello(msg[0]));
        }
        let len = u32::from_be_bytes([0, msg[1], msg[2], msg[3]]) as usize;
        if msg.len() < 4 + len {
            return Err(Ja4Error::Truncated);
        }
        let msg = &msg[..4 + len];
        let body = &msg[4..];
        let hello = match tls_parser::parse_tls_message_handshake(msg) {
            Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) => hello,
            Ok(_) => return Err(Ja4Error::Malformed("not a ClientHello")),
            Err(_) => return Err(Ja4Error::Malformed("ClientHello fields")),
        };
        let mut out = ClientHello {
            legacy_version: hello.version.0,
            ciphers: hello.ciphers.iter().map(|c| c.0).collect(),
            ..Default::default()
        };
        match hello.ext {
            Some(block) => out.read_extensions(block)?,
            None => {
                // tls-parser reports "no extensions" both when the body ends after the compression methods
                // (legal) and when the extension block's length runs past the body (malformed): tell them
                // apart by where the fixed fields end.
                let fixed = 2
                    + 32
                    + 1
                    + hello.session_id.map_or(0, <[u8]>::len)
                    + 2
                    + 2 * hello.ciphers.len()
                    + 1
                    + hello.comp.len();
                if body.len() != fixed {
                    return Err(Ja4Error::Malformed("extension block length"));
                }
            }
        }
        Ok(out)
    }

    fn read_extensions(&mut self, mut block: &[u8]) -> Result<(), Ja4Error> {
        while !block.is_empty() {
            if block.len() < 4 {
                return Err(Ja4Error::Malformed("extension header"));
            }
            let kind = u16::from_be_bytes([block[0], block[1]]);
            let len = u16::from_be_bytes([block[2], block[3]]) as usize;
            if block.len() < 4 + len {
                return Err(Ja4Error::Malformed("extension length"));
            }
            let (whole, rest) = block.split_at(4 + len);
            block = rest;
            let first_of_kind = !self.extensions.contains(&kind);
            self.extensions.push(kind);
            if !first_of_kind || is_grease(kind) {
                continue;
            }
            if !matches!(
                kind,
                EXT_SERVER_NAME | EXT_ALPN | EXT_SUPPORTED_VERSIONS | EXT_SIGNATURE_ALGORITHMS
            ) {
                continue;
            }
            // A body tls-parser cannot read leaves the extension counted but its values empty.
            let Ok((_, ext)) = parse_tls_client_hello_extension(whole) else {
                continue;
            };
            match ext {
                TlsExtension::SNI(names) => {
                    self.server_name = names
                        .first()
                        .map(|(_, name)| String::from_utf8_lossy(name).into_owned());
                }
                TlsExtension::ALPN(names) => self.alpn_first = names.first().map(|n| n.to_vec()),
                TlsExtension::SupportedVersions(versions) => {
                    self.supported_versions = versions.iter().map(|v| v.0).collect();
                }
                TlsExtension::SignatureAlgorithms(algs) => self.signature_algorithms = algs,
                _ => {}
            }
        }
        Ok(())
    }

    /// The version JA4 reports: highest non-GREASE supported_versions entry, else `legacy_version`.
    pub fn version(&self) -> u16 {
        self.supported_versions
            .iter()
            .copied()
            .filter(|v| !is_grease(*v))
            .max()
            .unwrap_or(self.legacy_version)
    }
}

/// The four JA4 forms of one ClientHello.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Ja4 {
    pub ja4: String,
    pub ja4_r: String,
    pub ja4_o: String,
    pub ja4_ro: String,
}

fn version_code(v: u16) -> &'static str {
    match v {
        0x0304 => "13",
        0x0303 => "12",
        0x0302 => "11",
        0x0301 => "10",
        0x0300 => "s3",
        0x0002 => "s2",
        0xfeff => "d1",
        0xfefd => "d2",
        0xfefc => "d3",
        _ => "00",
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The ALPN part of JA4_a (see the module docs).
pub fn alpn_code(first: Option<&[u8]>) -> String {
    let Some(value) = first.filter(|v| !v.is_empty()) else {
        return "00".to_owned();
    };
    let (a, b) = (value[0], value[value.len() - 1]);
    if a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric() {
        [a as char, b as char].iter().collect()
    } else {
        [HEX[(a >> 4) as usize] as char, HEX[(b & 0x0f) as usize] as char]
            .iter()
            .collect()
    }
}

fn push_hex_list(out: &mut String, values: &[u16]) {
    // By hand: `write!(out, "{v:04x}")` goes through the formatting machinery and was most of JA4's cost.
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for shift in [12, 8, 4, 0] {
            out.push(HEX[((v >> shift) & 0x0f) as usize] as char);
        }
    }
}

fn hash12(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    let mut out = String::with_capacity(12);
    for b in &digest[..6] {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0x0f) as usize] as char);
    }
    out
}

/// `ext[_sigalgs]`, without the underscore when there are no signature algorithms.
fn ext_string(extensions: &[u16], sigalgs: &[u16]) -> String {
    let mut s = String::with_capacity(5 * (extensions.len() + sigalgs.len()) + 1);
    push_hex_list(&mut s, extensions);
    if !sigalgs.is_empty() {
        s.push('_');
        push_hex_list(&mut s, sigalgs);
    }
    s
}

/// Computes JA4, JA4_r, JA4_o and JA4_ro.
pub fn ja4(hello: &ClientHello, protocol: Protocol) -> Ja4 {
    let ciphers: Vec<u16> = hello.ciphers.iter().copied().filter(|c| !is_grease(*c)).collect();
    let extensions: Vec<u16> = hello
        .extensions
        .iter()
        .copied()
        .filter(|e| !is_grease(*e))
        .collect();
    let sigalgs: Vec<u16> = hello
        .signature_algorithms
        .iter()
        .copied()
        .filter(|s| !is_grease(*s))
        .collect();

    let a = format!(
        "{}{}{}{:02}{:02}{}",
        protocol.letter(),
        version_code(hello.version()),
        if extensions.contains(&EXT_SERVER_NAME) {
            'd'
        } else {
            'i'
        },
        ciphers.len().min(99),
        extensions.len().min(99),
        alpn_code(hello.alpn_first.as_deref()),
    );

    let mut sorted_ciphers = ciphers.clone();
    sorted_ciphers.sort_unstable();
    let mut sorted_ext: Vec<u16> = extensions
        .iter()
        .copied()
        .filter(|e| *e != EXT_SERVER_NAME && *e != EXT_ALPN)
        .collect();
    sorted_ext.sort_unstable();

    let mut c_sorted = String::new();
    push_hex_list(&mut c_sorted, &sorted_ciphers);
    let mut c_orig = String::new();
    push_hex_list(&mut c_orig, &ciphers);
    let e_sorted = if sorted_ext.is_empty() {
        String::new()
    } else {
        ext_string(&sorted_ext, &sigalgs)
    };
    let e_orig = if extensions.is_empty() {
        String::new()
    } else {
        ext_string(&extensions, &sigalgs)
    };

    let hash_or_empty = |s: &str| {
        if s.is_empty() {
            EMPTY_HASH.to_owned()
        } else {
            hash12(s)
        }
    };
    Ja4 {
        ja4: format!("{a}_{}_{}", hash_or_empty(&c_sorted), hash_or_empty(&e_sorted)),
        ja4_o: format!("{a}_{}_{}", hash_or_empty(&c_orig), hash_or_empty(&e_orig)),
        ja4_r: format!("{a}_{c_sorted}_{e_sorted}"),
        ja4_ro: format!("{a}_{c_orig}_{e_orig}"),
    }
}

/// JA4 of the first ClientHello in the first client bytes of a TCP stream (TLS records, possibly several).
pub fn ja4_from_stream(stream: &[u8]) -> Result<(ClientHello, Ja4), Ja4Error> {
    match reassembly::first_client_hello(stream) {
        Scan::Hello(msg) => {
            let hello = ClientHello::parse_message(&msg)?;
            let fp = ja4(&hello, Protocol::Tcp);
            Ok((hello, fp))
        }
        Scan::NeedMore => Err(Ja4Error::Truncated),
        Scan::Rejected(e) => Err(e),
    }
}

/// This thread's CPU time, so that a busy machine does not count other processes' time against us.
fn thread_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Userspace ClientHello → JA4 rate of one core, in ClientHellos per CPU-second of the calling thread (wall
/// clock if the thread clock is unavailable): each iteration runs a Chrome-like ClientHello (GREASE, 16
/// extensions, a 1216-byte post-quantum key share, split over two TLS records) through record reassembly,
/// parsing and all four JA4 forms.
pub fn ja4_throughput(iterations: usize) -> f64 {
    let stream = build::chrome_like().records(1000);
    let iterations = iterations.max(1);
    let (cpu_start, wall_start) = (thread_cpu_time(), Instant::now());
    let mut sink = 0usize;
    for _ in 0..iterations {
        let (_, fp) = ja4_from_stream(std::hint::black_box(&stream)).expect("sample ClientHello parses");
        sink = sink.wrapping_add(fp.ja4.len());
    }
    std::hint::black_box(sink);
    let elapsed = match (cpu_start, thread_cpu_time()) {
        (Some(a), Some(b)) if b > a => b - a,
        _ => wall_start.elapsed(),
    };
    iterations as f64 / elapsed.as_secs_f64()
}

/// Builds ClientHello bytes, for tests and benchmarks (no capture data is copied into the tree).
pub mod build {
    /// A ClientHello under construction.
    #[derive(Clone, Debug)]
    pub struct HelloBuilder {
        pub legacy_version: u16,
        pub record_version: u16,
        pub session_id: Vec<u8>,
        pub ciphers: Vec<u16>,
        /// Extensions in wire order: type and raw body. `None`: no extension block at all.
        pub extensions: Option<Vec<(u16, Vec<u8>)>>,
    }

    fn u16_list(prefix_len_bytes: usize, values: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        let len = values.len() * 2;
        if prefix_len_bytes == 2 {
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(len as u8);
        }
        for v in values {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out
    }

    /// SNI extension body for `host`.
    pub fn sni(host: &str) -> Vec<u8> {
        let mut entry = vec![0u8];
        entry.extend_from_slice(&(host.len() as u16).to_be_bytes());
        entry.extend_from_slice(host.as_bytes());
        let mut out = (entry.len() as u16).to_be_bytes().to_vec();
        out.extend(entry);
        out
    }

    /// ALPN extension body listing `protocols`.
    pub fn alpn(protocols: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for p in protocols {
            list.push(p.len() as u8);
            list.extend_from_slice(p);
        }
        let mut out = (list.len() as u16).to_be_bytes().to_vec();
        out.extend(list);
        out
    }

    /// supported_versions body (ClientHello form).
    pub fn supported_versions(versions: &[u16]) -> Vec<u8> {
        u16_list(1, versions)
    }

    /// signature_algorithms (or supported_groups) body.
    pub fn u16_vector(values: &[u16]) -> Vec<u8> {
        u16_list(2, values)
    }

    impl HelloBuilder {
        /// The handshake message: type, 24-bit length, body.
        pub fn message(&self) -> Vec<u8> {
            let mut body = Vec::new();
            body.extend_from_slice(&self.legacy_version.to_be_bytes());
            body.extend((0..32u8).map(|i| i.wrapping_mul(37)));
            body.push(self.session_id.len() as u8);
            body.extend_from_slice(&self.session_id);
            body.extend(u16_list(2, &self.ciphers));
            body.extend_from_slice(&[1, 0]);
            if let Some(exts) = &self.extensions {
                let mut block = Vec::new();
                for (kind, data) in exts {
                    block.extend_from_slice(&kind.to_be_bytes());
                    block.extend_from_slice(&(data.len() as u16).to_be_bytes());
                    block.extend_from_slice(data);
                }
                body.extend_from_slice(&(block.len() as u16).to_be_bytes());
                body.extend(block);
            }
            let mut msg = vec![super::HANDSHAKE_CLIENT_HELLO];
            msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
            msg.extend(body);
            msg
        }

        /// The message wrapped in handshake records of at most `max_fragment` bytes each.
        pub fn records(&self, max_fragment: usize) -> Vec<u8> {
            let msg = self.message();
            let mut out = Vec::new();
            for chunk in msg.chunks(max_fragment.max(1)) {
                out.push(22);
                out.extend_from_slice(&self.record_version.to_be_bytes());
                out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
                out.extend_from_slice(chunk);
            }
            out
        }
    }

    /// A Chrome-like TLS 1.3 ClientHello: GREASE cipher, extensions (first and last) and supported version,
    /// a GREASE signature algorithm, SNI, ALPN h2, and an X25519MLKEM768-sized key share, so that the whole
    /// thing is larger than one 1460-byte TCP segment. Its expected JA4 is in the unit tests.
    pub fn chrome_like() -> HelloBuilder {
        let mut key_share = Vec::new();
        let entries: [(u16, usize); 3] = [(0x2a2a, 1), (0x11ec, 1216), (0x001d, 32)];
        let mut list = Vec::new();
        for (group, len) in entries {
            list.extend_from_slice(&group.to_be_bytes());
            list.extend_from_slice(&(len as u16).to_be_bytes());
            list.extend((0..len).map(|i| (i * 7) as u8));
        }
        key_share.extend_from_slice(&(list.len() as u16).to_be_bytes());
        key_share.extend(list);
        HelloBuilder {
            legacy_version: 0x0303,
            record_version: 0x0301,
            session_id: vec![0x55; 32],
            ciphers: vec![
                0x8a8a, 0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc013,
                0xc014, 0x009c, 0x009d, 0x002f, 0x0035,
            ],
            extensions: Some(vec![
                (0x3a3a, vec![]),
                (0x001b, vec![2, 0, 2]),
                (0x0000, sni("api.example.com")),
                (0x0033, key_share),
                (0x0010, alpn(&[b"h2", b"http/1.1"])),
                (0x4469, vec![0, 3, 2, b'h', b'2']),
                (0x0017, vec![]),
                (0x002d, vec![1, 1]),
                (
                    0x000d,
                    u16_vector(&[
                        0x0a0a, 0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
                    ]),
                ),
                (0x0005, vec![1, 0, 0, 0, 0]),
                (0x0023, vec![]),
                (0x0012, vec![]),
                (0x002b, supported_versions(&[0x6a6a, 0x0304, 0x0303])),
                (0xff01, vec![0]),
                (0x000b, vec![1, 0]),
                (0x000a, u16_vector(&[0x2a2a, 0x11ec, 0x001d, 0x0017, 0x0018])),
                (0x0015, vec![0; 40]),
                (0xfafa, vec![0]),
            ]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    #[test]
    fn grease_set_is_exact() {
        let grease: Vec<u16> = (0..=u16::MAX).filter(|v| is_grease(*v)).collect();
        assert_eq!(grease.len(), 16);
        assert!(grease.iter().all(|v| v & 0x0f0f == 0x0a0a && v >> 8 == v & 0xff));
        assert!(!is_grease(0x0a1a));
    }

    #[test]
    fn spec_worked_example_hashes() {
        // technical_details/JA4.md: cipher and extension strings and their truncated hashes.
        assert_eq!(
            hash12("002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,cca9"),
            "8daaf6152771"
        );
        assert_eq!(
            hash12(
                "0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_0403,0804,0401,0503,0805,\
                 0501,0806,0601"
            ),
            "e5627efa2ab1"
        );
        assert_eq!(
            hash12("0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01"),
            "6d807ffa2a79"
        );
    }

    #[test]
    fn chrome_like_matches_the_spec_example() {
        // The builder's hello has the spec example's ciphers, extensions and sigalgs, plus GREASE everywhere.
        let hello = ClientHello::parse_message(&chrome_like().message()).unwrap();
        let fp = ja4(&hello, Protocol::Tcp);
        assert_eq!(fp.ja4, "t13d1516h2_8daaf6152771_e5627efa2ab1");
        assert_eq!(
            fp.ja4_r,
            "t13d1516h2_002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,cca9_0005,000a,\
             000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_0403,0804,0401,0503,0805,0501,0806,0601"
        );
        assert_eq!(hello.server_name.as_deref(), Some("api.example.com"));
        assert!(
            chrome_like().records(16384).len() > 1460,
            "must not fit one segment"
        );
    }

    #[test]
    fn alpn_rules() {
        assert_eq!(alpn_code(None), "00");
        assert_eq!(alpn_code(Some(b"")), "00");
        assert_eq!(alpn_code(Some(b"h2")), "h2");
        assert_eq!(alpn_code(Some(b"http/1.1")), "h1");
        assert_eq!(alpn_code(Some(b"h")), "hh");
        // The spec's examples of the hex rule.
        assert_eq!(alpn_code(Some(&[0xab])), "ab");
        assert_eq!(alpn_code(Some(&[0x20])), "20");
        assert_eq!(alpn_code(Some(&[0xab, 0xcd])), "ad");
        assert_eq!(alpn_code(Some(&[0x20, 0x61])), "21");
        assert_eq!(alpn_code(Some(&[0x30, 0xab])), "3b");
        assert_eq!(alpn_code(Some(&[0x61, 0x20])), "60");
        assert_eq!(alpn_code(Some(&[0x30, 0x31, 0xab, 0xcd])), "3d");
        assert_eq!(alpn_code(Some(&[0x30, 0xab, 0xcd, 0x31])), "01");
        // s2n-tls's tshark exceptions: "-+" → 2b, "__" → 5f.
        assert_eq!(alpn_code(Some(b"-+")), "2b");
        assert_eq!(alpn_code(Some(b"__")), "5f");
    }

    #[test]
    fn empty_lists_and_no_sigalgs() {
        let b = HelloBuilder {
            legacy_version: 0x0301,
            record_version: 0x0301,
            session_id: vec![],
            ciphers: vec![0x0a0a],
            extensions: None,
        };
        let fp = ja4(&ClientHello::parse_message(&b.message()).unwrap(), Protocol::Tcp);
        assert_eq!(fp.ja4, "t10i000000_000000000000_000000000000");
        assert_eq!(fp.ja4_r, "t10i000000__");

        // Only SNI and ALPN: counted, but the sorted list is empty.
        let b = HelloBuilder {
            extensions: Some(vec![(0x0000, sni("x")), (0x0010, alpn(&[b"h2"]))]),
            ciphers: vec![0x1301],
            ..b
        };
        let fp = ja4(&ClientHello::parse_message(&b.message()).unwrap(), Protocol::Tcp);
        assert!(fp.ja4.starts_with("t10d0102h2_"), "{}", fp.ja4);
        assert!(fp.ja4.ends_with("_000000000000"));
        assert_eq!(fp.ja4_ro, "t10d0102h2_1301_0000,0010");

        // No signature algorithms: no trailing underscore; all-GREASE sigalgs count as none.
        let b = HelloBuilder {
            extensions: Some(vec![
                (0x000a, u16_vector(&[0x001d])),
                (0x000d, u16_vector(&[0x1a1a])),
            ]),
            ..b
        };
        let fp = ja4(&ClientHello::parse_message(&b.message()).unwrap(), Protocol::Tcp);
        assert_eq!(fp.ja4_r, "t10i010200_1301_000a,000d");
    }

    #[test]
    fn counts_cap_at_99() {
        let b = HelloBuilder {
            legacy_version: 0x0303,
            record_version: 0x0301,
            session_id: vec![],
            ciphers: (1..=150).collect(),
            extensions: Some((0x100..0x100 + 120).map(|t| (t, vec![])).collect()),
        };
        let fp = ja4(&ClientHello::parse_message(&b.message()).unwrap(), Protocol::Tcp);
        assert!(fp.ja4.starts_with("t12i999900_"), "{}", fp.ja4);
    }

    #[test]
    fn version_prefers_supported_versions_without_grease() {
        let mut h = ClientHello {
            legacy_version: 0x0303,
            ..Default::default()
        };
        assert_eq!(h.version(), 0x0303);
        h.supported_versions = vec![0xfafa, 0x0303, 0x0304];
        assert_eq!(h.version(), 0x0304);
        h.supported_versions = vec![0xfafa];
        assert_eq!(h.version(), 0x0303);
        assert_eq!(version_code(0x7f1c), "00");
    }

    #[test]
    fn malformed_extension_block_is_rejected() {
        let mut msg = chrome_like().message();
        // Cut the body inside the extension block but keep the message length consistent.
        msg.truncate(msg.len() - 3);
        let len = (msg.len() - 4) as u32;
        msg[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
        assert!(matches!(
            ClientHello::parse_message(&msg),
            Err(Ja4Error::Malformed(_))
        ));
    }

    #[test]
    fn unparsable_known_extension_is_still_counted() {
        // supported_versions with a nonsense body: counted, version falls back to legacy_version.
        let b = HelloBuilder {
            legacy_version: 0x0303,
            record_version: 0x0301,
            session_id: vec![],
            ciphers: vec![0x1301],
            extensions: Some(vec![(0x002b, vec![]), (0x0017, vec![])]),
        };
        let fp = ja4(&ClientHello::parse_message(&b.message()).unwrap(), Protocol::Tcp);
        assert!(fp.ja4.starts_with("t12i0102"), "{}", fp.ja4);
    }

    #[test]
    #[ignore = "measurement; run with --ignored --nocapture"]
    fn measure_ja4_throughput() {
        let _ = ja4_throughput(2_000);
        let rate = ja4_throughput(200_000);
        println!("ClientHello → JA4 (all four forms): {rate:.0} hellos/s on one core");
    }
}
