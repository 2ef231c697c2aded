//! The harness itself: the program loads, passes an unknown source and drops a blocked one.

use aqd_tests::{
    kernel::{KernelUnderTest, XDP_DROP, XDP_PASS},
    packet::Frame,
};
use detector_common::{Action, Origin, Reason};
use std::io::Write as _;

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

/// Prints what the verifier did with each program (instructions processed, load time) and holds each program
/// to half the kernel's 1,000,000-instruction budget: a change that multiplies the verifier's paths (an early
/// exit in a walk loop, walk state in registers; see hello.rs) fails here rather than on some other kernel.
#[test]
fn verifier_cost_per_program() {
    let started = std::time::Instant::now();
    let mut ebpf = detector_user::loader::load(&detector_user::loader::LoadOptions::default()).unwrap();
    let load_time = started.elapsed();
    for name in [
        detector_common::PROGRAM_NAME,
        detector_common::TCP_PROGRAM_NAME,
        detector_common::HELLO_PROGRAM_NAME,
    ] {
        let program = detector_user::loader::named_program_mut(&mut ebpf, name).unwrap();
        let info = program.info().unwrap();
        let processed = info.verified_instruction_count();
        // Straight to stdout, not `println!` (which the test harness captures): the figures then stand in the
        // console log of every kernel `cargo xtask kernels` boots, passed or failed.
        let _ = writeln!(
            std::io::stdout().lock(),
            "{name}: {} instructions, verifier processed {processed:?}",
            info.size_translated().unwrap_or(0) / 8,
        );
        if let Some(processed) = processed {
            assert!(
                processed < 500_000,
                "{name}: the verifier processed {processed} instructions (budget 500,000 of the kernel's 1,000,000)"
            );
        }
    }
    let _ = writeln!(std::io::stdout().lock(), "load of all programs: {load_time:?}");
}
