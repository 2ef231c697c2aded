//! What a client (or a forger) can do to the kernel's view of a connection, through `BPF_PROG_TEST_RUN`:
//! forged and out-of-window closes, bad-checksum decoys, ClientHellos that disagree, handshakes that were never
//! completed, and a SYN flood. None of it may erase a tracked flow, hide its ClientHello from its verdict, or
//! make the kernel record traffic of a source that never completed a handshake. Nor may forged traffic refill
//! a throttled source's budget (a random-source flood evicting its state) or spend the budget of a throttled
//! prefix's honest users.
//!
//! Needs root (it loads the programs).

use aqd_tests::{
    fp::{block_verdict, client_hello_record, hello_key_of_record},
    kernel::{KernelUnderTest, XDP_DROP, XDP_PASS},
    packet::{Frame, Segment, tcp_flag},
};
use detector_common::{
    Action, CONFIG_FLAG_CAPTURE, CONFIG_FLAG_CONN_EVENTS, CONFIG_FLAG_REQUEST_EVENTS, Config, Origin, Reason,
    flow::flow_flag, flow_counter, map_names,
};
use detector_user::{events::Event, maps::rate_class_limits};

const SEC: u64 = 1_000_000_000;
const T0: u64 = 1_000 * SEC;
const PORT: u16 = 443;

fn load() -> KernelUnderTest {
    let mut k = KernelUnderTest::load(T0).expect("loading the XDP program (kernel tests need root)");
    k.maps.set_protected_ports(&[PORT]).unwrap();
    k.set_config(Config {
        flags: CONFIG_FLAG_CAPTURE | CONFIG_FLAG_CONN_EVENTS | CONFIG_FLAG_REQUEST_EVENTS,
        ..Config::default()
    })
    .unwrap();
    k
}

fn client(port: u16) -> Segment {
    Segment::syn("192.0.2.7", "10.0.0.1", PORT).with_src_port(port)
}

fn reason(k: &mut KernelUnderTest, segment: &Segment) -> Reason {
    k.classify(&segment.build()).unwrap().reason
}

/// Events other than SYN statistics: what the model would see.
fn observed(k: &mut KernelUnderTest) -> Vec<Event> {
    k.drain_events()
        .unwrap()
        .into_iter()
        .filter(|e| !matches!(e, Event::Conn { .. }))
        .collect()
}

fn rst(syn: &Segment, offset: u32) -> Segment {
    syn.data(offset, b"").with_flags(tcp_flag::RST | tcp_flag::ACK)
}

#[test]
fn out_of_window_and_bad_checksum_closes_keep_the_flow_and_its_verdict() {
    let mut k = load();
    let hello = client_hello_record();
    k.set_hello_verdict(hello_key_of_record(&hello), block_verdict())
        .unwrap();
    let syn = client(40000);
    k.handshake(&syn).unwrap();
    assert!(k.flow(&syn.tuple()).is_some(), "handshake verified");
    // RSTs the server would not accept (RFC 5961): far out of the window, one byte off, a bad checksum.
    assert_eq!(reason(&mut k, &rst(&syn, 1 << 30)), Reason::PassCloseIgnored);
    assert_eq!(reason(&mut k, &rst(&syn, 1)), Reason::PassCloseIgnored);
    assert_eq!(
        reason(&mut k, &rst(&syn, 0).with_bad_checksum()),
        Reason::PassBadChecksum
    );
    let fin = syn.data(7, b"").with_flags(tcp_flag::FIN | tcp_flag::ACK);
    assert_eq!(reason(&mut k, &fin), Reason::PassCloseIgnored);
    assert!(
        k.flow(&syn.tuple()).is_some(),
        "the flow survives every ignored close"
    );
    // So the ClientHello is still keyed and dropped, and so is the rest of the flow.
    assert_eq!(reason(&mut k, &syn.data(0, &hello)), Reason::DropHelloFingerprint);
    assert_eq!(
        reason(&mut k, &syn.data(hello.len() as u32, b"GET /")),
        Reason::DropFlowFingerprint
    );
    let counters = k.counters().unwrap();
    assert_eq!(counters.flows[flow_counter::RESET], 0);
}

