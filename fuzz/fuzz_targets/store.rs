//! The durable state store's reader (`store::Store::open`) on damaged, torn and crafted files: the snapshot,
//! the journal and their previous generations. Whatever the files hold, opening never panics and never fails
//! (damage is reported and skipped), and the store stays consistent:
//! - opening twice loads the same state;
//! - a change written after opening (even onto a torn last line) is there after the next open;
//! - a compaction loads back to exactly the state it saved (minus what had expired).
//!
//! Input: byte 0 is a flag byte (bit 0: prefix every line with its correct CRC-32, so that the fuzzer reaches
//! the JSON and the replay rules rather than only the checksum check); the rest is split at 0x00 bytes into
//! `state.json`, `journal.jsonl`, `state.prev.json` and `journal.prev.jsonl` (missing parts: no file).

#![no_main]

use std::{fs, path::PathBuf, sync::LazyLock};

use detector_common::{Action, Origin};
use detector_user::store::{State, Store, StoredDecision};
use libfuzzer_sys::fuzz_target;

const FILES: [&str; 4] = [
    "state.json",
    "journal.jsonl",
    "state.prev.json",
    "journal.prev.jsonl",
];
const WITH_CHECKSUMS: u8 = 1;

/// One directory per fuzzing process, on tmpfs (the store fsyncs).
static DIR: LazyLock<PathBuf> =
    LazyLock::new(|| PathBuf::from(format!("/dev/shm/aqd-fuzz-store-{}", std::process::id())));

fn with_checksums(part: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(part.len() + 16);
    for line in part.split(|b| *b == b'\n') {
        out.extend_from_slice(format!("{:08x} ", crc32fast::hash(line)).as_bytes());
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out
}

fn decision() -> StoredDecision {
    StoredDecision {
        target: "192.0.2.0/24".parse().expect("a network"),
        action: Action::Block,
        rate_class: 0,
        reason: "fuzz".into(),
        origin: Origin::Cli,
        force: false,
        set_unix_ms: 1,
        expires_unix_ms: None,
    }
}

/// `state` without what a compaction at Unix ms 0 drops (an expiry of 0 has passed).
fn live_at_zero(state: &State) -> State {
    let mut live = state.clone();
    live.decisions.retain(|_, d| d.expires_unix_ms != Some(0));
    live.allow.retain(|_, e| e.expires_unix_ms != Some(0));
    live.deny.retain(|_, e| e.expires_unix_ms != Some(0));
    live.fingerprints.retain(|_, f| f.expires_unix_ms != Some(0));
    live
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let dir = &*DIR;
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).expect("a scratch directory on /dev/shm");
    for (name, part) in FILES.iter().zip(rest.split(|b| *b == 0)) {
        let bytes = if flags & WITH_CHECKSUMS != 0 {
            with_checksums(part)
        } else {
            part.to_vec()
        };
        fs::write(dir.join(name), bytes).expect("writing a state file");
    }

    let (store, _report) = Store::open(dir).expect("damage is reported, never fatal");
    let loaded = store.state().clone();
    drop(store);
    let (mut store, _) = Store::open(dir).expect("opens again");
    assert_eq!(store.state(), &loaded, "a second open loaded another state");

    let mut expected = loaded.clone();
    let d = decision();
    expected.decisions.insert(d.target, d.clone());
    store.put_decisions(vec![d]).expect("a write to tmpfs");
    assert_eq!(store.state(), &expected);
    drop(store);
    let (mut store, _) = Store::open(dir).expect("opens again");
    assert_eq!(
        store.state(),
        &expected,
        "the change written after opening was lost"
    );

    store.compact(0).expect("a compaction on tmpfs");
    let compacted = live_at_zero(&expected);
    assert_eq!(store.state(), &compacted);
    drop(store);
    let (store, report) = Store::open(dir).expect("opens again");
    assert_eq!(
        report.snapshot,
        Some(dir.join(FILES[0])),
        "the fresh snapshot was not used: {report:?}"
    );
    assert_eq!(store.state(), &compacted, "the compacted state did not load back");
});
