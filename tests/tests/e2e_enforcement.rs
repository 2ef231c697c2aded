//! End to end: the real `aqd` binary attached in native mode to a veth between two fresh network namespaces
//! ([`aqd_tests::netns::Lab`]), driven through its CLI, with real UDP and TCP traffic from the client namespace.
//!
//! Each test builds its own lab (unique namespaces, addresses and bpffs) and is bounded to a few seconds; the
//! lab's `Drop` tears everything down and checks it. Needs root; skipped with a message otherwise. Run
//! `cargo build -p detector-user` first (the tests run `target/debug/aqd`, or `$AQD_BIN`).

use std::{
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::ensure;
use aqd_tests::netns::{self, Family, Lab, SERVER_IF, UdpSink, udp_stream};

/// Datagrams per UDP probe.
const N: usize = 20;
/// Connect timeout of a TCP probe: generous for a veth, short enough for probes that must time out.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(400);

fn assert_tcp_connects(lab: &Lab, family: Family, n: usize) -> anyhow::Result<()> {
    let r = lab.tcp_probe(family, n, CONNECT_TIMEOUT)?;
    ensure!(
        r.connected == n && r.accepted == n,
        "expected {n} TCP connections over {family:?} to complete: {r:?}"
    );
    Ok(())
}

fn assert_tcp_times_out(lab: &Lab, family: Family) -> anyhow::Result<()> {
    let r = lab.tcp_probe(family, 1, CONNECT_TIMEOUT)?;
    ensure!(
        r.timed_out == 1 && r.connected == 0 && r.accepted == 0,
        "expected the TCP connect over {family:?} to time out (SYN dropped): {r:?}"
    );
    Ok(())
}

/// The single attachment `aqd status` reports, checked to be the server veth in native mode.
fn only_attachment(lab: &Lab) -> anyhow::Result<netns::Attachment> {
    let attachments = lab.status()?.attachments();
    ensure!(
        attachments.len() == 1 && attachments[0].iface == SERVER_IF && attachments[0].mode == "native",
        "expected exactly one native attachment on {SERVER_IF}, got {attachments:?}"
    );
    Ok(attachments[0].clone())
}

#[test]
fn traffic_passes_and_is_counted() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    let attached = lab.start_daemon()?;
    assert_eq!(attached.iface, SERVER_IF);
    assert_eq!(
        netns::xdp_program_id(&lab.server, SERVER_IF)?,
        Some(attached.program_id)
    );
    let before = lab.status()?;

    lab.assert_udp_passes(lab.client_v4.into(), N)?;
    lab.assert_udp_passes(lab.client_v6.into(), N)?;
    assert_tcp_connects(&lab, Family::V4, 3)?;

    let after = lab.status()?;
    // Ingress on the server veth only: 2N datagrams, and at least SYN + ACK per connection.
    let least = (2 * N + 3 * 2) as u64;
    let passed = after.reason("pass_default") - before.reason("pass_default");
    ensure!(
        passed >= least,
        "pass_default grew by {passed}, expected >= {least}: {}",
        after.json
    );
    ensure!(
        after.packets() - before.packets() >= least,
        "packets: {}",
        after.json
    );
    ensure!(after.dropped() == 0, "nothing should be dropped: {}", after.json);
    assert_eq!(only_attachment(&lab)?.program_id, attached.program_id);
    Ok(())
}