#[test]
fn an_in_sequence_rst_ends_the_flow_and_a_fin_closes_it() {
    let mut k = load();
    let syn = client(40001);
    k.handshake(&syn).unwrap();
    assert_eq!(reason(&mut k, &syn.data(0, b"hello")), Reason::PassDefault);
    // After 5 bytes the next sequence number is offset 5: exactly that RST is accepted.
    assert_eq!(reason(&mut k, &rst(&syn, 5)), Reason::PassDefault);
    assert!(k.flow(&syn.tuple()).is_none());
    assert_eq!(k.counters().unwrap().flows[flow_counter::RESET], 1);
    let _ = k.drain_events().unwrap();

    let syn = client(40002);
    k.handshake(&syn).unwrap();
    let fin = syn.data(0, b"bye").with_flags(tcp_flag::FIN | tcp_flag::ACK);
    assert_eq!(reason(&mut k, &fin), Reason::PassDefault);
    let flow = k.flow(&syn.tuple()).expect("a closed flow stays");
    assert_ne!(flow.flags & flow_flag::FIN_SEEN, 0);
    assert_eq!(flow.next_seq, syn.seq.wrapping_add(1 + 3 + 1));
    let ends = observed(&mut k)
        .into_iter()
        .filter(|e| matches!(e, Event::FlowEnd(_)))
        .count();
    assert_eq!(ends, 1);
}

#[test]
fn a_bad_checksum_decoy_client_hello_is_not_keyed() {
    let mut k = load();
    let hello = client_hello_record();
    let blocked = hello_key_of_record(&hello);
    k.set_hello_verdict(blocked, block_verdict()).unwrap();
    // The decoy: a ClientHello the server drops (bad checksum) and whose key is not blocked.
    let mut decoy = hello.clone();
    let last = decoy.len() - 1;
    decoy[last] ^= 0x5a;
    let syn = client(40003);
    k.handshake(&syn).unwrap();
    let _ = k.drain_events().unwrap();
    assert_eq!(
        reason(&mut k, &syn.data(0, &decoy).with_bad_checksum()),
        Reason::PassBadChecksum
    );
    let flow = k.flow(&syn.tuple()).unwrap();
    assert_eq!(flow.hello_key, 0, "the decoy was not keyed");
    assert_eq!(flow.next_seq, syn.seq.wrapping_add(1), "nor counted as data");
    assert!(observed(&mut k).is_empty(), "nor captured");
    // The real one, as the server gets it, is keyed and dropped.
    assert_eq!(reason(&mut k, &syn.data(0, &hello)), Reason::DropHelloFingerprint);
}

#[test]
fn client_hellos_that_disagree_mark_the_flow_and_the_stricter_verdict_applies() {
    let mut k = load();
    let hello = client_hello_record();
    let blocked = hello_key_of_record(&hello);
    k.set_hello_verdict(blocked, block_verdict()).unwrap();
    // First an unremarkable segment at offset 0 (not a ClientHello the kernel keys), then the blocked one
    // "retransmitted" over it.
    let syn = client(40004);
    k.handshake(&syn).unwrap();
    let other = vec![0x16, 0x03, 0x01, 0x00, 0x01, 0x02];
    assert_eq!(reason(&mut k, &syn.data(0, &other)), Reason::PassDefault);
    assert_eq!(reason(&mut k, &syn.data(0, &hello)), Reason::DropHelloFingerprint);
    let flow = k.flow(&syn.tuple()).unwrap();
    assert_ne!(flow.flags & flow_flag::SUSPECT, 0);
    // A true retransmission (same bytes) is no disagreement.
    let syn = client(40005);
    k.handshake(&syn).unwrap();
    let plain = b"GET / HTTP/1.1\r\n\r\n";
    assert_eq!(reason(&mut k, &syn.data(0, plain)), Reason::PassDefault);
    assert_eq!(reason(&mut k, &syn.data(0, plain)), Reason::PassDefault);
    assert_eq!(k.flow(&syn.tuple()).unwrap().flags & flow_flag::SUSPECT, 0);
}

#[test]
fn forged_sources_never_complete_a_handshake_and_record_nothing() {
    let mut k = load();
    let hello = client_hello_record();
    k.set_hello_verdict(hello_key_of_record(&hello), block_verdict())
        .unwrap();
    // A hydra of forged addresses in one /24: SYN, then the ACK and templated data a blind sender can make
    // (it never saw the SYN-ACK, so it guesses the server's ISN).
    for i in 0..200u32 {
        let syn = Segment::syn(&format!("198.51.100.{}", i % 250), "10.0.0.1", PORT)
            .with_src_port(30000 + i as u16);
        assert_eq!(reason(&mut k, &syn), Reason::PassDefault);
        // The server did answer (to the real owner of the address): egress learns its ISN.
        k.run_egress(&syn.syn_ack().build()).unwrap();
        let guess = |seg: Segment| Segment {
            ack: 777_000 + i,
            ..seg
        };
        assert_eq!(reason(&mut k, &guess(syn.handshake_ack())), Reason::PassDefault);
        assert_eq!(
            reason(&mut k, &guess(syn.data(0, b"POST /v1/chat {templated}"))),
            Reason::PassDefault
        );
        assert!(k.flow(&syn.tuple()).is_none(), "forged flow {i} tracked");
    }
    assert!(
        observed(&mut k).is_empty(),
        "no event from a forged source may reach the model"
    );
    let counters = k.counters().unwrap();
    assert_eq!(counters.flows[flow_counter::ESTABLISHED], 0);
    assert!(counters.flows[flow_counter::HANDSHAKE_FAILED] >= 200);
    // A blocked ClientHello is dropped on an unverified flow too.
    let syn = Segment::syn("198.51.100.251", "10.0.0.1", PORT);
    let _ = reason(&mut k, &syn);
    let out = k.classify(&syn.data(0, &hello).build()).unwrap();
    assert_eq!((out.action, out.reason), (XDP_DROP, Reason::DropHelloFingerprint));
}

