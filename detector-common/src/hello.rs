//! The kernel's ClientHello key: an order-independent 64-bit digest of exactly what JA4 depends on, so the
//! XDP program can recognise a fingerprint in the ClientHello packet itself and drop it at line rate.
//!
//! JA4 sorts the cipher and extension lists and hashes them with SHA-256; sorting and SHA-256 are out of reach
//! of a verifier-friendly program. The key instead *adds up* a mixed value per list entry (addition commutes,
//! so wire order does not matter, duplicates count like JA4's sorted lists keep them) and chains the signature
//! algorithms in order (JA4 keeps their order). Every input is one that JA4_r spells out, so userspace can
//! compute the key of a JA4_r string without seeing traffic, and JA4 values map to keys through the JA4_r of the
//! ClientHellos the daemon has seen. GREASE values are skipped everywhere, as JA4 does.

/// `0x?a?a` with equal bytes (draft-davidben-tls-grease).
#[inline(always)]
pub const fn is_grease(v: u16) -> bool {
    (v & 0x0f0f) == 0x0a0a && (v >> 8) == (v & 0xff)
}

/// JA4's two-character TLS version code (`13`, `12`, …, `00` for unknown versions).
#[inline(always)]
pub const fn version_code(v: u16) -> [u8; 2] {
    match v {
        0x0304 => *b"13",
        0x0303 => *b"12",
        0x0302 => *b"11",
        0x0301 => *b"10",
        0x0300 => *b"s3",
        0x0002 => *b"s2",
        0xfeff => *b"d1",
        0xfefd => *b"d2",
        0xfefc => *b"d3",
        _ => *b"00",
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[inline(always)]
const fn is_alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// JA4's ALPN characters from the first and last byte of the first ALPN value (spec rule: the bytes
/// themselves when both are ASCII alphanumeric, else the first hex digit of the first byte and the last hex
/// digit of the last). `00` when there is no ALPN value is the caller's case.
#[inline(always)]
pub const fn alpn_chars(first: u8, last: u8) -> [u8; 2] {
    if is_alnum(first) && is_alnum(last) {
        [first, last]
    } else {
        [HEX[(first >> 4) as usize], HEX[(last & 0x0f) as usize]]
    }
}

/// TLS extension types the key treats specially (JA4 leaves SNI and ALPN out of the extension list).
pub const EXT_SERVER_NAME: u16 = 0x0000;
pub const EXT_ALPN: u16 = 0x0010;
pub const EXT_SIGNATURE_ALGORITHMS: u16 = 0x000d;
pub const EXT_SUPPORTED_VERSIONS: u16 = 0x002b;

const TAG_CIPHER: u64 = 1 << 16;
const TAG_EXTENSION: u64 = 2 << 16;
/// Start value of the signature-algorithm chain.
pub const SIGALG_SEED: u64 = 0x5349_4741_4c47_5321;

/// The splitmix64 finaliser: a cheap, well-spread 64-bit mix (no loops, no tables).
#[inline(always)]
pub const fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Contribution of one (non-GREASE) cipher suite to [`HelloKeyParts::cipher_sum`].
#[inline(always)]
pub const fn cipher_item(v: u16) -> u64 {
    mix64(TAG_CIPHER | v as u64)
}

/// Contribution of one (non-GREASE, non-SNI, non-ALPN) extension type to [`HelloKeyParts::extension_sum`].
#[inline(always)]
pub const fn extension_item(v: u16) -> u64 {
    mix64(TAG_EXTENSION | v as u64)
}

/// One step of the signature-algorithm chain (order matters, as in JA4).
#[inline(always)]
pub const fn sigalg_step(chain: u64, v: u16) -> u64 {
    mix64(chain ^ v as u64)
}

/// Everything the key covers — the information content of a JA4_r string.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HelloKeyParts {
    /// [`version_code`] of the JA4 version.
    pub version: [u8; 2],
    /// 1 when the SNI extension is present (JA4 `d`), 0 otherwise (`i`).
    pub sni: u8,
    /// Non-GREASE cipher suites, capped at 99 like JA4.
    pub cipher_count: u8,
    /// Non-GREASE extensions (SNI and ALPN included), capped at 99.
    pub extension_count: u8,
    /// JA4's ALPN characters (`00` without ALPN).
    pub alpn: [u8; 2],
    /// Wrapping sum of [`cipher_item`] over the non-GREASE cipher suites.
    pub cipher_sum: u64,
    /// Wrapping sum of [`extension_item`] over the non-GREASE extensions other than SNI and ALPN.
    pub extension_sum: u64,
    /// [`sigalg_step`] chained from [`SIGALG_SEED`] over the non-GREASE signature algorithms in order.
    pub sigalg_chain: u64,
}

impl HelloKeyParts {
    /// The key; never 0 (0 means "no key" in maps and events).
    #[inline(always)]
    pub const fn key(&self) -> u64 {
        let small = (self.version[0] as u64)
            | (self.version[1] as u64) << 8
            | (self.sni as u64) << 16
            | (self.cipher_count as u64) << 24
            | (self.extension_count as u64) << 32
            | (self.alpn[0] as u64) << 40
            | (self.alpn[1] as u64) << 48;
        let mut h = mix64(small);
        h = mix64(h ^ self.cipher_sum);
        h = mix64(h ^ self.extension_sum);
        h = mix64(h ^ self.sigalg_chain);
        if h == 0 { 1 } else { h }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(ciphers: &[u16], exts: &[u16], sigalgs: &[u16]) -> HelloKeyParts {
        let mut p = HelloKeyParts {
            version: version_code(0x0304),
            alpn: *b"h2",
            sigalg_chain: SIGALG_SEED,
            ..Default::default()
        };
        for &c in ciphers {
            p.cipher_sum = p.cipher_sum.wrapping_add(cipher_item(c));
        }
        for &e in exts {
            p.extension_sum = p.extension_sum.wrapping_add(extension_item(e));
        }
        for &s in sigalgs {
            p.sigalg_chain = sigalg_step(p.sigalg_chain, s);
        }
        p
    }

    #[test]
    fn lists_are_order_independent_but_sigalgs_are_not() {
        let a = parts(&[0x1301, 0x1302, 0xc02b], &[0x000a, 0x000b], &[0x0403, 0x0804]);
        let b = parts(&[0xc02b, 0x1301, 0x1302], &[0x000b, 0x000a], &[0x0403, 0x0804]);
        let c = parts(&[0xc02b, 0x1301, 0x1302], &[0x000b, 0x000a], &[0x0804, 0x0403]);
        let d = parts(&[0x1301, 0x1302], &[0x000a, 0x000b], &[0x0403, 0x0804]);
        assert_eq!(a.key(), b.key());
        assert_ne!(a.key(), c.key());
        assert_ne!(a.key(), d.key());
    }

    #[test]
    fn grease_and_alpn_rules() {
        assert!(is_grease(0x0a0a) && is_grease(0xfafa));
        assert!(!is_grease(0x0a1a));
        assert_eq!(alpn_chars(b'h', b'2'), *b"h2");
        assert_eq!(alpn_chars(0xab, 0xcd), *b"ad");
        assert_eq!(alpn_chars(0x30, 0xab), *b"3b");
    }
}
