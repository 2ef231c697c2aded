//! End to end: durable state across a simulated reboot, the single-instance lock and audit log rotation, in a
//! two-namespace lab ([`aqd_tests::netns::Lab`]) with its own bpffs, run directory and state directory.
//!
//! The reboot: the daemon is SIGKILLed, `aqd detach` removes the XDP attachment and the pins, the lab's run-time
//! files (socket, config entries) are deleted, and traffic shows nothing is enforced any more; then `aqd run`
//! again must put every decision back (with the TTL it had left), the list edits and the fingerprint verdict,
//! within 5 s of its start, enforced on traffic.
//!
//! Needs root; skipped with a message otherwise. Run `cargo build -p detector-user` first.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, ensure};
use aqd_tests::netns::{self, Family, Lab, SERVER_IF};
use serde_json::Value;

/// Datagrams per probe.
const N: usize = 20;
/// How far a restored TTL may be from the one expected (the CLI's whole seconds, process start-up).
const TTL_SLACK_SECS: i64 = 3;

/// What `aqd list all --json` holds: (list or "decision", target) → (action, remaining seconds; None =
/// permanent).
type Listed = BTreeMap<(String, String), (String, Option<i64>)>;

fn listed(lab: &Lab) -> anyhow::Result<Listed> {
    let json = lab.aqd(&["list", "all", "--json"])?.ok()?.json()?;
    let mut out = BTreeMap::new();
    let rows = |k: &str| -> anyhow::Result<Vec<Value>> {
        json[k]
            .as_array()
            .cloned()
            .ok_or_else(|| anyhow!("`aqd list all --json` has no {k}: {json}"))
    };
    for d in rows("decisions")? {
        let net = d["net"].as_str().context("decision net")?.to_string();
        let action = d["action"].as_str().context("decision action")?.to_string();
        out.insert(
            ("decision".to_string(), net),
            (action, d["remaining_secs"].as_i64()),
        );
    }
    for e in rows("lists")? {
        let list = e["list"].as_str().context("list name")?.to_string();
        let net = e["net"].as_str().context("list net")?.to_string();
        out.insert((list.clone(), net), (list, e["remaining_secs"].as_i64()));
    }
    Ok(out)
}

/// The SYN-signature key (`syn:0x…`) the daemon saw from the lab's client.
fn client_syn_key(lab: &Lab) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rows = lab.aqd(&["fp", "list", "--json"])?.ok()?.json()?;
        if let Some(key) = rows
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["kind"] == "syn" && r["connections"].as_u64().unwrap_or(0) > 0)
            .and_then(|r| r["key"].as_str())
        {
            return Ok(key.to_string());
        }
        ensure!(Instant::now() < deadline, "no SYN signature seen: {rows}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// The live verdict on `key` in `aqd fp list --json`: (action, seconds left).
fn fp_verdict(lab: &Lab, key: &str) -> anyhow::Result<Option<(String, Option<i64>)>> {
    let rows = lab.aqd(&["fp", "list", "--json"])?.ok()?.json()?;
    Ok(rows
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["key"] == key && !r["verdict"].is_null())
        .map(|r| {
            (
                r["verdict"]["action"].as_str().unwrap_or("").to_string(),
                r["verdict"]["expires_in_secs"].as_i64(),
            )
        }))
}

fn audit_records(path: &std::path::Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("audit line {l:?}")))
        .collect()
}

