//! The lockout guard against an independent oracle: every network as the range of 128-bit kernel keys it
//! covers (IPv4 `a.b.c.d/n` is `::ffff:a.b.c.d/96+n`, as `AddrKey::from_v4` stores it). For any management
//! networks and any target — IPv4, IPv6, IPv4-mapped, host bits set or not:
//! - `check_management` refuses exactly the targets whose range meets a management range, naming a
//!   management network it meets; `check` with `--force` and no other rule refuses exactly the same (force
//!   never overrides management);
//! - `is_management` of the first and last address of a target's range, in both spellings of an
//!   IPv4-mapped address, agrees with the oracle;
//! - `Guard::new` keeps every management range once;
//! - `listfile::check_deny` refuses a deny file exactly when one of its lines meets a management range,
//!   naming the file and line of the first such lines.
//!
//! Input: the first byte is the number of management networks (1 to 4); then networks in the format of
//! `aqd_fuzz::decode_nets`: the management ones first, the targets after.

#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aqd_fuzz::decode_nets;
use detector_user::{
    listfile,
    lockout::{Guard, LockoutError, MinPrefix, Verb},
};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;

const VERBS: [Verb; 5] = [
    Verb::Block,
    Verb::Throttle,
    Verb::Monitor,
    Verb::Deny,
    Verb::Disallow,
];
const DENY_FILE: &str = "/etc/aqd/deny.fuzz";

/// The first and last kernel key a network covers.
fn range(net: IpNet) -> (u128, u128) {
    let (addr, len) = match net {
        IpNet::V4(n) => (
            (0xffff_u128 << 32) | u128::from(u32::from(n.addr())),
            96 + u32::from(n.prefix_len()),
        ),
        IpNet::V6(n) => (u128::from(n.addr()), u32::from(n.prefix_len())),
    };
    let host = u128::MAX.checked_shr(len).unwrap_or(0);
    (addr & !host, addr | host)
}

fn meets(a: (u128, u128), b: (u128, u128)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// A kernel key as an address, in every spelling the CLI accepts for it.
fn spellings(key: u128) -> Vec<IpAddr> {
    let v6 = Ipv6Addr::from(key);
    let mut out = vec![IpAddr::V6(v6)];
    if key >> 32 == 0xffff {
        out.push(IpAddr::V4(Ipv4Addr::from(key as u32)));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let nets = decode_nets(rest);
    let managed = usize::from(count % 4) + 1;
    if nets.len() <= managed {
        return;
    }
    let (management, targets) = nets.split_at(managed);
    let guard = Guard::new(management.iter().copied());
    let ranges: Vec<(u128, u128)> = management.iter().map(|m| range(*m)).collect();

    // Every management range is kept, and only once.
    let kept: Vec<(u128, u128)> = guard.management().iter().map(|m| range(*m)).collect();
    for r in &ranges {
        assert_eq!(
            kept.iter().filter(|k| *k == r).count(),
            1,
            "{management:?} kept as {kept:?}"
        );
    }
    assert!(
        kept.iter().all(|k| ranges.contains(k)),
        "{management:?} kept as {kept:?}"
    );

    for (i, &target) in targets.iter().enumerate() {
        let t = range(target);
        let expected = ranges.iter().any(|m| meets(*m, t));
        let verb = VERBS[i % VERBS.len()];
        match guard.check_management(verb, target) {
            Ok(()) => assert!(!expected, "{target} passed but meets one of {management:?}"),
            Err(LockoutError::Management { network, .. }) => {
                assert!(expected, "{target} refused but meets none of {management:?}");
                assert!(meets(range(network), t), "{target} refused naming {network}");
                assert!(guard.management().contains(&network));
            }
            Err(e) => panic!("check_management gave another refusal: {e}"),
        }
        let none = MinPrefix { v4: 0, v6: 0 };
        let forced = guard.check(verb, target, true, &[], none);
        assert_eq!(forced.is_err(), expected, "{target} with --force: {forced:?}");
        for key in [t.0, t.1] {
            let inside = ranges.iter().any(|m| m.0 <= key && key <= m.1);
            for addr in spellings(key) {
                assert_eq!(guard.is_management(addr), inside, "{addr} in {management:?}");
            }
        }
    }

    // List files refuse host bits: the file holds the targets' networks.
    let text: String = targets.iter().map(|t| format!("{}\n", t.trunc())).collect();
    let numbered = listfile::parse_numbered(&text).expect("printed networks parse");
    assert_eq!(numbered.len(), targets.len(), "{text}");
    for ((line, net), (index, target)) in numbered.iter().zip(targets.iter().enumerate()) {
        assert_eq!(*line, index + 1);
        assert_eq!(range(*net), range(*target), "{target} read back as {net}");
    }
    let touching: Vec<usize> = numbered
        .iter()
        .filter(|(_, net)| ranges.iter().any(|m| meets(*m, range(*net))))
        .map(|(line, _)| *line)
        .collect();
    match listfile::check_deny(Path::new(DENY_FILE), &numbered, &guard) {
        Ok(()) => assert!(
            touching.is_empty(),
            "{text} accepted; lines {touching:?} meet {management:?}"
        ),
        Err(message) => {
            assert!(!touching.is_empty(), "{text} refused: {message}");
            for line in touching.iter().take(10) {
                assert!(
                    message.contains(&format!("{DENY_FILE}:{line}: ")),
                    "line {line} not named: {message}"
                );
            }
        }
    }
});
