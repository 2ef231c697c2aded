//! Kernel fixture tests of the fingerprint path (`aqd_tcp`, `aqd_hello`), through `BPF_PROG_TEST_RUN` of
//! `aqd_xdp` with crafted frames:
//! - SYN signatures: for every option kind, EOL padding, malformed and truncated options, long NOP runs, IP
//!   options, IPv6 extension headers, the IP/TCP quirks, payload and Ethernet padding, random shapes and the
//!   real SYNs of the shared captures, the connection event's signature equals the userspace parser's
//!   (`detector_user::fingerprint::syn::parse_ip_tcp`) on the same bytes — never `XDP_ABORTED`, one reason;
//! - SYN verdicts: block, throttle, monitor, expiry;
//! - ClientHello keys: every TCP ClientHello of the shared JA4 vectors, keyed by the kernel when it fits its
//!   buffer, with the key userspace computes from the parsed ClientHello and from the expected JA4_r;
//!   verdicts by key; split, non-TLS, garbage and fuzzed ClientHellos;
//! - capture (offsets, event budget) and request / flow-end events.
//!
//! Needs root (it loads the program).

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aqd_tests::{
    fp::{block_verdict, client_hello_record, hello_key_of_record, syn_key_of, verdict},
    kernel::{KernelUnderTest, Outcome, XDP_ABORTED, XDP_DROP, XDP_PASS},
    packet::{
        ETH_P_IPV4, ETH_P_IPV6, Ipv6Ext, Segment, ethernet, ipv4_nop_options, tcp_flag,
        with_ethernet_padding, with_ipv4_options, with_ipv6_ext_headers,
    },
};
use detector_common::{
    Action, CONFIG_FLAG_CAPTURE, CONFIG_FLAG_CONN_EVENTS, CONFIG_FLAG_REQUEST_EVENTS, Config, Reason,
    SynSignature,
    flow::{CAPTURE_BYTES, CAPTURE_CHUNK, CAPTURE_MAX_EVENTS, HELLO_BUF, hello_status},
};
use detector_user::{
    events::{Event, FlowActivity},
    fingerprint::{
        hello_key::{key_of_client_hello, key_of_ja4_r},
        ja4::{ClientHello, build},
        offline,
        reassembly::StreamBuffer,
        syn::{TCP_ACK, TCP_SYN, parse_ip_tcp},
    },
    maps::rate_class_limits,
};
use rand::{Rng, SeedableRng, rngs::SmallRng};

const T0: u64 = 1_000_000_000_000;
const PORT: u16 = 443;
const MS: u64 = 1_000_000;

fn load() -> KernelUnderTest {
    let mut k = KernelUnderTest::load(T0).expect("loading the XDP program (kernel tests need root)");
    k.maps.set_protected_ports(&[PORT]).unwrap();
    k.set_config(Config {
        flags: CONFIG_FLAG_CONN_EVENTS | CONFIG_FLAG_CAPTURE | CONFIG_FLAG_REQUEST_EVENTS,
        ..Config::default()
    })
    .unwrap();
    k
}

/// Runs a frame: never aborted, exactly one reason (checked by `classify`).
fn run(k: &mut KernelUnderTest, frame: &[u8], what: &str) -> Outcome {
    let out = k.classify(frame).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert_ne!(out.action, XDP_ABORTED, "{what}");
    assert_eq!(out.action, out.reason.verdict().xdp_action(), "{what}");
    out
}

fn expect(k: &mut KernelUnderTest, frame: &[u8], reason: Reason, what: &str) {
    let out = run(k, frame, what);
    assert_eq!(out.reason, reason, "{what}");
}

struct Conn {
    syn: SynSignature,
    syn_key: u64,
    action: u8,
    dropped: bool,
    isn: u32,
}

/// The one connection event the last packets produced (other kinds are ignored).
fn one_conn(k: &mut KernelUnderTest, what: &str) -> Conn {
    let conns: Vec<Conn> = k
        .drain_events()
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            Event::Conn {
                syn,
                syn_key,
                action,
                dropped,
                isn,
                ..
            } => Some(Conn {
                syn,
                syn_key,
                action,
                dropped,
                isn,
            }),
            _ => None,
        })
        .collect();
    assert_eq!(conns.len(), 1, "{what}: connection events");
    conns.into_iter().next().unwrap()
}

struct Payload {
    stream_offset: u32,
    segment_len: u16,
    hello_key: u64,
    hello_status: u8,
    action: u8,
    data: Vec<u8>,
}

fn payloads(events: &[Event]) -> Vec<Payload> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Payload {
                stream_offset,
                segment_len,
                hello_key,
                hello_status,
                action,
                data,
                ..
            } => Some(Payload {
                stream_offset: *stream_offset,
                segment_len: *segment_len,
                hello_key: *hello_key,
                hello_status: *hello_status,
                action: *action,
                data: data.clone(),
            }),
            _ => None,
        })
        .collect()
}

fn requests(events: &[Event]) -> Vec<FlowActivity> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Request(a) => Some(*a),
            _ => None,
        })
        .collect()
}

fn flow_ends(events: &[Event]) -> Vec<FlowActivity> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::FlowEnd(a) => Some(*a),
            _ => None,
        })
        .collect()
}

/// The kernel's signature of `frame` (a SYN to a protected port) must be the userspace parser's on the same
/// bytes (everything after the Ethernet header, padding included: both read options up to the frame's end).
fn check_parity(k: &mut KernelUnderTest, frame: &[u8], what: &str) -> SynSignature {
    let _ = k.drain_events().unwrap();
    run(k, frame, what);
    let conn = one_conn(k, what);
    let expected = parse_ip_tcp(&frame[14..])
        .unwrap_or_else(|e| panic!("{what}: userspace cannot parse the SYN: {e}"))
        .signature;
    assert_eq!(conn.syn, expected, "{what}: kernel vs userspace signature");
    assert_eq!(conn.syn_key, expected.key(), "{what}: key");
    conn.syn
}

// ---------------------------------------------------------------------------------------------------------------
// SYN signatures
// ---------------------------------------------------------------------------------------------------------------

const MSS: [u8; 4] = [2, 4, 0x05, 0xb4];
const SOK: [u8; 2] = [4, 2];
const NOP: u8 = 1;

