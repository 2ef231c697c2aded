//! The daemon's connection-table ager against the real maps: flows are made by the kernel programs
//! (`BPF_PROG_TEST_RUN`, test clock), aged by `detector_user::aging::Ager` as `aqd run` does. An idle flow, a
//! closed flow past its FIN timeout and a stale half-open entry go; a live flow, a freshly closed one and a
//! new half-open entry stay, and the figures balance (no eviction is reported where none happened).
//!
//! Needs root (it loads the programs).

use std::time::Duration;

use aqd_tests::{
    kernel::KernelUnderTest,
    packet::{Segment, tcp_flag},
};
use detector_common::{CONFIG_FLAG_REQUEST_EVENTS, Config};
use detector_user::aging::{Ager, AgingPolicy, AgingStats, Baseline, FlowFigures};

const SEC: u64 = 1_000_000_000;
const T0: u64 = 10_000 * SEC;
const PORT: u16 = 443;

fn client(port: u16) -> Segment {
    Segment::syn("192.0.2.7", "10.0.0.1", PORT).with_src_port(port)
}

#[test]
fn idle_and_closed_flows_and_stale_half_open_entries_age_out_live_ones_stay() {
    let mut k = KernelUnderTest::load(T0).expect("loading the XDP program (kernel tests need root)");
    k.maps.set_protected_ports(&[PORT]).unwrap();
    k.set_config(Config {
        flags: CONFIG_FLAG_REQUEST_EVENTS,
        ..Config::default()
    })
    .unwrap();
    let tables = k.flow_tables().unwrap();
    let baseline = Baseline::take(&tables, &k.counters().unwrap()).unwrap();
    let policy = AgingPolicy {
        flow_idle: Duration::from_secs(3600),
        fin_idle: Duration::from_secs(60),
        half_open: Duration::from_secs(30),
    };

    // At T0: an idle flow, a flow that keeps talking, a flow closed long ago, a SYN never answered.
    let idle = client(41001);
    let live = client(41002);
    let closed_early = client(41003);
    let closed_late = client(41004);
    let stale_syn = client(41005);
    for s in [&idle, &live, &closed_early, &closed_late] {
        k.handshake(s).unwrap();
        k.run(&s.data(0, b"GET /").build()).unwrap();
    }
    k.run(
        &closed_early
            .data(5, b"")
            .with_flags(tcp_flag::FIN | tcp_flag::ACK)
            .build(),
    )
    .unwrap();
    k.run(&stale_syn.build()).unwrap();

    // Two hours later the live flow sends a request, the other one closes, a new SYN arrives.
    let later = T0 + 2 * 3600 * SEC;
    k.set_now(later).unwrap();
    k.run(&live.data(5, b"GET /again").build()).unwrap();
    k.run(
        &closed_late
            .data(5, b"")
            .with_flags(tcp_flag::FIN | tcp_flag::ACK)
            .build(),
    )
    .unwrap();
    let fresh_syn = client(41006);
    k.run(&fresh_syn.build()).unwrap();
    for s in [&idle, &live, &closed_early, &closed_late] {
        assert!(
            tables.flow(&s.tuple()).is_some(),
            "flow {} before ageing",
            s.src_port
        );
    }
    assert!(tables.half_open(&stale_syn.tuple()).is_some());

    let stats = AgingStats::new(policy);
    let mut ager = Ager::new(tables.try_clone().unwrap());
    let report = ager.full_pass(&policy, later + SEC, &stats).unwrap();
    assert_eq!(
        (report.flows_idle, report.flows_closed, report.half_open),
        (1, 1, 1),
        "{report:?}"
    );
    assert!(tables.flow(&idle.tuple()).is_none(), "the idle flow stayed");
    assert!(
        tables.flow(&closed_early.tuple()).is_none(),
        "the long-closed flow stayed"
    );
    assert!(tables.flow(&live.tuple()).is_some(), "the live flow was aged out");
    assert!(
        tables.flow(&closed_late.tuple()).is_some(),
        "the just-closed flow was aged out"
    );
    assert!(
        tables.half_open(&stale_syn.tuple()).is_none(),
        "the stale SYN stayed"
    );
    assert!(
        tables.half_open(&fresh_syn.tuple()).is_some(),
        "the fresh SYN was aged out"
    );

    // A second pass finds nothing more; the figures balance with no eviction.
    let again = ager.full_pass(&policy, later + SEC, &stats).unwrap();
    assert_eq!((again.flows_idle, again.flows_closed, again.half_open), (0, 0, 0));
    let figures = FlowFigures::derive(
        &baseline,
        &k.counters().unwrap(),
        &stats,
        tables.entries().unwrap(),
    );
    assert_eq!(figures.flows_entries, 2);
    assert_eq!(figures.established, 4);
    assert_eq!(
        (figures.aged_idle, figures.aged_closed, figures.evicted),
        (1, 1, 0)
    );
    assert_eq!((figures.half_open_entries, figures.half_open_aged), (1, 1));
    assert_eq!(figures.half_open_evicted, 0);

    // The aged-out flow is no longer tracked: its next segment counts as unverified.
    let unverified = k.counters().unwrap().flows[detector_common::flow_counter::UNVERIFIED];
    k.run(&idle.data(5, b"late").build()).unwrap();
    assert_eq!(
        k.counters().unwrap().flows[detector_common::flow_counter::UNVERIFIED],
        unverified + 1
    );
}