#[test]
fn block_drops_client_until_unblocked() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    lab.start_daemon()?;
    let client = lab.client_v4.to_string();
    lab.assert_udp_passes(lab.client_v4.into(), N)?;

    // From outside the namespaces: the maps are pinned in the lab's bpffs, reachable from everywhere.
    let out = lab.aqd_outside(&["block", &client])?.ok()?;
    assert!(out.stdout.contains(&client), "{out}");
    let before = lab.status()?;
    lab.assert_udp_dropped(lab.client_v4.into(), N)?;
    assert_tcp_times_out(&lab, Family::V4)?;
    // Another address of the same client is not affected by an exact block.
    lab.assert_udp_passes(lab.client_v4_alt.into(), N)?;

    let after = lab.status()?;
    let dropped = after.reason("drop_block_exact") - before.reason("drop_block_exact");
    ensure!(
        dropped > N as u64, // the N datagrams and at least one SYN
        "drop_block_exact grew by {dropped}: {}",
        after.json
    );
    let decisions = lab.decisions()?;
    let d = decisions
        .iter()
        .find(|d| d.net == format!("{client}/32"))
        .unwrap_or_else(|| panic!("no decision on {client}: {decisions:?}"));
    assert_eq!((d.action.as_str(), d.origin.as_str()), ("block", "cli"), "{d:?}");
    // Hits count policy walks (the kernel caches a source's outcome), so the decision matched at least once;
    // the packets it dropped are the drop_block_exact count above.
    ensure!(d.hits >= 1, "the decision never matched: {d:?}");

    // From inside the server namespace this time.
    lab.aqd(&["unblock", &client])?.ok()?;
    assert!(lab.decisions()?.is_empty());
    let audit = std::fs::read_to_string(lab.audit_log())?;
    let entries = audit
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<serde_json::Value>, _>>()?;
    let target = format!("{client}/32");
    for action in ["block", "unblock"] {
        let found = entries
            .iter()
            .any(|e| e["origin"] == "cli" && e["target"] == target.as_str() && e["action"] == action);
        assert!(found, "no cli {action} of {target} in the audit log:\n{audit}");
    }
    lab.assert_udp_passes(lab.client_v4.into(), N)?;
    assert_tcp_connects(&lab, Family::V4, 1)?;
    Ok(())
}

#[test]
fn ipv6_block_leaves_ipv4_alone() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    lab.start_daemon()?;
    let client6 = lab.client_v6.to_string();
    lab.assert_udp_passes(lab.client_v6.into(), N)?;

    lab.aqd(&["block", &client6, "--ttl", "10m"])?.ok()?;
    let before = lab.status()?;
    lab.assert_udp_dropped(lab.client_v6.into(), N)?;
    assert_tcp_times_out(&lab, Family::V6)?;
    lab.assert_udp_passes(lab.client_v4.into(), N)?;
    assert_tcp_connects(&lab, Family::V4, 1)?;

    let after = lab.status()?;
    let dropped = after.reason("drop_block_exact") - before.reason("drop_block_exact");
    ensure!(
        dropped > N as u64, // the N datagrams and at least one SYN
        "drop_block_exact grew by {dropped}: {}",
        after.json
    );
    let decisions = lab.decisions()?;
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert_eq!(decisions[0].net, format!("{client6}/128"));
    let left = decisions[0]
        .remaining_secs
        .expect("a --ttl decision has time left");
    // At most the 10 minutes asked for (aqd may jitter TTLs downwards).
    assert!((1..=600).contains(&left), "10m TTL, {left}s left");

    lab.aqd(&["unblock", &client6])?.ok()?;
    lab.assert_udp_passes(lab.client_v6.into(), N)?;
    assert_tcp_connects(&lab, Family::V6, 1)?;
    Ok(())
}