#[test]
fn reboot_restores_decisions_lists_and_fingerprint_verdicts_with_their_ttls() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    let blocked: IpAddr = lab.client_v4_alt.into();
    let client: IpAddr = lab.client_v4.into();
    lab.start_daemon()?;

    // The client's SYN signature, seen by the daemon, then blocked by fingerprint (TCP from any address).
    let report = lab.tcp_probe(Family::V4, 2, Duration::from_secs(2))?;
    ensure!(report.connected == 2, "TCP before any verdict: {report:?}");
    let syn_key = client_syn_key(&lab)?;
    lab.aqd(&[
        "fp",
        "block",
        &syn_key,
        "--ttl",
        "20m",
        "--reason",
        "durable test",
    ])?
    .ok()?;

    // Decisions with different TTLs, one permanent; list edits, one of each undone again.
    let blocked_net = format!("{blocked}/32");
    for args in [
        vec!["block", &blocked_net, "--ttl", "10m", "--reason", "durable test"],
        vec!["throttle", "198.51.100.7", "--ttl", "30m"],
        vec!["monitor", "198.51.100.0/24", "--ttl", "2h"],
        vec!["block", "203.0.113.9", "--permanent"],
        vec!["block", "203.0.113.10", "--ttl", "10m"],
        vec!["unblock", "203.0.113.10"],
        vec!["deny", "203.0.113.64/26", "--ttl", "1h"],
        vec!["allow", "198.51.100.200"],
        vec!["deny", "203.0.113.128/26"],
        vec!["undeny", "203.0.113.128/26"],
        // A block on a prefix that is no decision scope is a denylist entry in the kernel: `undeny` ends it,
        // and it must stay ended after the reboot.
        vec!["block", "203.0.113.192/27", "--ttl", "10m"],
        vec!["undeny", "203.0.113.192/27"],
    ] {
        lab.aqd(&args)?.ok()?;
    }
    let before = listed(&lab)?;
    let listed_at = Instant::now();
    let expected: Vec<(&str, &str)> = vec![
        ("decision", blocked_net.as_str()),
        ("decision", "198.51.100.7/32"),
        ("decision", "198.51.100.0/24"),
        ("decision", "203.0.113.9/32"),
        ("deny", "203.0.113.64/26"),
        ("allow", "198.51.100.200/32"),
    ];
    for (kind, net) in &expected {
        ensure!(
            before.contains_key(&(kind.to_string(), net.to_string())),
            "{kind} {net} missing before the reboot: {before:?}"
        );
    }
    let fp_before = fp_verdict(&lab, &syn_key)?.context("the fingerprint verdict before the reboot")?;
    lab.assert_udp_dropped(blocked, N)?;
    lab.assert_udp_passes(client, N)?;
    let report = lab.tcp_probe(Family::V4, 2, Duration::from_millis(500))?;
    ensure!(
        report.connected == 0,
        "TCP with the SYN signature blocked: {report:?}"
    );

    // The simulated reboot: nothing in the kernel, nothing in the run directory.
    lab.kill_daemon()?;
    lab.aqd(&["detach"])?.ok()?;
    ensure!(
        !lab.pin_dir().exists(),
        "pins left in {}",
        lab.pin_dir().display()
    );
    let socket = lab.socket();
    for file in [
        socket.clone(),
        socket.with_extension("config-entries.json"),
        socket.with_extension("fp-verdicts.json"),
    ] {
        let _ = std::fs::remove_file(file);
    }
    lab.assert_udp_passes(blocked, N)?;
    // Some downtime, so that every TTL visibly counts down across it.
    thread::sleep(Duration::from_secs(2));

    let started = Instant::now();
    lab.start_daemon()?;
    let after = listed(&lab)?;
    let status = lab.aqd(&["status", "--json"])?.ok()?.json()?;
    // The daemon's own measures from its start: the programs loaded (the kernel verifier's time, the same with
    // or without stored state), then the state back in the maps (before the program is attached). The CLI's
    // view adds the lab's polling and the CLI's own start-up.
    let ms = |k: &str| {
        status["store"][k]
            .as_u64()
            .with_context(|| format!("status has no store.{k}: {status}"))
    };
    let (loaded_ms, restored_ms) = (
        ms("programs_loaded_after_start_ms")?,
        ms("restored_after_start_ms")?,
    );
    eprintln!(
        "programs loaded {loaded_ms} ms and state back {restored_ms} ms after the daemon's start; listed by the \
         CLI {:?} after the spawn",
        started.elapsed()
    );
    ensure!(
        restored_ms - loaded_ms < 5000,
        "state back only {} ms after the programs were loaded",
        restored_ms - loaded_ms
    );
    ensure!(
        !after.keys().any(|(_, net)| net == "203.0.113.192/27"),
        "a block undone with undeny came back after the reboot: {after:?}"
    );
    let elapsed = listed_at.elapsed().as_secs() as i64;
    for (kind, net) in &expected {
        let key = (kind.to_string(), net.to_string());
        let (action, left) = after
            .get(&key)
            .ok_or_else(|| anyhow!("{kind} {net} not restored: {after:?}"))?;
        let (action_before, left_before) = &before[&key];
        ensure!(
            action == action_before,
            "{kind} {net}: {action} after, {action_before} before"
        );
        match (left_before, left) {
            (None, None) => {}
            (Some(b), Some(a)) => {
                let want = b - elapsed;
                ensure!(
                    (a - want).abs() <= TTL_SLACK_SECS && a < b,
                    "{kind} {net}: {a} s left after the reboot, expected about {want} ({b} before, {elapsed} s passed)"
                );
            }
            other => anyhow::bail!("{kind} {net}: permanence changed across the reboot: {other:?}"),
        }
    }
    for gone in [("decision", "203.0.113.10/32"), ("deny", "203.0.113.128/26")] {
        ensure!(
            !after.contains_key(&(gone.0.to_string(), gone.1.to_string())),
            "{gone:?} was removed before the reboot, yet restored: {after:?}"
        );
    }
    let (fp_action, fp_left) =
        fp_verdict(&lab, &syn_key)?.context("the fingerprint verdict after the reboot")?;
    ensure!(
        fp_action == fp_before.0,
        "fingerprint verdict {fp_action}, was {}",
        fp_before.0
    );
    let (b, a) = (
        fp_before.1.context("fp TTL before")?,
        fp_left.context("fp TTL after")?,
    );
    ensure!(
        (a - (b - elapsed)).abs() <= TTL_SLACK_SECS,
        "fingerprint verdict: {a} s left, expected about {}",
        b - elapsed
    );
    // Enforced on traffic again.
    lab.assert_udp_dropped(blocked, N)?;
    lab.assert_udp_passes(client, N)?;
    let report = lab.tcp_probe(Family::V4, 2, Duration::from_millis(500))?;
    ensure!(
        report.connected == 0,
        "TCP after the reboot, SYN signature still blocked: {report:?}"
    );
    let restored = &status["store"]["restored_at_start"];
    ensure!(
        restored["decisions"] == 4 && restored["list_entries"] == 2 && restored["fingerprints"] == 1,
        "restore report: {restored}"
    );
    // The restore was audited, before the kernel change, with what was left.
    let records = audit_records(&lab.audit_log())?;
    let restored_records = records.iter().filter(|r| r["outcome"] == "restored").count();
    ensure!(
        restored_records == 7,
        "{restored_records} restored records: {records:?}"
    );
    Ok(())
}

