//! The userspace SYN parser: any bytes as an IPv4/IPv6 packet through `syn::parse_ip_tcp`, what
//! `aqd fingerprint` and the live pipeline's verdict keys use. Checked besides "no panic": the signature stays
//! in its bounds; its p0f text (`signature_text`, as `aqd fingerprint` prints it) parses back as a p0f
//! signature with the same fields, and a database holding only that signature matches the SYN exactly — the
//! printer, the parser and the matcher agree (for SYNs within 35 hops of their initial TTL, which p0f's
//! `TTL+?` form leaves out, and with fewer options than the signature keeps).

#![no_main]

use detector_common::syn::{SYN_MAX_OPTIONS, initial_ttl};
use detector_user::fingerprint::{
    p0f::{P0fDb, parse_signature},
    syn::{self, MAX_DIST},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = syn::parse_ip_tcp(data) else {
        return;
    };
    let sig = &parsed.signature;
    assert!(matches!(sig.ip_version, 4 | 6));
    assert!(sig.option_count as usize <= SYN_MAX_OPTIONS);
    assert!(usize::from(parsed.header_len) >= if sig.ip_version == 4 { 40 } else { 60 });
    assert!(sig.ip_opts_len <= 40);
    let text = syn::signature_text(sig, Some(parsed.header_len));
    std::hint::black_box(sig.key());
    if initial_ttl(sig.ttl) - sig.ttl > MAX_DIST {
        // Printed as `TTL+?`, which p0f's own format has no parse for.
        assert!(text.contains("+?:"), "{text}");
        return;
    }
    let p0f = parse_signature(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    if sig.option_count as usize == SYN_MAX_OPTIONS {
        // Possibly more options than the signature keeps (16, p0f keeps 24): the text, like the kernel's
        // key, describes the first 16 only, and an EOL past them still sets the padding.
        return;
    }
    assert_eq!(p0f.ip_version, Some(sig.ip_version), "{text}");
    assert_eq!(p0f.ttl, initial_ttl(sig.ttl), "{text}");
    assert_eq!(p0f.mss, Some(sig.mss), "{text}");
    assert_eq!(p0f.wscale, Some(sig.wscale), "{text}");
    assert_eq!(p0f.layout, syn::options(sig), "{text}");
    assert_eq!(p0f.eol_pad, sig.eol_pad, "{text}");
    assert_eq!(p0f.quirks, sig.quirks, "{text}");
    assert_eq!(p0f.payload, Some(sig.payload != 0), "{text}");
    let db = P0fDb::parse(&format!(
        "classes = unix\n[tcp:request]\nlabel = s:unix:Fuzz:1\nsig = {text}\n"
    ))
    .unwrap_or_else(|e| panic!("{text}: {e}"));
    let matched = db
        .match_syn(sig, Some(parsed.header_len))
        .unwrap_or_else(|| panic!("{text} does not match its own SYN"));
    assert!(!matched.fuzzy, "{text}");
    assert_eq!(matched.distance, initial_ttl(sig.ttl) - sig.ttl, "{text}");
});