#[test]
fn restart_keeps_block_and_replaces_program_atomically() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    let first = lab.start_daemon()?;
    let blocked: IpAddr = lab.client_v4.into();
    let allowed: IpAddr = lab.client_v4_alt.into();
    lab.aqd(&["block", &blocked.to_string()])?.ok()?;
    lab.assert_udp_dropped(blocked, N)?;

    // No daemon: the program stays attached (it belongs to the interface) and keeps enforcing.
    let status = lab.stop_daemon()?;
    assert!(
        status.success(),
        "aqd run should exit cleanly on SIGTERM: {status}"
    );
    assert_eq!(only_attachment(&lab)?.program_id, first.program_id);
    let before = lab.status()?;
    assert_eq!(before.daemon_running(), Some(false), "{}", before.json);
    lab.assert_udp_dropped(blocked, N)?;
    lab.assert_udp_passes(allowed, N)?;
    let after = lab.status()?;
    ensure!(
        after.reason("drop_block_exact") - before.reason("drop_block_exact") >= N as u64,
        "no daemon, yet the program must still count its drops: {}",
        after.json
    );

    // A new daemon while both sources keep sending: the blocked one must never get through (no gap while the
    // program is replaced), the allowed one must lose nothing.
    let to = lab.service(blocked);
    let sink = UdpSink::bind(&lab.server, to)?;
    let stream_for = Duration::from_millis(2500);
    let stream = udp_stream(
        &lab.client,
        vec![blocked, allowed],
        to,
        Duration::from_millis(2),
        stream_for,
    );
    let arrivals = sink.collect_until(Instant::now() + stream_for + Duration::from_millis(300));
    let second = lab.start_daemon()?;
    let sent = stream.join()?;
    let arrivals = arrivals.join().expect("receiver thread")?;
    let from = |a: IpAddr| arrivals.iter().filter(|x| x.from.ip() == a).count();
    assert_eq!(
        from(blocked),
        0,
        "blocked source got through during the restart (sent {sent:?})"
    );
    assert_eq!(
        from(allowed),
        sent[1],
        "allowed traffic was lost during the restart"
    );

    assert_ne!(
        second.program_id, first.program_id,
        "the new daemon must attach its own program"
    );
    assert_eq!(only_attachment(&lab)?.program_id, second.program_id);
    assert_eq!(
        netns::xdp_program_id(&lab.server, SERVER_IF)?,
        Some(second.program_id)
    );
    let log = lab.daemon_log(2);
    assert!(
        log.contains("replaced the running aqd program atomically"),
        "daemon 2 log:\n{log}"
    );
    // The replaced program is released (freed after an RCU grace period).
    let deadline = Instant::now() + Duration::from_secs(3);
    while netns::program_loaded(first.program_id) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !netns::program_loaded(first.program_id),
        "old program {} leaked",
        first.program_id
    );

    lab.assert_udp_dropped(blocked, N)?;
    lab.aqd(&["unblock", &blocked.to_string()])?.ok()?;
    lab.assert_udp_passes(blocked, N)?;
    Ok(())
}

#[test]
fn sigkill_during_traffic_keeps_enforcing() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    let attached = lab.start_daemon()?;
    let blocked: IpAddr = lab.client_v4.into();
    let allowed: IpAddr = lab.client_v4_alt.into();
    lab.aqd(&["block", &blocked.to_string()])?.ok()?;
    let before = lab.status()?;

    let sent = lab.assert_enforcement_survives_sigkill(blocked, allowed)?;

    assert_eq!(only_attachment(&lab)?.program_id, attached.program_id);
    let after = lab.status()?;
    let dropped = after.reason("drop_block_exact") - before.reason("drop_block_exact");
    assert_eq!(
        dropped, sent[0] as u64,
        "every blocked datagram counted once: {}",
        after.json
    );
    lab.assert_udp_dropped(blocked, N)?;

    // SIGKILL left the control socket behind: a new daemon replaces it and answers the CLI.
    let second = lab.start_daemon()?;
    assert_ne!(second.program_id, attached.program_id);
    let status = lab.status()?;
    assert_eq!(status.daemon_running(), Some(true), "{}", status.json);
    lab.aqd(&["unblock", &blocked.to_string()])?.ok()?;
    lab.assert_udp_passes(blocked, N)?;
    Ok(())
}