#[test]
fn second_daemon_is_refused_and_the_audit_log_reopens_on_sighup() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    let first = lab.start_daemon()?;
    let pid = lab.daemon_pid().context("daemon pid")?;

    // A second `aqd run` on the same instance: refused, naming the first's PID, and nothing changes.
    let second = lab.aqd_timeout(
        &["run", "-i", SERVER_IF, "--xdp-mode", "native"],
        Duration::from_secs(10),
    )?;
    ensure!(
        second.code == Some(1) && second.stderr.contains(&format!("pid {pid}")),
        "second aqd run: {second}"
    );
    ensure!(second.stderr.contains("aqd.lock"), "{second}");
    let status = lab.status()?;
    let attached = status.attachments();
    ensure!(
        attached.first().map(|a| a.program_id) == Some(first.program_id),
        "the attachment changed: {attached:?}"
    );
    ensure!(lab.daemon_exit_status()?.is_none(), "the first daemon exited");
    lab.aqd(&["block", "198.51.100.1", "--ttl", "10m"])?.ok()?;

    // logrotate: rename, then SIGHUP; the next records go to a new file at the configured path.
    let log = lab.audit_log();
    let rotated = log.with_extension("jsonl.1");
    std::fs::rename(&log, &rotated)?;
    lab.signal_daemon(libc::SIGHUP)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !log.exists() {
        ensure!(Instant::now() < deadline, "no new audit log after SIGHUP");
        thread::sleep(Duration::from_millis(50));
    }
    lab.aqd(&["block", "198.51.100.2", "--ttl", "10m"])?.ok()?;
    let new = audit_records(&log)?;
    ensure!(
        new.len() == 1 && new[0]["target"] == "198.51.100.2/32",
        "new audit log: {new:?}"
    );
    let old = audit_records(&rotated)?;
    ensure!(
        old.iter().any(|r| r["target"] == "198.51.100.1/32")
            && !old.iter().any(|r| r["target"] == "198.51.100.2/32"),
        "rotated audit log: {old:?}"
    );
    // `aqd reload` reopens it too.
    std::fs::rename(&log, log.with_extension("jsonl.2"))?;
    lab.aqd(&["reload"])?.ok()?;
    lab.aqd(&["unblock", "198.51.100.2"])?.ok()?;
    let new = audit_records(&log)?;
    ensure!(
        new.len() == 1 && new[0]["action"] == "unblock",
        "audit log after reload: {new:?}"
    );
    // A removal of nothing: written ahead, then marked failed.
    let out = lab.aqd(&["unblock", "198.51.100.3"])?;
    ensure!(!out.success(), "{out}");
    let new = audit_records(&log)?;
    ensure!(
        new.len() == 3 && new[2]["outcome"] == "failed" && new[2]["target"] == "198.51.100.3/32",
        "audit log after a failed removal: {new:?}"
    );
    Ok(())
}