#[test]
fn a_second_syn_with_another_isn_cannot_unverify_the_real_connection() {
    let mut k = load();
    let syn = client(40006);
    assert_eq!(reason(&mut k, &syn), Reason::PassDefault);
    k.run_egress(&syn.syn_ack().build()).unwrap();
    // Another SYN of the tuple with another ISN (the server ignores it, its SYN-RECV stays).
    let other = Segment {
        seq: 123_456,
        ..syn.clone()
    };
    assert_eq!(reason(&mut k, &other), Reason::PassDefault);
    assert_eq!(reason(&mut k, &syn.handshake_ack()), Reason::PassDefault);
    assert!(k.flow(&syn.tuple()).is_some());
    // And a SYN on an established flow changes nothing (the server answers with a challenge ACK).
    assert_eq!(reason(&mut k, &other), Reason::PassDefault);
    assert_eq!(k.flow(&syn.tuple()).unwrap().isn, syn.seq);
}

#[test]
fn a_random_source_syn_flood_leaves_established_flows_tracked() {
    let mut k = load();
    let keep_alive = client(40007);
    k.handshake(&keep_alive).unwrap();
    assert_eq!(reason(&mut k, &keep_alive.data(0, b"first")), Reason::PassDefault);
    // More spoofed SYNs than the half-open table holds.
    let flood = detector_common::capacity::HALF_OPEN + 10_000;
    for i in 0..flood {
        let src = format!("100.{}.{}.{}", 64 + (i >> 16) % 64, (i >> 8) & 0xff, i & 0xff);
        let syn = Segment::syn(&src, "10.0.0.1", PORT).with_src_port(1024 + (i % 60000) as u16);
        assert_eq!(k.run(&syn.build()).unwrap(), XDP_PASS);
    }
    let _ = k.drain_events().unwrap();
    assert!(
        k.flow(&keep_alive.tuple()).is_some(),
        "the established flow was evicted"
    );
    // It still produces request events: a second request after an idle gap.
    k.set_now(T0 + SEC).unwrap();
    assert_eq!(
        reason(&mut k, &keep_alive.data(5, b"second")),
        Reason::PassDefault
    );
    let requests = observed(&mut k)
        .into_iter()
        .filter(|e| matches!(e, Event::Request(_)))
        .count();
    assert_eq!(requests, 1);
}

#[test]
fn a_bad_checksum_handshake_ack_completes_nothing() {
    let mut k = load();
    let syn = client(40008);
    assert_eq!(reason(&mut k, &syn), Reason::PassDefault);
    k.run_egress(&syn.syn_ack().build()).unwrap();
    let ack = syn.handshake_ack();
    assert_eq!(
        reason(&mut k, &ack.clone().with_bad_checksum()),
        Reason::PassBadChecksum
    );
    assert!(
        k.flow(&syn.tuple()).is_none(),
        "a bad-checksum ACK verified the handshake"
    );
    // The server drops that ACK; the client's real one completes the handshake.
    assert_eq!(reason(&mut k, &ack), Reason::PassDefault);
    assert!(k.flow(&syn.tuple()).is_some());
    let established = observed(&mut k)
        .into_iter()
        .filter(|e| matches!(e, Event::Established(_)))
        .count();
    assert_eq!(established, 1);
}

/// A throttle decision (exact or prefix) on `net` with `class`.
fn throttle(k: &mut KernelUnderTest, net: &str, class: u8) {
    k.maps
        .decision_insert(
            net.parse().unwrap(),
            Action::Throttle,
            class,
            0,
            Origin::Cli,
            None,
        )
        .unwrap();
}