#[test]
fn detach_removes_attachment_and_pins() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    lab.start_daemon()?;
    lab.aqd(&["block", &lab.client_v4.to_string()])?.ok()?;
    lab.assert_udp_dropped(lab.client_v4.into(), N)?;
    lab.stop_daemon()?;
    assert!(lab.pin_dir().join("DECISION_EXACT").exists());

    let out = lab.aqd(&["detach"])?.ok()?;
    assert!(out.stdout.contains(SERVER_IF), "{out}");
    assert_eq!(
        netns::xdp_program_id(&lab.server, SERVER_IF)?,
        None,
        "XDP still attached"
    );
    assert!(
        !lab.pin_dir().exists(),
        "pinned maps left in {}",
        lab.pin_dir().display()
    );
    // Nothing left enforcing: the old block is gone with the program.
    lab.assert_udp_passes(lab.client_v4.into(), N)?;
    assert_tcp_connects(&lab, Family::V4, 1)?;
    Ok(())
}

#[test]
fn detach_iface_keeps_maps_and_stops_enforcing() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    lab.start_daemon()?;
    let client = lab.client_v4.to_string();
    lab.aqd(&["block", &client])?.ok()?;
    lab.stop_daemon()?;

    lab.aqd(&["detach", "--iface", SERVER_IF])?.ok()?;
    let status = lab.status()?;
    assert!(status.attachments().is_empty(), "{}", status.json);
    assert_eq!(netns::xdp_program_id(&lab.server, SERVER_IF)?, None);
    // Untouched: it passes and no counter moves (no program runs).
    lab.assert_udp_passes(lab.client_v4.into(), N)?;
    assert_eq!(lab.status()?.packets(), status.packets());
    // The state is kept: the decision is still there and a new daemon enforces it again.
    assert_eq!(lab.decisions()?.len(), 1);
    lab.start_daemon()?;
    lab.assert_udp_dropped(lab.client_v4.into(), N)?;
    // A second detach of the same interface has nothing to do.
    lab.stop_daemon()?;
    lab.aqd(&["detach", "--iface", SERVER_IF])?.ok()?;
    let again = lab.aqd(&["detach", "--iface", SERVER_IF])?;
    assert_eq!(again.code, Some(3), "{again}");
    Ok(())
}

/// `aqd status` after a full `aqd detach` should report "attached nowhere", not fail on the missing pins.
#[test]
fn status_after_full_detach_reports_no_attachment() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    lab.start_daemon()?;
    lab.stop_daemon()?;
    lab.aqd(&["detach"])?.ok()?;
    let status = lab.status()?;
    assert!(status.attachments().is_empty(), "{}", status.json);
    Ok(())
}

#[test]
fn cli_rejects_bad_input() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    // The maps must exist for the checks that run after opening them (host bits, unblock).
    lab.start_daemon()?;
    let expect = |args: &[&str], code: i32, mention: &str| -> anyhow::Result<()> {
        let out = lab.aqd(args)?;
        ensure!(out.code == Some(code), "expected exit {code}: {out}");
        ensure!(
            out.stderr.contains(mention),
            "stderr should mention {mention:?}: {out}"
        );
        Ok(())
    };
    expect(&["block", "10.0.0.1/33"], 2, "10.0.0.1/33")?;
    expect(&["block", "not-an-ip"], 2, "not-an-ip")?;
    expect(&["block", "10.0.0.5/24"], 2, "10.0.0.0/24")?;
    expect(&["block", "2001:db8::1/64"], 2, "2001:db8::/64")?;
    expect(&["unblock", "10.0.0.9"], 3, "10.0.0.9")?;
    // Nothing was written by the rejected commands.
    assert!(lab.decisions()?.is_empty());
    Ok(())
}

/// Input errors are input errors even where no daemon ever ran (no pinned maps yet).
#[test]
fn cli_rejects_host_bits_without_pinned_maps() -> anyhow::Result<()> {
    let Some(lab) = netns::lab_for_test() else {
        return Ok(());
    };
    let out = lab.aqd(&["block", "10.0.0.5/24"])?;
    ensure!(out.code == Some(2) && out.stderr.contains("10.0.0.0/24"), "{out}");
    Ok(())
}