fn ts(ts1: u32, ts2: u32) -> Vec<u8> {
    let mut v = vec![8, 10];
    v.extend_from_slice(&ts1.to_be_bytes());
    v.extend_from_slice(&ts2.to_be_bytes());
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Option areas worth a signature each (padded to a multiple of 4 with zero bytes by the builder).
fn option_shapes() -> Vec<(String, Vec<u8>)> {
    let linux = cat(&[&MSS, &SOK, &ts(0x01020304, 0), &[NOP, 3, 3, 7]]);
    let mut shapes: Vec<(String, Vec<u8>)> = vec![
        ("none".into(), vec![]),
        ("linux".into(), linux.clone()),
        ("windows".into(), cat(&[&MSS, &[NOP, 3, 3, 8, NOP, NOP], &SOK])),
        (
            "macos".into(),
            cat(&[&MSS, &[NOP, 3, 3, 6, NOP, NOP], &ts(7, 0), &SOK, &[0, 0]]),
        ),
        (
            "sack".into(),
            cat(&[&[NOP, NOP, 5, 10], &[0, 0, 0, 1, 0, 0, 0, 2]]),
        ),
        ("sack 18".into(), cat(&[&[NOP, NOP, 5, 18], &[7; 16]])),
        ("eol zero padding".into(), cat(&[&MSS, &[0, 0, 0, 0]])),
        ("eol non-zero padding".into(), cat(&[&MSS, &[0, 0, 9, 0]])),
        ("eol first".into(), vec![0, 0, 0, 0]),
        ("eol first, non-zero".into(), vec![0, 0xff, 0xff, 0xff]),
        ("eol last byte".into(), cat(&[&MSS, &[NOP, NOP, NOP, 0]])),
        (
            "unknown kinds".into(),
            cat(&[&[30, 4, 1, 2, 254, 2, 99, 6, 1, 2, 3, 4]]),
        ),
        ("unknown kind, long".into(), cat(&[&[34, 20], &[0x11; 18]])),
        ("mss length 0".into(), vec![2, 0, 5, 0xb4]),
        ("ws length 1".into(), vec![3, 1, 7, 0]),
        ("unknown length 0".into(), vec![77, 0, 0, 0]),
        ("unknown length 1".into(), cat(&[&MSS, &[99, 1, 0, 0]])),
        ("ts past the area".into(), cat(&[&MSS, &[8, 40, 0, 0]])),
        ("mss past the area".into(), cat(&[&[NOP, NOP], &[2, 4]])),
        ("kind without length byte".into(), vec![NOP, NOP, NOP, 30]),
        ("mss length 3".into(), vec![2, 3, 5, 0]),
        ("mss length 6".into(), vec![2, 6, 5, 0xb4, 0, 0]),
        ("ws length 4".into(), vec![3, 4, 7, 0]),
        ("ts length 8".into(), vec![8, 8, 0, 0, 0, 1, 0, 0]),
        ("ws 14".into(), vec![3, 3, 14, 0]),
        ("ws 15".into(), vec![3, 3, 15, 0]),
        ("ws 255".into(), vec![3, 3, 255, 0]),
        ("ts1 zero, ts2 non-zero".into(), cat(&[&[NOP, NOP], &ts(0, 5)])),
        ("ts both non-zero".into(), cat(&[&[NOP, NOP], &ts(1, 5)])),
        ("mss 0".into(), vec![2, 4, 0, 0]),
        ("mss 65535".into(), vec![2, 4, 0xff, 0xff]),
        (
            "40 bytes of options".into(),
            cat(&[
                &MSS,
                &SOK,
                &ts(1, 0),
                &[NOP, 3, 3, 7],
                &[NOP, NOP, 5, 10],
                &[0; 8],
                &[NOP, NOP],
            ]),
        ),
        ("17 NOPs + MSS".into(), cat(&[&[NOP; 17], &MSS])),
        ("19 NOPs + EOL".into(), cat(&[&[NOP; 19], &[0]])),
        ("20 NOPs".into(), vec![NOP; 20]),
        ("20 NOPs + EOL".into(), cat(&[&[NOP; 20], &[0]])),
        ("19 NOPs + MSS".into(), cat(&[&[NOP; 19], &MSS])),
        ("21 NOPs".into(), vec![NOP; 21]),
        ("24 NOPs".into(), vec![NOP; 24]),
        ("40 NOPs".into(), vec![NOP; 40]),
        ("36 NOPs + MSS".into(), cat(&[&[NOP; 36], &MSS])),
        (
            "duplicate options".into(),
            cat(&[&MSS, &MSS, &[3, 3, 2, 3, 3, 9]]),
        ),
    ];
    // Every kind 0..=255 with a length of 2, behind an MSS.
    for kind in [6u8, 7, 9, 19, 28, 29, 30, 34, 69, 172, 253, 254, 255] {
        shapes.push((format!("kind {kind}"), cat(&[&MSS, &[kind, 2]])));
    }
    shapes
}

fn base_syn(v6: bool) -> Segment {
    if v6 {
        Segment::syn("2001:db8::7", "2001:db8::1", PORT)
    } else {
        Segment::syn("192.0.2.7", "10.0.0.1", PORT)
    }
}

fn linux_options() -> Vec<u8> {
    cat(&[&MSS, &SOK, &ts(0x01020304, 0), &[NOP, 3, 3, 7]])
}

#[test]
fn syn_signature_matches_userspace_for_every_option_shape() {
    let mut k = load();
    let mut signatures = BTreeSet::new();
    for v6 in [false, true] {
        for (name, options) in option_shapes() {
            let syn = base_syn(v6).with_options(&options);
            let frame = syn.build();
            let what = format!("{name} (IPv{})", if v6 { 6 } else { 4 });
            let sig = check_parity(&mut k, &frame, &what);
            signatures.insert(sig.key());
            // Cut inside the options area at every byte (the TCP header itself stays whole).
            let l4 = if v6 { 14 + 40 } else { 14 + 20 };
            for cut in l4 + 20..frame.len() {
                check_parity(&mut k, &frame[..cut], &format!("{what} cut at {cut}"));
            }
        }
    }
    // The shapes are really different signatures (the key sees them), not one signature many times.
    assert!(signatures.len() > 60, "{} distinct signatures", signatures.len());
}

#[test]
fn syn_option_walk_limits_and_malformed_lengths_set_bad() {
    use detector_common::syn::quirk;
    let mut k = load();
    let bad = |k: &mut KernelUnderTest, options: &[u8]| {
        let sig = check_parity(
            k,
            &base_syn(false).with_options(options).build(),
            &format!("{options:?}"),
        );
        sig.quirks & quirk::BAD != 0
    };
    assert!(!bad(&mut k, &cat(&[&[NOP; 19], &[0]])));
    // 20 NOPs fill the area exactly at the bound: the walk ends with the area, nothing is left unread.
    assert!(!bad(&mut k, &[NOP; 20]));
    assert!(bad(&mut k, &[NOP; 24]));
    assert!(bad(&mut k, &cat(&[&[NOP; 19], &MSS])));
    assert!(!bad(&mut k, &cat(&[&[NOP; 16], &MSS])));
    assert!(bad(&mut k, &[2, 0, 5, 0xb4]));
    assert!(bad(&mut k, &[3, 1, 7, 0]));
    assert!(bad(&mut k, &cat(&[&MSS, &[8, 40, 0, 0]])));
    assert!(!bad(&mut k, &linux_options()));
    // EOL padding: counted, zero or not.
    let sig = check_parity(
        &mut k,
        &base_syn(false).with_options(&cat(&[&MSS, &[0, 0, 9, 0]])).build(),
        "eol+3 opt+",
    );
    assert_eq!(sig.eol_pad, 3);
    assert_ne!(sig.quirks & quirk::OPT_PLUS, 0);
}

#[test]
fn syn_signature_matches_userspace_for_ip_and_tcp_quirks() {
    let mut k = load();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    let opts = linux_options();
    for v6 in [false, true] {
        let fam = if v6 { "v6" } else { "v4" };
        let base = base_syn(v6).with_options(&opts);
        let mut push = |name: &str, s: Segment| cases.push((format!("{fam} {name}"), s.build()));
        push("plain", base.clone());
        for ttl in [0u8, 1, 32, 33, 63, 64, 65, 128, 129, 200, 255] {
            push(&format!("ttl {ttl}"), Segment { ttl, ..base.clone() });
        }
        for tos in [1u8, 2, 3, 0xb8, 0xfc] {
            push(&format!("tos {tos:#x}"), Segment { tos, ..base.clone() });
        }
        for (name, flags) in [
            ("ece cwr", tcp_flag::SYN | tcp_flag::ECE | tcp_flag::CWR),
            ("ece", tcp_flag::SYN | tcp_flag::ECE),
            ("urg", tcp_flag::SYN | tcp_flag::URG),
            ("psh", tcp_flag::SYN | tcp_flag::PSH),
            ("fin", tcp_flag::SYN | tcp_flag::FIN),
            ("rst", tcp_flag::SYN | tcp_flag::RST),
        ] {
            push(name, base.clone().with_flags(flags));
        }
        push(
            "urgent pointer without urg",
            Segment {
                urgent: 7,
                ..base.clone()
            },
        );
        push(
            "urg with pointer",
            Segment {
                urgent: 7,
                flags: tcp_flag::SYN | tcp_flag::URG,
                ..base.clone()
            },
        );
        push(
            "ack number without ack",
            Segment {
                ack: 99,
                ..base.clone()
            },
        );
        push(
            "seq 0",
            Segment {
                seq: 0,
                ..base.clone()
            },
        );
        push(
            "window 0",
            Segment {
                window: 0,
                ..base.clone()
            },
        );
        push(
            "window 65535",
            Segment {
                window: 65535,
                ..base.clone()
            },
        );
        push(
            "payload",
            Segment {
                payload: vec![0x5a; 10],
                ..base.clone()
            },
        );
        push(
            "payload, no options",
            Segment {
                payload: vec![1],
                options: vec![],
                ..base.clone()
            },
        );
        push(
            "data offset 2",
            Segment {
                data_offset: Some(2),
                options: vec![],
                ..base.clone()
            },
        );
        push(
            "data offset 15, 12 option bytes",
            Segment {
                data_offset: Some(15),
                options: cat(&[&MSS, &SOK, &[NOP, 3, 3, 7, NOP, NOP]]),
                ..base.clone()
            },
        );
        if v6 {
            push(
                "flow label",
                Segment {
                    flow_label: 0x12345,
                    ..base.clone()
                },
            );
            push(
                "flow label 1",
                Segment {
                    flow_label: 1,
                    ..base.clone()
                },
            );
        } else {
            for (name, ip_id, ip_flags) in [
                ("no df, id 0", 0u16, 0u16),
                ("no df, id", 0x4242, 0),
                ("df, id 0", 0, 0x4000),
                ("df, id", 0x4242, 0x4000),
                ("reserved flag", 0x4242, 0x8000),
                ("reserved + df", 0, 0xc000),
            ] {
                push(
                    name,
                    Segment {
                        ip_id,
                        ip_flags,
                        ..base.clone()
                    },
                );
            }
        }
    }
    // IPv4 options (4, 8, 40 bytes) and IPv6 extension headers in front of the TCP header.
    let v4 = base_syn(false).with_options(&opts);
    for words in [1, 2, 10] {
        cases.push((
            format!("v4 {} bytes of IP options", words * 4),
            ethernet(
                &[],
                ETH_P_IPV4,
                &with_ipv4_options(&v4.ip_packet(), &ipv4_nop_options(words)),
            ),
        ));
    }
    let v6 = base_syn(true).with_options(&opts);
    for chain in [
        vec![Ipv6Ext::HopByHop { len8: 0 }],
        vec![Ipv6Ext::DestOpts { len8: 2 }],
        vec![Ipv6Ext::Routing { len8: 1 }],
        vec![Ipv6Ext::Fragment {
            offset8: 0,
            more: false,
        }],
        vec![Ipv6Ext::Ah],
        vec![
            Ipv6Ext::HopByHop { len8: 1 },
            Ipv6Ext::Routing { len8: 0 },
            Ipv6Ext::DestOpts { len8: 0 },
            Ipv6Ext::Ah,
        ],
    ] {
        cases.push((
            format!("v6 behind {chain:?}"),
            ethernet(&[], ETH_P_IPV6, &with_ipv6_ext_headers(&v6.ip_packet(), &chain)),
        ));
    }
    // Ethernet padding: never payload, zero or not; options read from it are the frame's bytes in both.
    for fill in [0u8, 0xff] {
        for syn in [base_syn(false), base_syn(false).with_options(&MSS)] {
            cases.push((
                format!("v4 padded with {fill:#x}, {} option bytes", syn.options.len()),
                with_ethernet_padding(syn.build(), fill),
            ));
        }
    }
    // An IPv4 total length that ends before the options (they are still in the frame).
    let mut short = base_syn(false).with_options(&opts).build();
    short[16..18].copy_from_slice(&40u16.to_be_bytes());
    cases.push(("v4 total length before the options".into(), short));
    for (what, frame) in &cases {
        check_parity(&mut k, frame, what);
    }
}

/// Random options areas (valid kinds most of the time), random IP/TCP fields, random cuts.
#[test]
fn syn_signature_matches_userspace_for_random_shapes() {
    let mut k = load();
    let mut rng = SmallRng::seed_from_u64(0x005e_ed0f_5111);
    for i in 0..3000 {
        let v6 = rng.gen_bool(0.3);
        let mut options = Vec::new();
        let area = 4 * rng.gen_range(0..=10usize);
        while options.len() < area {
            match rng.gen_range(0..12) {
                0 => options.extend_from_slice(&MSS),
                1 => options.extend_from_slice(&[3, 3, rng.r#gen()]),
                2 => options.extend_from_slice(&SOK),
                3 => options.extend(ts(rng.r#gen(), if rng.gen_bool(0.8) { 0 } else { rng.r#gen() })),
                4 | 5 => options.push(NOP),
                6 => options.push(0),
                7 => options.extend_from_slice(&[5, 10, 1, 2, 3, 4, 5, 6, 7, 8]),
                8 => options.extend_from_slice(&[rng.r#gen(), rng.gen_range(0..=3)]),
                _ => options.push(rng.r#gen()),
            }
        }
        options.truncate(area);
        let mut syn = base_syn(v6).with_options(&options);
        syn.ttl = rng.r#gen();
        syn.window = rng.r#gen();
        if rng.gen_bool(0.2) {
            syn.tos = rng.r#gen();
        }
        if rng.gen_bool(0.2) {
            syn.ip_id = rng.gen_range(0..2);
            syn.ip_flags = rng.gen_range(0..4u16) << 14;
        }
        if rng.gen_bool(0.2) {
            syn.flags |= rng.r#gen::<u8>() & !tcp_flag::ACK;
        }
        if rng.gen_bool(0.1) {
            syn.flow_label = rng.r#gen();
        }
        if rng.gen_bool(0.1) {
            syn.payload = vec![0x33; rng.gen_range(1..40)];
        }
        let mut frame = syn.build();
        let l4_end = 14 + if v6 { 40 } else { 20 } + 20;
        if rng.gen_bool(0.2) && frame.len() > l4_end {
            frame.truncate(rng.gen_range(l4_end..frame.len()));
        }
        if rng.gen_bool(0.1) {
            let fill = rng.r#gen();
            frame = with_ethernet_padding(frame, fill);
        }
        check_parity(&mut k, &frame, &format!("random SYN {i}: options {options:?}"));
    }
}

fn testdata() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata");
    assert!(
        dir.join("ja4/pcap").is_dir(),
        "public test data missing: expected {}",
        dir.display()
    );
    dir
}

fn captures() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(testdata().join("ja4/pcap"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    out.sort();
    out
}

fn eth_for(ip: &[u8]) -> Vec<u8> {
    let ether_type = if ip[0] >> 4 == 6 { ETH_P_IPV6 } else { ETH_P_IPV4 };
    ethernet(&[], ether_type, ip)
}

#[test]
fn syn_signature_matches_userspace_for_the_captures_syns() {
    let mut syns: Vec<(String, u16, Vec<u8>)> = Vec::new();
    for capture in captures() {
        let name = capture.file_name().unwrap().to_string_lossy().into_owned();
        offline::read_tcp_segments(&capture, |seg| {
            if seg.flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                syns.push((name.clone(), seg.dst_port, seg.ip.to_vec()));
            }
        })
        .unwrap();
    }
    assert!(syns.len() >= 5, "{} SYNs", syns.len());
    let ports: BTreeSet<u16> = syns.iter().map(|s| s.1).collect();
    let mut k = load();
    k.maps
        .set_protected_ports(&ports.into_iter().collect::<Vec<_>>())
        .unwrap();
    for (i, (name, port, ip)) in syns.iter().enumerate() {
        check_parity(&mut k, &eth_for(ip), &format!("{name} SYN #{i} to {port}"));
    }
    println!("{} SYNs from the captures match", syns.len());
}

// ---------------------------------------------------------------------------------------------------------------
// SYN verdicts
// ---------------------------------------------------------------------------------------------------------------

/// A management source passes ahead of every rule: deny entries, decisions and fingerprint verdicts keyed by
/// its own client's SYN never apply to it (the TCP programs are not reached), while they still apply to
/// everyone else; the IPv4 management network also covers the IPv4-mapped spelling.
#[test]
fn management_sources_pass_ahead_of_every_rule_and_verdict() {
    let mut k = load();
    for v6 in [false, true] {
        let syn = base_syn(v6).with_options(&linux_options());
        let other = Segment {
            src: if v6 { "2001:db9::7" } else { "198.51.100.7" }.parse().unwrap(),
            ..syn.clone()
        };
        let management = ipnet::IpNet::new(syn.src, if v6 { 64 } else { 24 })
            .unwrap()
            .trunc();
        k.set_syn_verdict(syn_key_of(&syn), block_verdict()).unwrap();
        expect(&mut k, &syn.build(), Reason::DropSynFingerprint, "SYN verdict");
        k.maps
            .list_put(detector_user::maps::List::Deny, syn.src.into(), 0)
            .unwrap();
        k.maps
            .list_put(detector_user::maps::List::Deny, other.src.into(), 0)
            .unwrap();
        expect(&mut k, &syn.build(), Reason::DropDenyExact, "denied");
        k.maps.management_sync(&[management]).unwrap();
        assert_eq!(k.maps.management_entries().unwrap(), [management]);
        expect(
            &mut k,
            &syn.build(),
            Reason::PassManagement,
            "management over deny and verdict",
        );
        expect(
            &mut k,
            &other.build(),
            Reason::DropDenyExact,
            "others are still denied",
        );
        k.maps
            .list_remove(detector_user::maps::List::Deny, syn.src.into())
            .unwrap();
        k.maps
            .decision_insert(
                syn.src.into(),
                Action::Block,
                0,
                0,
                detector_common::Origin::Cli,
                None,
            )
            .unwrap();
        expect(
            &mut k,
            &syn.build(),
            Reason::PassManagement,
            "management over a block decision",
        );
        k.maps.management_sync(&[]).unwrap();
        assert!(k.maps.management_entries().unwrap().is_empty());
        expect(
            &mut k,
            &syn.build(),
            Reason::DropBlockExact,
            "management removed: the block applies",
        );
        k.maps.decision_remove(syn.src.into()).unwrap();
        k.maps
            .list_remove(detector_user::maps::List::Deny, other.src.into())
            .unwrap();
    }
    // `::ffff:192.0.2.0/120` and `192.0.2.0/24` are one kernel entry.
    let syn = base_syn(false).with_options(&linux_options());
    k.maps
        .management_sync(&["::ffff:192.0.2.0/120".parse().unwrap()])
        .unwrap();
    expect(
        &mut k,
        &syn.build(),
        Reason::PassManagement,
        "IPv4-mapped management network",
    );
}

#[test]
fn blocked_syn_signature_drops_the_syn_and_reports_it() {
    let mut k = load();
    let blocked = base_syn(false).with_options(&linux_options());
    let other = Segment {
        window: 29200,
        ..blocked.clone()
    };
    k.set_syn_verdict(syn_key_of(&blocked), block_verdict()).unwrap();
    expect(
        &mut k,
        &blocked.build(),
        Reason::DropSynFingerprint,
        "blocked SYN",
    );
    let conn = one_conn(&mut k, "blocked SYN");
    assert!(conn.dropped);
    assert_eq!(conn.action, Action::Block as u8);
    assert_eq!(conn.syn_key, syn_key_of(&blocked));
    assert_eq!(conn.isn, blocked.seq);
    assert!(k.flow(&blocked.tuple()).is_none(), "no flow for a dropped SYN");
    // Any source, any hop count (the key uses the initial TTL), IPv6 with the same stack is another key.
    let far = Segment {
        src: "198.51.100.3".parse().unwrap(),
        ttl: 50,
        ..blocked.clone()
    };
    expect(
        &mut k,
        &far.build(),
        Reason::DropSynFingerprint,
        "same stack, other source",
    );
    assert!(one_conn(&mut k, "same stack, other source").dropped);
    expect(&mut k, &other.build(), Reason::PassDefault, "another signature");
    let conn = one_conn(&mut k, "another signature");
    assert!(!conn.dropped);
    assert_eq!(conn.action, 0);
    assert!(k.flow(&other.tuple()).is_none(), "a SYN alone makes no flow");
    k.run_egress(&other.syn_ack().build()).unwrap();
    expect(
        &mut k,
        &other.handshake_ack().build(),
        Reason::PassDefault,
        "handshake ACK",
    );
    assert!(k.flow(&other.tuple()).is_some());
    assert_eq!(k.syn_verdict(syn_key_of(&blocked)).unwrap().hits, 2);
    // The allowlist still wins (the TCP program is never reached).
    k.maps
        .list_put(
            detector_user::maps::List::Allow,
            "192.0.2.7/32".parse().unwrap(),
            0,
        )
        .unwrap();
    expect(&mut k, &blocked.build(), Reason::PassAllowExact, "allowlisted");
}

#[test]
fn throttled_syn_signature_applies_its_rate_class_to_the_flow() {
    let mut k = load();
    k.maps.set_rate_class(2, rate_class_limits(1, 3, 1, 1)).unwrap();
    let syn = base_syn(false).with_options(&linux_options());
    k.set_syn_verdict(syn_key_of(&syn), verdict(Action::Throttle, 2, 0))
        .unwrap();
    expect(&mut k, &syn.build(), Reason::PassThrottled, "throttled SYN");
    let conn = one_conn(&mut k, "throttled SYN");
    assert_eq!((conn.action, conn.dropped), (Action::Throttle as u8, false));
    k.run_egress(&syn.syn_ack().build()).unwrap();
    let flow = {
        k.run(&syn.handshake_ack().build()).unwrap();
        k.flow(&syn.tuple()).expect("a flow")
    };
    assert_eq!((flow.action, flow.rate_class), (Action::Throttle as u8, 2));
    // Class 2: one connection per second, burst 1.
    let again = syn.clone().with_src_port(40001);
    expect(&mut k, &again.build(), Reason::DropRateConnections, "second SYN");
    assert!(one_conn(&mut k, "second SYN").dropped);
    // The flow's packets: class 2 allows 3 packets in a burst (the SYN and the handshake ACK took two).
    let data = syn.data(0, b"hello");
    expect(&mut k, &data.build(), Reason::PassThrottled, "data 1");
    expect(
        &mut k,
        &syn.data(5, b"more").build(),
        Reason::DropRatePackets,
        "data 2",
    );
    // A source of the same stack without the verdict's signature is unlimited.
    let plain = Segment {
        window: 1000,
        ..base_syn(false)
    }
    .with_src_port(40100);
    for i in 0..5 {
        expect(
            &mut k,
            &plain.clone().with_src_port(40100 + i).build(),
            Reason::PassDefault,
            "plain",
        );
    }
}

#[test]
fn monitor_and_expired_syn_verdicts() {
    let mut k = load();
    let syn = base_syn(true).with_options(&linux_options());
    let key = syn_key_of(&syn);
    k.set_syn_verdict(key, verdict(Action::Monitor, 0, 0)).unwrap();
    expect(&mut k, &syn.build(), Reason::PassMonitor, "monitored");
    assert_eq!(one_conn(&mut k, "monitored").action, Action::Monitor as u8);
    // A block that expired (now, or earlier) is ignored; one expiring later applies.
    for (expires, reason) in [
        (T0 - 1, Reason::PassDefault),
        (T0, Reason::PassDefault),
        (T0 + 1, Reason::DropSynFingerprint),
    ] {
        k.set_syn_verdict(key, verdict(Action::Block, 0, expires))
            .unwrap();
        expect(&mut k, &syn.build(), reason, &format!("block expiring {expires}"));
        let conn = one_conn(&mut k, "expiry");
        assert_eq!(conn.dropped, reason == Reason::DropSynFingerprint);
    }
    k.set_now(T0 + 1).unwrap();
    expect(
        &mut k,
        &syn.build(),
        Reason::PassDefault,
        "block expired by the clock",
    );
}

// ---------------------------------------------------------------------------------------------------------------
// ClientHello keys
// ---------------------------------------------------------------------------------------------------------------

/// The linear part `BPF_PROG_TEST_RUN` gives the program (see kernel_malformed.rs); beyond it the TCP program
/// does not see the payload (it reads the frame's linear part), so a ClientHello there looks split.
const MAX_LINEAR: usize = 3520;

/// SYN + one data segment carrying `payload` at offset 0; returns the outcome of the data segment and its
/// payload events.
fn hello_flow(k: &mut KernelUnderTest, syn: &Segment, payload: &[u8], what: &str) -> (Outcome, Vec<Payload>) {
    let _ = k.drain_events().unwrap();
    let out = run(k, &syn.build(), what);
    assert_eq!(out.action, XDP_PASS, "{what}: SYN");
    // The server's SYN-ACK leaves through the egress program; the data segment then completes the handshake.
    k.run_egress(&syn.syn_ack().build()).unwrap();
    k.run(&syn.handshake_ack().build()).unwrap();
    let out = run(k, &syn.data(0, payload).build(), what);
    let events = k.drain_events().unwrap();
    (out, payloads(&events))
}

fn tuple_syn(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16) -> Segment {
    Segment {
        src,
        dst,
        src_port,
        dst_port,
        ..Segment::syn("192.0.2.1", "10.0.0.1", dst_port)
    }
}

#[test]
fn client_hellos_of_the_shared_vectors_are_keyed_like_userspace() {
    type Tuple = (IpAddr, u16, IpAddr, u16);
    let dir = testdata().join("ja4");
    let mut k = load();
    let (mut keyed, mut unparsed, mut split, mut big) = (0, 0, 0, 0);
    let mut ports = BTreeSet::new();
    let mut flows: Vec<(String, Tuple, Vec<u8>, String)> = Vec::new();
    for capture in captures() {
        let name = capture.file_name().unwrap().to_string_lossy().into_owned();
        let expected: Vec<serde_json::Value> = serde_json::from_str(
            &std::fs::read_to_string(dir.join("expected").join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        let mut streams: HashMap<Tuple, StreamBuffer> = HashMap::new();
        offline::read_tcp_segments(&capture, |seg| {
            let buffer = streams
                .entry((seg.src, seg.src_port, seg.dst, seg.dst_port))
                .or_default();
            if seg.flags & TCP_SYN != 0 {
                buffer.set_isn(seg.seq);
            }
            buffer.push(seg.seq, seg.payload);
        })
        .unwrap();
        for entry in &expected {
            let Some(ja4_r) = entry.get("JA4_r.1").and_then(|v| v.as_str()) else {
                continue;
            };
            if ja4_r.starts_with('q') {
                continue;
            }
            let field = |k: &str| entry[k].as_str().unwrap().to_string();
            let tuple: Tuple = (
                field("src").parse().unwrap(),
                field("srcport").parse().unwrap(),
                field("dst").parse().unwrap(),
                field("dstport").parse().unwrap(),
            );
            let stream = streams[&tuple].contiguous();
            assert!(
                stream.len() >= 5 && stream[0] == 22,
                "{name} {tuple:?}: a TLS record first"
            );
            let record_len = u16::from_be_bytes([stream[3], stream[4]]) as usize;
            let segment = &stream[..(5 + record_len).min(stream.len())];
            ports.insert(tuple.3);
            flows.push((name.clone(), tuple, segment.to_vec(), ja4_r.to_string()));
        }
    }
    k.maps
        .set_protected_ports(&ports.into_iter().collect::<Vec<_>>())
        .unwrap();
    for (name, tuple, segment, ja4_r) in &flows {
        let what = format!("{name} {tuple:?}");
        let syn = tuple_syn(tuple.0, tuple.1, tuple.2, tuple.3);
        let frame_len = syn.data(0, segment).build().len();
        if frame_len > 9000 {
            big += 1;
            continue;
        }
        let (out, events) = hello_flow(&mut k, &syn, segment, &what);
        assert_eq!(out.reason, Reason::PassDefault, "{what}");
        assert_eq!(events.len(), 1, "{what}: one payload event");
        let e = &events[0];
        assert_eq!(e.stream_offset, 0);
        let record_len = u16::from_be_bytes([segment[3], segment[4]]) as usize;
        let message_len = u32::from_be_bytes([0, segment[6], segment[7], segment[8]]) as usize;
        let whole_in_record =
            segment[5] == 1 && 4 + message_len <= record_len && 5 + record_len <= segment.len();
        let expected_status = if !whole_in_record {
            hello_status::SPLIT
        } else if 9 + message_len <= HELLO_BUF {
            hello_status::KEYED
        } else if frame_len <= MAX_LINEAR {
            hello_status::UNPARSED
        } else {
            hello_status::SPLIT
        };
        assert_eq!(
            e.hello_status, expected_status,
            "{what}: status ({message_len}-byte message)"
        );
        match e.hello_status {
            hello_status::KEYED => {
                let hello = ClientHello::parse_message(&segment[5..9 + message_len]).unwrap();
                assert_eq!(
                    e.hello_key,
                    key_of_client_hello(&hello),
                    "{what}: kernel vs userspace key"
                );
                assert_eq!(
                    e.hello_key,
                    key_of_ja4_r(ja4_r).unwrap(),
                    "{what}: kernel key vs key of JA4_r"
                );
                assert_eq!(k.flow(&syn.tuple()).unwrap().hello_key, e.hello_key);
                keyed += 1;
            }
            hello_status::UNPARSED => unparsed += 1,
            _ => split += 1,
        }
        assert_eq!(e.data.len(), segment.len().min(CAPTURE_CHUNK));
        assert_eq!(&e.data[..], &segment[..e.data.len()]);
    }
    println!(
        "{} TCP ClientHellos: {keyed} keyed by the kernel, {unparsed} too large to key, {split} split, \
         {big} larger than a 9000-byte frame",
        flows.len()
    );
    assert!(keyed >= 100, "only {keyed} ClientHellos keyed");
}

#[test]
fn blocked_hello_key_drops_the_client_hello_and_the_flow() {
    let mut k = load();
    let record = client_hello_record();
    let key = hello_key_of_record(&record);
    k.set_hello_verdict(key, block_verdict()).unwrap();
    let syn = base_syn(false).with_options(&linux_options());
    let (out, events) = hello_flow(&mut k, &syn, &record, "blocked ClientHello");
    assert_eq!((out.action, out.reason), (XDP_DROP, Reason::DropHelloFingerprint));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].hello_status, hello_status::KEYED);
    assert_eq!(events[0].hello_key, key);
    assert_eq!(events[0].action, Action::Block as u8);
    let flow = k.flow(&syn.tuple()).unwrap();
    assert_eq!((flow.action, flow.hello_key), (Action::Block as u8, key));
    // Its retransmission and everything after it on the flow drop; no more capture.
    expect(
        &mut k,
        &syn.data(0, &record).build(),
        Reason::DropFlowFingerprint,
        "retransmission",
    );
    expect(
        &mut k,
        &syn.data(record.len() as u32, b"GET / HTTP/1.1\r\n\r\n").build(),
        Reason::DropFlowFingerprint,
        "request",
    );
    assert!(payloads(&k.drain_events().unwrap()).is_empty());
    // Another flow of the same client: dropped at its ClientHello too; IPv6 as well.
    for syn in [
        syn.clone().with_src_port(40002),
        base_syn(true).with_src_port(40003),
    ] {
        let (out, _) = hello_flow(&mut k, &syn, &record, "another flow");
        assert_eq!(out.reason, Reason::DropHelloFingerprint);
    }
    // An expired verdict does nothing.
    k.set_hello_verdict(key, verdict(Action::Block, 0, T0)).unwrap();
    let (out, events) = hello_flow(&mut k, &syn.clone().with_src_port(40004), &record, "expired");
    assert_eq!(out.reason, Reason::PassDefault);
    assert_eq!((events[0].hello_key, events[0].action), (key, 0));
    // Without capture the ClientHello is still keyed and its verdict enforced; nothing is sent.
    k.set_hello_verdict(key, block_verdict()).unwrap();
    k.set_config(Config {
        flags: CONFIG_FLAG_CONN_EVENTS,
        ..Config::default()
    })
    .unwrap();
    let (out, events) = hello_flow(&mut k, &syn.clone().with_src_port(40005), &record, "capture off");
    assert_eq!(out.reason, Reason::DropHelloFingerprint);
    assert!(events.is_empty());
}

#[test]
fn throttled_hello_key_throttles_the_rest_of_the_flow() {
    let mut k = load();
    k.maps.set_rate_class(3, rate_class_limits(1, 3, 0, 0)).unwrap();
    let record = client_hello_record();
    k.set_hello_verdict(hello_key_of_record(&record), verdict(Action::Throttle, 3, 0))
        .unwrap();
    let syn = base_syn(false);
    let (out, events) = hello_flow(&mut k, &syn, &record, "throttled ClientHello");
    assert_eq!(out.reason, Reason::PassDefault);
    assert_eq!(events[0].action, Action::Throttle as u8);
    let flow = k.flow(&syn.tuple()).unwrap();
    assert_eq!((flow.action, flow.rate_class), (Action::Throttle as u8, 3));
    let next = |i: u32| syn.data(record.len() as u32 + i, b"x").build();
    // Class 3 allows a burst of 3 packets per source; SYN and ClientHello went unlimited (class 0).
    expect(&mut k, &next(0), Reason::PassThrottled, "1");
    expect(&mut k, &next(1), Reason::PassThrottled, "2");
    expect(&mut k, &next(2), Reason::PassThrottled, "3");
    expect(&mut k, &next(3), Reason::DropRatePackets, "4");
}

#[test]
fn split_non_tls_and_short_payloads_are_not_keyed() {
    let mut k = load();
    let mut big = build::chrome_like();
    // Padding (0x0015) makes the message larger than the kernel's buffer, still in one linear frame.
    for (kind, body) in big.extensions.as_mut().unwrap().iter_mut() {
        if *kind == 0x0015 {
            *body = vec![0; 600];
        }
    }
    let message = big.message();
    let whole = big.records(16_384);
    let key = key_of_client_hello(&ClientHello::parse_message(&message).unwrap());
    // Even a blocked key never drops what the kernel cannot key.
    k.set_hello_verdict(key, block_verdict()).unwrap();
    let mut port = 41000u16;
    let mut case = |k: &mut KernelUnderTest, payload: &[u8], status: u8, what: &str| {
        port += 1;
        let syn = base_syn(false).with_src_port(port);
        let (out, events) = hello_flow(k, &syn, payload, what);
        assert_eq!(out.reason, Reason::PassDefault, "{what}");
        assert_eq!(events.len(), 1, "{what}");
        assert_eq!(events[0].hello_status, status, "{what}");
        assert_eq!(events[0].hello_key, 0, "{what}");
        syn
    };
    // The record continues in the next segment.
    let syn = case(
        &mut k,
        &whole[..1400],
        hello_status::SPLIT,
        "record longer than the segment",
    );
    assert_ne!(
        k.flow(&syn.tuple()).unwrap().flags & detector_common::flow::flow_flag::HELLO_SPLIT,
        0
    );
    let rest = syn.data(1400, &whole[1400..]);
    expect(&mut k, &rest.build(), Reason::PassDefault, "second part");
    let events = payloads(&k.drain_events().unwrap());
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].stream_offset, events[0].hello_status),
        (1400, hello_status::NONE)
    );
    // The message spread over several records.
    case(
        &mut k,
        &big.records(500)[..1000],
        hello_status::SPLIT,
        "message over several records",
    );
    case(
        &mut k,
        &big.records(500),
        hello_status::SPLIT,
        "all records in one segment",
    );
    // Whole, in one segment, but longer than the kernel's buffer.
    assert!(message.len() + 5 > HELLO_BUF && whole.len() + 54 <= MAX_LINEAR);
    case(
        &mut k,
        &whole,
        hello_status::UNPARSED,
        "larger than the kernel's buffer",
    );
    // Not TLS at all, or too short to tell.
    case(
        &mut k,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        hello_status::NOT_HELLO,
        "HTTP",
    );
    case(&mut k, &[22, 3, 1, 0, 5], hello_status::NOT_HELLO, "5 bytes");
    case(
        &mut k,
        &[22, 3, 1, 0, 5, 2, 0, 0, 1],
        hello_status::NOT_HELLO,
        "ServerHello type",
    );
    case(
        &mut k,
        &[23, 3, 3, 0, 4, 1, 0, 0, 0],
        hello_status::NOT_HELLO,
        "application data",
    );
}

/// Mutated and random ClientHellos: the kernel never aborts, counts one reason, and when it keys one that
/// userspace can parse too, the keys agree.
#[test]
fn fuzzed_client_hellos_never_abort() {
    let mut k = load();
    let mut rng = SmallRng::seed_from_u64(4);
    let base = client_hello_record();
    let big = build::chrome_like().records(16_384);
    let (mut keyed, mut compared) = (0, 0);
    for i in 0..3000u32 {
        let mut p = if rng.gen_bool(0.8) {
            base.clone()
        } else {
            big.clone()
        };
        match rng.gen_range(0..6) {
            0 => {
                for _ in 0..rng.gen_range(1..8) {
                    let at = rng.gen_range(0..p.len());
                    p[at] = rng.r#gen();
                }
            }
            1 => {
                // Length fields (record, message, session id, lists) get random values.
                for at in [3usize, 4, 6, 7, 8, 43, 76, 77] {
                    if rng.gen_bool(0.3) && at < p.len() {
                        p[at] = rng.r#gen();
                    }
                }
            }
            2 => {
                let cut = rng.gen_range(0..p.len());
                p.truncate(cut);
            }
            3 => {
                let n = rng.gen_range(0..2100);
                p = [
                    &[22u8, 3, 1][..],
                    &(0..n).map(|_| rng.r#gen::<u8>()).collect::<Vec<_>>(),
                ]
                .concat();
                if p.len() >= 6 {
                    p[5] = 1;
                }
            }
            4 => {
                // Random extension-area bytes behind the fixed part.
                for b in p.iter_mut().skip(80) {
                    if rng.gen_bool(0.05) {
                        *b = rng.r#gen();
                    }
                }
            }
            _ => p.extend((0..rng.gen_range(0..64)).map(|_| rng.r#gen::<u8>())),
        }
        if p.is_empty() {
            p.push(22);
        }
        let v6 = rng.gen_bool(0.3);
        let syn = base_syn(v6).with_src_port(1024 + (i % 60000) as u16);
        let (_, events) = hello_flow(&mut k, &syn, &p, &format!("fuzz {i}"));
        assert_eq!(events.len(), 1, "fuzz {i}");
        let e = &events[0];
        if e.hello_status == hello_status::KEYED {
            keyed += 1;
            assert_ne!(e.hello_key, 0);
            let message_len = u32::from_be_bytes([0, p[6], p[7], p[8]]) as usize;
            if let Ok(hello) = ClientHello::parse_message(&p[5..9 + message_len]) {
                // Userspace accepted what the kernel keyed: the same key, unless the kernel's tolerance of
                // lengths that overlap (a list running into the next field) read different bytes.
                if key_of_client_hello(&hello) == e.hello_key {
                    compared += 1;
                } else if std::env::var_os("AQD_FUZZ_DEBUG").is_some() {
                    println!(
                        "fuzz {i}: differs: {hello:?}\n{}",
                        p.iter().map(|b| format!("{b:02x}")).collect::<String>()
                    );
                }
            }
        }
    }
    println!("fuzz: {keyed} keyed, {compared} of them with the userspace key");
    assert!(
        keyed > 100 && compared > 100,
        "{keyed} keyed, {compared} compared"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Capture and requests
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn capture_covers_the_first_4096_bytes_in_at_most_6_events() {
    let mut k = load();
    // 1000-byte segments: events at 0, 1000, 2000, 3000, 4000 (which crosses 4096); nothing after.
    let syn = base_syn(false).with_src_port(42001);
    run(&mut k, &syn.build(), "syn");
    k.run_egress(&syn.syn_ack().build()).unwrap();
    k.run(&syn.handshake_ack().build()).unwrap();
    let _ = k.drain_events().unwrap();
    for offset in (0..8000).step_by(1000) {
        expect(
            &mut k,
            &syn.data(offset, &[b'a'; 1000]).build(),
            Reason::PassDefault,
            "data",
        );
    }
    let events = payloads(&k.drain_events().unwrap());
    let offsets: Vec<u32> = events.iter().map(|e| e.stream_offset).collect();
    assert_eq!(offsets, [0, 1000, 2000, 3000, 4000]);
    assert!(
        events
            .iter()
            .all(|e| e.segment_len == 1000 && e.data.len() == 1000)
    );
    assert_eq!(events[0].hello_status, hello_status::NOT_HELLO);
    assert!(events[1..].iter().all(|e| e.hello_status == hello_status::NONE));
    // 10-byte segments: at most CAPTURE_MAX_EVENTS events.
    let syn = base_syn(false).with_src_port(42002);
    run(&mut k, &syn.build(), "syn");
    k.run_egress(&syn.syn_ack().build()).unwrap();
    k.run(&syn.handshake_ack().build()).unwrap();
    for offset in (0..200).step_by(10) {
        expect(
            &mut k,
            &syn.data(offset, &[b'b'; 10]).build(),
            Reason::PassDefault,
            "small data",
        );
    }
    let events = payloads(&k.drain_events().unwrap());
    assert_eq!(events.len(), CAPTURE_MAX_EVENTS as usize);
    // A segment starting past 4096 (a lost earlier one) is not captured; one that starts below is, cut to
    // the event's chunk.
    let syn = base_syn(false).with_src_port(42003);
    run(&mut k, &syn.build(), "syn");
    k.run_egress(&syn.syn_ack().build()).unwrap();
    k.run(&syn.handshake_ack().build()).unwrap();
    expect(
        &mut k,
        &syn.data(CAPTURE_BYTES, &[1; 100]).build(),
        Reason::PassDefault,
        "past",
    );
    expect(
        &mut k,
        &syn.data(CAPTURE_BYTES - 1, &[2; 3000]).build(),
        Reason::PassDefault,
        "long",
    );
    let events = payloads(&k.drain_events().unwrap());
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].stream_offset, CAPTURE_BYTES - 1);
    assert_eq!(
        (events[0].segment_len, events[0].data.len()),
        (3000, CAPTURE_CHUNK)
    );
    // Pure ACKs are never captured, and a flow the kernel did not see start (no SYN) is not tracked.
    let stranger = base_syn(false).with_src_port(42004);
    expect(
        &mut k,
        &stranger.data(0, b"hello").build(),
        Reason::PassDefault,
        "no SYN",
    );
    assert!(k.drain_events().unwrap().is_empty());
    assert!(k.flow(&stranger.tuple()).is_none());
}

#[test]
fn request_events_follow_bursts_acks_and_the_flow_end() {
    let mut k = load();
    let gap = 10 * MS;
    k.set_config(Config {
        flags: CONFIG_FLAG_CONN_EVENTS | CONFIG_FLAG_CAPTURE | CONFIG_FLAG_REQUEST_EVENTS,
        request_gap_ns: gap,
        ..Config::default()
    })
    .unwrap();
    let syn = base_syn(false).with_src_port(43000);
    let server_isn = 5000u32;
    let ack = |offset: u32, ack: u32, flags: u8, payload: &[u8]| Segment {
        ack,
        flags,
        ..syn.data(offset, payload)
    };
    let mut now = T0;
    let mut step = |k: &mut KernelUnderTest, ms: u64, seg: Segment| {
        now += ms * MS;
        k.set_now(now).unwrap();
        expect(k, &seg.build(), Reason::PassDefault, "request flow");
        now
    };
    run(&mut k, &syn.build(), "syn");
    k.run_egress(&syn.syn_ack().build()).unwrap();
    k.run(&syn.handshake_ack().build()).unwrap();
    // Handshake ACK (sets the ACK base), then a first burst of two segments 1 ms apart.
    step(&mut k, 1, ack(0, server_isn + 1, tcp_flag::ACK, b""));
    let t_first = step(
        &mut k,
        1,
        ack(0, server_isn + 1, tcp_flag::ACK | tcp_flag::PSH, &[1; 100]),
    );
    let t_last = step(
        &mut k,
        1,
        ack(100, server_isn + 1, tcp_flag::ACK | tcp_flag::PSH, &[2; 50]),
    );
    assert!(
        requests(&k.drain_events().unwrap()).is_empty(),
        "no request within the burst"
    );
    // Payload after more than the gap: the first burst is a request.
    let t_second = step(
        &mut k,
        20,
        ack(150, server_isn + 1, tcp_flag::ACK | tcp_flag::PSH, &[3; 200]),
    );
    let events = k.drain_events().unwrap();
    let r = requests(&events);
    assert_eq!(r.len(), 1, "{events:?}");
    assert_eq!((r[0].start_ns, r[0].end_ns), (t_first, t_last));
    assert_eq!((r[0].bytes, r[0].packets, r[0].requests), (150, 2, 1));
    assert_eq!(r[0].response_bytes, 0);
    // A pure ACK that acknowledges 700 bytes of response closes the second request.
    step(&mut k, 2, ack(350, server_isn + 1 + 700, tcp_flag::ACK, b""));
    let r = requests(&k.drain_events().unwrap());
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].start_ns, r[0].end_ns), (t_second, t_second));
    assert_eq!((r[0].bytes, r[0].packets, r[0].requests), (200, 1, 2));
    assert_eq!(r[0].response_bytes, 700);
    // A pure ACK that does not advance, or one with nothing open, sends nothing.
    step(&mut k, 1, ack(350, server_isn + 1 + 700, tcp_flag::ACK, b""));
    step(&mut k, 1, ack(350, server_isn + 1 + 900, tcp_flag::ACK, b""));
    assert!(requests(&k.drain_events().unwrap()).is_empty());
    // A third request, then FIN: the open request is reported, then the flow's end; the flow is gone.
    step(
        &mut k,
        30,
        ack(350, server_isn + 1 + 900, tcp_flag::ACK | tcp_flag::PSH, &[4; 25]),
    );
    let t_end = step(
        &mut k,
        1,
        ack(375, server_isn + 1 + 1000, tcp_flag::ACK | tcp_flag::FIN, b""),
    );
    let events = k.drain_events().unwrap();
    let r = requests(&events);
    assert_eq!(r.len(), 1, "{events:?}");
    // The response to the previous request: everything acknowledged since that request's event.
    assert_eq!((r[0].bytes, r[0].requests, r[0].response_bytes), (25, 3, 300));
    let end = flow_ends(&events);
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].start_ns, T0);
    assert_eq!(end[0].end_ns, t_end);
    assert_eq!(
        (end[0].bytes, end[0].requests, end[0].response_bytes),
        (375, 3, 1000)
    );
    assert_eq!(end[0].syn_key, syn_key_of(&syn));
    // An in-sequence FIN closes the flow: it stays (its verdict keeps applying) but counts nothing more.
    let closed = k.flow(&syn.tuple()).expect("a closed flow stays until evicted");
    assert_ne!(closed.flags & detector_common::flow::flow_flag::FIN_SEEN, 0);
    // Packets after the end are untracked.
    step(
        &mut k,
        1,
        ack(375, server_isn + 1 + 1000, tcp_flag::ACK, &[5; 10]),
    );
    assert!(k.drain_events().unwrap().is_empty());
    // RST ends a flow too; with request events off, nothing is sent but the flow still goes.
    let rst_flow = base_syn(false).with_src_port(43001);
    run(&mut k, &rst_flow.build(), "syn");
    k.run_egress(&rst_flow.syn_ack().build()).unwrap();
    k.run(&rst_flow.handshake_ack().build()).unwrap();
    let rst = Segment {
        flags: tcp_flag::RST | tcp_flag::ACK,
        ..rst_flow.data(0, b"")
    };
    expect(&mut k, &rst.build(), Reason::PassDefault, "rst");
    assert!(flow_ends(&k.drain_events().unwrap()).len() == 1);
    assert!(k.flow(&rst_flow.tuple()).is_none());
}
