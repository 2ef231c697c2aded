//! Capture files: any bytes as a pcap or pcapng file through `offline::fingerprint_reader`, what
//! `aqd fingerprint FILE` runs (magic, pcap/pcapng blocks, link layers, IP, TCP, reassembly, JA4, SYN
//! signatures matched against a small p0f database). Checked besides "no panic": every record has its fixed
//! shape (36-character JA4s, the SYN key in 16 hex digits, a label only from the database); the counts add up.

#![no_main]

use std::{io::Cursor, path::Path, sync::LazyLock};

use aqd_fuzz::P0F_DB;
use detector_user::fingerprint::{OfflineRecord, offline::fingerprint_reader, p0f::P0fDb};
use libfuzzer_sys::fuzz_target;

static DB: LazyLock<P0fDb> = LazyLock::new(|| P0fDb::parse(P0F_DB).expect("the fuzz p0f database parses"));

fuzz_target!(|data: &[u8]| {
    let db = &*DB;
    let Ok((records, stats)) = fingerprint_reader(Cursor::new(data), Path::new("fuzz.pcap"), Some(db)) else {
        return;
    };
    assert!(
        stats.tcp_segments + stats.unsupported_link + stats.skipped <= stats.frames,
        "{stats:?}"
    );
    let syns = records
        .iter()
        .filter(|r| matches!(r, OfflineRecord::Syn(_)))
        .count() as u64;
    assert!(records.len() as u64 <= 2 * stats.tcp_segments, "{stats:?}");
    assert!(syns <= stats.tcp_segments);
    for record in &records {
        match record {
            OfflineRecord::ClientHello(r) => {
                for fp in [&r.ja4, &r.ja4_o] {
                    assert_eq!(fp.len(), 36, "{fp}");
                }
                assert!(r.ja4_r.starts_with(&r.ja4[..11]), "{} {}", r.ja4, r.ja4_r);
            }
            OfflineRecord::Syn(r) => {
                assert_eq!(r.key.len(), 16, "{}", r.key);
                assert!(r.key.bytes().all(|b| b.is_ascii_hexdigit()));
                if let Some(label) = &r.label {
                    assert!(db.labels.iter().any(|l| &l.text == label), "{label}");
                }
                assert!(!r.signature.is_empty());
            }
        }
        std::hint::black_box(record.to_string());
    }
});
