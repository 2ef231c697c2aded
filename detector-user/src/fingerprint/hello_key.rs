//! The kernel's ClientHello key (`detector_common::hello`) computed in userspace: from a parsed
//! [`ClientHello`] (what the daemon reassembled), and from a JA4_r string (which spells out everything the key
//! covers), so a JA4 verdict can be installed in `HELLO_VERDICTS` before that client has ever been seen.
//!
//! Mirrors `detector-ebpf/src/hello.rs`: GREASE skipped everywhere; counts capped at 99; SNI and ALPN counted
//! but left out of the extension sum; signature algorithms chained in wire order; the ALPN characters by the
//! JA4 spec's rule (`00` without a first ALPN value).

use detector_common::hello::{
    EXT_ALPN, EXT_SERVER_NAME, HelloKeyParts, SIGALG_SEED, alpn_chars, cipher_item, extension_item,
    is_grease, sigalg_step, version_code,
};

use super::ja4::ClientHello;

/// Why a JA4_r string has no key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a JA4_r string: {0}")]
pub struct Ja4rError(pub String);

/// The key parts of a parsed ClientHello.
pub fn parts_of_client_hello(hello: &ClientHello) -> HelloKeyParts {
    let mut parts = HelloKeyParts {
        version: version_code(hello.version()),
        sigalg_chain: SIGALG_SEED,
        alpn: *b"00",
        ..Default::default()
    };
    let mut ciphers = 0usize;
    for &c in hello.ciphers.iter().filter(|c| !is_grease(**c)) {
        parts.cipher_sum = parts.cipher_sum.wrapping_add(cipher_item(c));
        ciphers += 1;
    }
    let mut extensions = 0usize;
    for &e in hello.extensions.iter().filter(|e| !is_grease(**e)) {
        extensions += 1;
        match e {
            EXT_SERVER_NAME => parts.sni = 1,
            EXT_ALPN => {}
            _ => parts.extension_sum = parts.extension_sum.wrapping_add(extension_item(e)),
        }
    }
    parts.cipher_count = ciphers.min(99) as u8;
    parts.extension_count = extensions.min(99) as u8;
    if let Some(first) = hello.alpn_first.as_deref().filter(|v| !v.is_empty()) {
        parts.alpn = alpn_chars(first[0], first[first.len() - 1]);
    }
    for &s in hello.signature_algorithms.iter().filter(|s| !is_grease(**s)) {
        parts.sigalg_chain = sigalg_step(parts.sigalg_chain, s);
    }
    parts
}

/// The kernel's key of a parsed ClientHello.
pub fn key_of_client_hello(hello: &ClientHello) -> u64 {
    parts_of_client_hello(hello).key()
}

fn hex_list(s: &str, what: &str) -> Result<Vec<u16>, Ja4rError> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|v| {
            if v.len() != 4 {
                return Err(Ja4rError(format!("{what} entry '{v}' is not 4 hex digits")));
            }
            u16::from_str_radix(v, 16).map_err(|_| Ja4rError(format!("{what} entry '{v}' is not hex")))
        })
        .collect()
}

/// The key parts a JA4_r string describes (`t13d1516h2_002f,0035,…_0005,000a,…_0403,0804,…`).
pub fn parts_of_ja4_r(ja4_r: &str) -> Result<HelloKeyParts, Ja4rError> {
    let s = ja4_r.trim();
    let fields: Vec<&str> = s.split('_').collect();
    if !(3..=4).contains(&fields.len()) {
        return Err(Ja4rError(format!(
            "'{s}' has {} '_'-separated parts, expected 3 or 4",
            fields.len()
        )));
    }
    let a = fields[0].as_bytes();
    if a.len() != 10 || !a.is_ascii() {
        return Err(Ja4rError(format!(
            "'{}' is not a 10-character JA4 prefix",
            fields[0]
        )));
    }
    if !matches!(a[0], b't' | b'q' | b'd') {
        return Err(Ja4rError(format!("protocol '{}' is not t, q or d", a[0] as char)));
    }
    let version = [a[1], a[2]];
    if !a[1].is_ascii_alphanumeric() || !a[2].is_ascii_alphanumeric() {
        return Err(Ja4rError(format!(
            "version '{}' is not a JA4 version code",
            &fields[0][1..3]
        )));
    }
    let sni = match a[3] {
        b'd' => 1,
        b'i' => 0,
        other => return Err(Ja4rError(format!("SNI flag '{}' is not d or i", other as char))),
    };
    let count = |i: usize, what: &str| -> Result<u8, Ja4rError> {
        fields[0][i..i + 2]
            .parse::<u8>()
            .ok()
            .filter(|_| a[i].is_ascii_digit() && a[i + 1].is_ascii_digit())
            .ok_or_else(|| {
                Ja4rError(format!(
                    "{what} count '{}' is not two digits",
                    &fields[0][i..i + 2]
                ))
            })
    };
    let cipher_count = count(4, "cipher")?;
    let extension_count = count(6, "extension")?;
    let alpn = [a[8], a[9]];
    if !alpn.iter().all(u8::is_ascii_alphanumeric) {
        return Err(Ja4rError(format!(
            "ALPN '{}' is not two alphanumerics",
            &fields[0][8..10]
        )));
    }
    let ciphers = hex_list(fields[1], "cipher")?;
    let extensions = hex_list(fields[2], "extension")?;
    let sigalgs = match fields.get(3) {
        Some(f) => hex_list(f, "signature algorithm")?,
        None => Vec::new(),
    };
    if ciphers.len().min(99) != cipher_count as usize {
        return Err(Ja4rError(format!(
            "{} ciphers listed but the prefix says {cipher_count}",
            ciphers.len()
        )));
    }
    // The list leaves out SNI and ALPN, which the count includes.
    if extensions.len().min(99) > extension_count as usize {
        return Err(Ja4rError(format!(
            "{} extensions listed but the prefix says {extension_count}",
            extensions.len()
        )));
    }
    let mut parts = HelloKeyParts {
        version,
        sni,
        cipher_count,
        extension_count,
        alpn,
        sigalg_chain: SIGALG_SEED,
        ..Default::default()
    };
    for c in ciphers {
        parts.cipher_sum = parts.cipher_sum.wrapping_add(cipher_item(c));
    }
    for e in extensions {
        parts.extension_sum = parts.extension_sum.wrapping_add(extension_item(e));
    }
    for s in sigalgs {
        parts.sigalg_chain = sigalg_step(parts.sigalg_chain, s);
    }
    Ok(parts)
}

/// The kernel's key of the ClientHellos a JA4_r string describes.
pub fn key_of_ja4_r(ja4_r: &str) -> Result<u64, Ja4rError> {
    parts_of_ja4_r(ja4_r).map(|p| p.key())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::ja4::{Protocol, build, ja4};

    #[test]
    fn key_of_ja4_r_matches_key_of_the_hello() {
        let hello = build::chrome_like();
        let parsed = ClientHello::parse_message(&hello.message()).unwrap();
        let fp = ja4(&parsed, Protocol::Tcp);
        assert_eq!(key_of_ja4_r(&fp.ja4_r).unwrap(), key_of_client_hello(&parsed));
    }

    #[test]
    fn bad_ja4_r_strings_are_refused() {
        for s in ["", "t13d", "t13d0101h2_zzzz_", "x13d0100h2__", "t13d0200h2_1301_"] {
            assert!(key_of_ja4_r(s).is_err(), "{s}");
        }
        assert!(key_of_ja4_r("t13i0100h2_1301_").is_ok());
    }
}
