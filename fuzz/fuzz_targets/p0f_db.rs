//! The p0f database: any UTF-8 through `P0fDb::parse`, what `[fingerprints] p0f_db` and
//! `aqd fingerprint --p0f` load. Checked besides "no panic": a refused file names a line of the text; every
//! signature parses again from its own text to the same fields, points at a label, and matches a SYN built
//! from its fields (the parser and the matcher agree on what a signature means).

#![no_main]

use detector_common::syn::{SYN_MAX_OPTIONS, SynSignature, quirk};
use detector_user::fingerprint::p0f::{P0fDb, P0fSignature, WindowSpec, parse_signature};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let db = match P0fDb::parse(text) {
        Ok(db) => db,
        Err(e) => {
            assert!(e.line >= 1 && e.line <= text.lines().count(), "{e}");
            return;
        }
    };
    for sig in &db.signatures {
        assert!(sig.label < db.labels.len());
        let again = parse_signature(&sig.text).expect("a signature's own text parses");
        assert_eq!(
            P0fSignature {
                line: sig.line,
                label: sig.label,
                ..again
            },
            *sig
        );
        if let Some(syn) = syn_of(sig) {
            let matched = db.match_syn(&syn, None);
            assert!(matched.is_some(), "{} does not match {syn:?}", sig.text);
        }
    }
});

/// A SYN with exactly the signature's fields (wildcards filled in, the TTL at its initial value); `None` for
/// the window forms whose SYN is not simply written down (`mtu*N`; `mss*N` below p0f's 100-byte MSS floor or
/// past 65,535).
fn syn_of(sig: &P0fSignature) -> Option<SynSignature> {
    let ip_version = sig.ip_version.unwrap_or(4);
    let mut options = [0u8; SYN_MAX_OPTIONS];
    options[..sig.layout.len()].copy_from_slice(&sig.layout);
    let mss = sig.mss.unwrap_or(1460);
    let window = match sig.window {
        WindowSpec::Any => 0,
        WindowSpec::Exact(w) | WindowSpec::Modulo(w) => w,
        WindowSpec::Mss(n) if mss >= 100 => u16::try_from(u32::from(mss) * u32::from(n)).ok()?,
        WindowSpec::Mss(_) | WindowSpec::Mtu(_) => return None,
    };
    // Quirks a `*` signature drops for an IPv4 SYN.
    let quirks = if sig.ip_version.is_none() {
        sig.quirks & !quirk::FLOW
    } else {
        sig.quirks
    };
    Some(SynSignature {
        ip_version,
        ttl: sig.ttl,
        ip_opts_len: sig.ip_opts_len,
        mss,
        window,
        wscale: sig.wscale.unwrap_or(0),
        quirks,
        option_count: sig.layout.len() as u8,
        options,
        eol_pad: sig.eol_pad,
        payload: u8::from(sig.payload == Some(true)),
        ..Default::default()
    })
}