/// How many of `n` copies of `frame` pass.
fn passes(k: &mut KernelUnderTest, frame: &[u8], n: usize) -> usize {
    (0..n)
        .filter(|_| k.classify(frame).unwrap().action == XDP_PASS)
        .count()
}

/// A random-source flood to a protected port makes a `SOURCES` entry (an LRU map) for every new source and so
/// evicts a throttled source's entry. Its throttle decision's budget is kept apart (`EXACT_BUCKETS`, and
/// `PREFIX_BUCKETS` for a /24), created only for a live decision, so the flood hands the throttled source no
/// fresh burst. `SOURCES` is shrunk to 4,096 entries here so that a flood of 10× that runs in seconds (under
/// emulation in `cargo xtask kernels` too); the test checks that the flood did evict the entry.
#[test]
fn a_random_source_flood_cannot_refill_a_throttled_sources_budget() {
    const SOURCES_CAPACITY: u32 = 4_096;
    const FLOOD: u32 = 10 * SOURCES_CAPACITY;
    let mut k = KernelUnderTest::load_resized(T0, &[(map_names::SOURCES, SOURCES_CAPACITY)])
        .expect("loading the XDP program (kernel tests need root)");
    k.maps.set_protected_ports(&[PORT]).unwrap();
    // 1 packet/s, burst 20; the test clock stands still, so nothing refills.
    k.maps.set_rate_class(2, rate_class_limits(1, 20, 0, 0)).unwrap();
    throttle(&mut k, "192.0.2.50/32", 2);
    throttle(&mut k, "198.51.100.0/24", 2);
    let exact = Frame::udp("192.0.2.50", "10.0.0.1", PORT).build();
    let in_prefix = Frame::udp("198.51.100.7", "10.0.0.1", PORT).build();
    for frame in [&exact, &in_prefix] {
        assert_eq!(passes(&mut k, frame, 30), 20, "the burst, then drops");
    }
    // Spoofed sources from 100.64.0.0/10, each new: every one gets a SOURCES entry.
    for i in 0..FLOOD {
        let src = format!("100.{}.{}.{}", 64 + (i >> 16), (i >> 8) & 0xff, i & 0xff);
        let (action, _) = k
            .run_repeat(&Frame::udp(&src, "10.0.0.1", PORT).build(), 1)
            .unwrap();
        assert_eq!(action, XDP_PASS, "{src}: an unknown source passes");
    }
    for src in ["192.0.2.50", "198.51.100.7"] {
        assert!(
            k.maps.bucket(src.parse().unwrap()).is_none(),
            "the flood evicted {src}'s SOURCES entry (else this test shows nothing)"
        );
    }
    for frame in [&exact, &in_prefix] {
        let out = k.classify(frame).unwrap();
        assert_eq!(
            out.reason,
            Reason::DropRatePackets,
            "a fresh burst after the flood"
        );
    }
    assert_eq!(passes(&mut k, &exact, 10) + passes(&mut k, &in_prefix, 10), 0);
}

/// Forged packets from addresses inside a throttled /24 — ACKs, data, FINs and RSTs of no verified flow, and
/// SYNs — must not spend the packet budget the prefix's honest users share: the non-SYN ones are dropped and
/// counted (`DropUnverifiedThrottled`), the SYNs spend only the connection budget. An honest client with a
/// verified connection then gets exactly the packet budget the handshake left it.
#[test]
fn forged_packets_in_a_throttled_prefix_cannot_spend_its_honest_users_budget() {
    const FORGED: u32 = 1_000;
    let mut k = load();
    // 1 packet/s burst 10; 1 connection/s burst 2. The test clock stands still.
    k.maps.set_rate_class(3, rate_class_limits(1, 10, 1, 2)).unwrap();
    throttle(&mut k, "203.0.113.0/24", 3);
    let honest = Segment::syn("203.0.113.10", "10.0.0.1", PORT).with_src_port(41000);
    // The SYN spends one connection token, the handshake's ACK one packet token.
    assert_eq!(reason(&mut k, &honest), Reason::PassThrottled);
    k.run_egress(&honest.syn_ack().build()).unwrap();
    assert_eq!(reason(&mut k, &honest.handshake_ack()), Reason::PassThrottled);
    assert!(k.flow(&honest.tuple()).is_some(), "handshake verified");

    let before = k.counters().unwrap();
    let mut syns_passed = 0;
    for i in 0..FORGED {
        // Forged sources all over the /24 (the honest address too), on ports of no verified flow.
        let src = format!("203.0.113.{}", 1 + i % 254);
        let forged = Segment::syn(&src, "10.0.0.1", PORT).with_src_port(20000 + (i % 20000) as u16);
        let non_syn = match i % 4 {
            0 => forged.handshake_ack(),
            1 => forged.data(0, b"GET / HTTP/1.1\r\n\r\n"),
            2 => forged.data(0, b"").with_flags(tcp_flag::FIN | tcp_flag::ACK),
            _ => forged.data(0, b"").with_flags(tcp_flag::RST),
        };
        assert_eq!(
            reason(&mut k, &non_syn),
            Reason::DropUnverifiedThrottled,
            "{src}: a packet of no verified flow"
        );
        match reason(&mut k, &forged) {
            Reason::PassThrottled => syns_passed += 1,
            Reason::DropRateConnections => {}
            other => panic!("{src}: a forged SYN got {other:?}: only the connection limit may apply"),
        }
    }
    // The one connection token the honest SYN left.
    assert_eq!(syns_passed, 1);
    let after = k.counters().unwrap();
    let moved = |r: Reason| after.by_reason[r as usize] - before.by_reason[r as usize];
    assert_eq!(moved(Reason::DropUnverifiedThrottled), FORGED as u64);
    assert_eq!(moved(Reason::DropRatePackets), 0);

    // The honest client's packet budget is untouched: 9 tokens after its handshake's ACK.
    let mut offset = 0u32;
    let mut sent = |k: &mut KernelUnderTest| {
        let segment = honest.data(offset, b"GET / HTTP/1.1\r\n\r\n");
        offset += 18;
        reason(k, &segment)
    };
    for n in 0..9 {
        assert_eq!(
            sent(&mut k),
            Reason::PassThrottled,
            "request {n} of the honest client"
        );
    }
    assert_eq!(sent(&mut k), Reason::DropRatePackets, "then the budget is spent");
}

