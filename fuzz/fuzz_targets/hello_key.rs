//! The ClientHello key (`fingerprint::hello_key`), differential: for any bytes that parse as a ClientHello
//! message, the kernel key computed from the parsed hello (what the daemon installs for a seen client) and the
//! key computed from its JA4_r string (what `aqd fp block JA4_r` installs before any such client was seen) are
//! the same, part by part. Any UTF-8 input is also read as a JA4_r string: no panic, the counts stay two
//! digits, and `key_of_ja4_r` is the key of `parts_of_ja4_r`.

#![no_main]

use detector_user::fingerprint::{
    hello_key::{key_of_client_hello, key_of_ja4_r, parts_of_client_hello, parts_of_ja4_r},
    ja4::{self, ClientHello, Protocol},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(hello) = ClientHello::parse_message(data) {
        let fp = ja4::ja4(&hello, Protocol::Tcp);
        let from_hello = parts_of_client_hello(&hello);
        let from_ja4_r = parts_of_ja4_r(&fp.ja4_r).unwrap_or_else(|e| panic!("{}: {e}", fp.ja4_r));
        assert_eq!(from_hello, from_ja4_r, "{}", fp.ja4_r);
        assert_eq!(key_of_client_hello(&hello), key_of_ja4_r(&fp.ja4_r).unwrap());
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(parts) = parts_of_ja4_r(text)
    {
        assert!(
            parts.cipher_count <= 99 && parts.extension_count <= 99,
            "{parts:?}"
        );
        assert_eq!(key_of_ja4_r(text), Ok(parts.key()));
    }
});
