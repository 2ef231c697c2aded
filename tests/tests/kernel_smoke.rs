//! The harness itself: the program loads, passes an unknown source and drops a blocked one.

use aqd_tests::{
    kernel::{KernelUnderTest, XDP_DROP, XDP_PASS},
    packet::Frame,
};
use detector_common::{Action, Origin, Reason};

#[test]
fn unknown_source_passes_and_blocked_source_drops() {
    let mut k = KernelUnderTest::load(1_000_000_000).unwrap();
    let frame = Frame::udp("192.0.2.1", "198.51.100.1", 443).build();
    let out = k.classify(&frame).unwrap();
    assert_eq!((out.action, out.reason), (XDP_PASS, Reason::PassDefault));
    k.maps
        .decision_insert(
            "192.0.2.1/32".parse().unwrap(),
            Action::Block,
            0,
            0,
            Origin::Cli,
            None,
        )
        .unwrap();
    let out = k.classify(&frame).unwrap();
    assert_eq!((out.action, out.reason), (XDP_DROP, Reason::DropBlockExact));
}