/// Issue 9 item 9: 1,000 addresses in a throttled prefix share its budget. Every address of a throttled /24 (all
/// 256, four connections each: 1,024) and 1,000 addresses of a throttled /64 (one connection each) open their
/// connections at one instant (the test clock stands still): between them they get the class's connection burst
/// once, and the flows that got through the class's packet burst once, not each address its own.
#[test]
fn a_thousand_addresses_of_a_throttled_prefix_share_its_budget() {
    const CONN_BURST: usize = 200;
    const PACKET_BURST: usize = 300;
    let mut k = load();
    k.maps
        .set_rate_class(4, rate_class_limits(1, PACKET_BURST as u32, 1, CONN_BURST as u32))
        .unwrap();
    throttle(&mut k, "198.51.100.0/24", 4);
    throttle(&mut k, "2001:db8:9:9::/64", 4);
    let v4: Vec<(String, u16)> = (0..1024u32)
        .map(|i| (format!("198.51.100.{}", i % 256), 30000 + (i / 256) as u16))
        .collect();
    let v6: Vec<(String, u16)> = (1..=1000u32)
        .map(|i| (format!("2001:db8:9:9::{i:x}"), 30000))
        .collect();
    for (clients, dst) in [(v4, "10.0.0.1"), (v6, "2001:db8::1")] {
        let addresses: std::collections::HashSet<&str> = clients.iter().map(|(a, _)| a.as_str()).collect();
        assert!(addresses.len() >= 256, "{} distinct addresses", addresses.len());
        let mut connected = Vec::new();
        for (src, port) in &clients {
            let syn = Segment::syn(src, dst, PORT).with_src_port(*port);
            match reason(&mut k, &syn) {
                Reason::PassThrottled => connected.push(syn),
                Reason::DropRateConnections => {}
                other => panic!("{src}:{port}: a SYN got {other:?}"),
            }
        }
        assert_eq!(
            connected.len(),
            CONN_BURST,
            "{dst}: the prefix's connection burst, shared"
        );
        // Their handshakes complete; each ACK spends one token of the shared packet budget.
        for syn in &connected {
            k.run_egress(&syn.syn_ack().build()).unwrap();
            assert_eq!(reason(&mut k, &syn.handshake_ack()), Reason::PassThrottled);
            assert!(k.flow(&syn.tuple()).is_some(), "handshake verified");
        }
        // A request on every connection: what is left of the packet burst passes, then every address is refused.
        let mut passed = 0;
        for syn in &connected {
            match reason(&mut k, &syn.data(0, b"GET / HTTP/1.1\r\n\r\n")) {
                Reason::PassThrottled => passed += 1,
                Reason::DropRatePackets => {}
                other => panic!("{:?}: a request got {other:?}", syn.tuple()),
            }
        }
        assert_eq!(
            passed,
            PACKET_BURST - CONN_BURST,
            "{dst}: the rest of the shared packet burst"
        );
    }
}
