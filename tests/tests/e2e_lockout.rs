//! End to end: the lockout guard on every path, with a management network on the lab's veth.
//!
//! The lab's primary client address is in `protection.management` (a /31: the client's .0 and .1); its second
//! address (.3) is not. Every attempt of issue 10 to cut the management host off — IPv4-mapped spellings,
//! prefixes covering `::ffff:0:0/96`, `disallow` of the management network, a config reload and a deny file
//! with a covering entry, an import file, a fingerprint verdict on the management host's own TCP stack — is
//! made with the daemon up and (where it applies) down, and after each one the management host must still
//! complete a TCP connection to the protected service. The accepted changes that are checked alongside (a
//! block, a SYN verdict) must still cut off the other address, so the test fails if enforcement is off.
//!
//! Root; builds and removes its own namespaces ([`aqd_tests::netns::Lab`]); every probe is bounded.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure};
use aqd_tests::netns::{self, CmdOutput, Family, Lab, SERVICE_PORT, TcpSink, run_bounded};
use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;

/// Connect timeout of a probe: generous for a veth, short enough for probes that must time out.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The management network of the lab: the /31 holding the client's primary address.
fn management(lab: &Lab) -> IpNet {
    IpNet::V4(Ipv4Net::new(lab.client_v4, 31).expect("valid prefix").trunc())
}

/// The management host completes a TCP connection to the protected service (checked after every attempt).
fn reachable(lab: &Lab, after: &str) -> anyhow::Result<()> {
    let r = lab.tcp_probe(Family::V4, 1, CONNECT_TIMEOUT)?;
    ensure!(
        r.connected == 1 && r.accepted == 1,
        "the management host {} was cut off after {after}: {r:?}",
        lab.client_v4
    );
    Ok(())
}

/// Whether a TCP connection from the client's second (non-management) address completes.
fn other_connects(lab: &Lab) -> anyhow::Result<bool> {
    let to = SocketAddr::new(lab.server_v4.into(), SERVICE_PORT);
    let sink = TcpSink::bind(&lab.server, to)?;
    let script = format!(
        "import socket, sys\ntry:\n    socket.create_connection(('{}', {}), timeout={}, source_address=('{}', 0)).close()\n\
         except OSError:\n    sys.exit(3)\n",
        lab.server_v4,
        SERVICE_PORT,
        CONNECT_TIMEOUT.as_secs_f64(),
        lab.client_v4_alt
    );
    let mut cmd = lab.client.command("python3");
    cmd.args(["-c", &script]);
    let out = run_bounded(cmd, Duration::from_secs(5))?;
    match out.code {
        Some(0) => {
            ensure!(
                sink.accept(1, Duration::from_secs(1))? == 1,
                "connected but not accepted"
            );
            Ok(true)
        }
        Some(3) => Ok(false),
        _ => bail!("the probe from {} failed: {out}", lab.client_v4_alt),
    }
}

/// `aqd <args>` must fail with `code`, saying each of `needles` on stderr.
fn refused(out: CmdOutput, code: i32, needles: &[&str]) -> anyhow::Result<CmdOutput> {
    ensure!(out.code == Some(code), "expected exit code {code}: {out}");
    for needle in needles {
        ensure!(
            out.stderr.contains(needle),
            "stderr should mention {needle:?}: {out}"
        );
    }
    Ok(out)
}

/// The attempts of issue 10 (and relatives) on the lab's addresses, each of which must be refused.
fn attempts(lab: &Lab) -> Vec<Vec<String>> {
    let host = lab.client_v4;
    let mgmt = management(lab);
    let mapped_mgmt = format!("::ffff:{}/127", mgmt.addr());
    let slash24 = Ipv4Net::new(host, 24).expect("valid").trunc();
    let raw: Vec<Vec<String>> = vec![
        vec!["block".into(), format!("::ffff:{host}")],
        vec!["block".into(), format!("::ffff:{host}"), "--force".into()],
        vec!["throttle".into(), format!("::ffff:{host}"), "--force".into()],
        vec!["monitor".into(), host.to_string()],
        vec!["block".into(), slash24.to_string(), "--force".into()],
        vec!["block".into(), "10.0.0.0/8".into(), "--force".into()],
        vec!["deny".into(), "::/8".into(), "--force".into()],
        vec!["deny".into(), "::ffff:0:0/96".into(), "--force".into()],
        vec!["deny".into(), "::fffe:0:0/95".into(), "--force".into()],
        vec!["deny".into(), "::/0".into(), "--force".into()],
        vec!["deny".into(), "0.0.0.0/0".into(), "--force".into()],
        vec!["deny".into(), mapped_mgmt.clone(), "--force".into()],
        vec!["disallow".into(), mgmt.to_string()],
        vec!["disallow".into(), mapped_mgmt],
    ];
    raw
}

/// Runs every attempt; each is refused naming the management network, and the host stays reachable.
fn attempt_all(lab: &Lab, offline: bool) -> anyhow::Result<()> {
    let mgmt = management(lab).to_string();
    for args in attempts(lab) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = refused(lab.aqd(&args)?, 2, &["refusing", "management network", &mgmt])?;
        ensure!(
            out.stderr.contains("the daemon is not running") == offline,
            "online/offline path ({offline}): {out}"
        );
        reachable(lab, &format!("`aqd {}`", args.join(" ")))?;
    }
    Ok(())
}

/// The SYN signature text the daemon lists for the client's TCP stack, once it has seen a connection.
fn listed_syn(lab: &Lab) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let json = lab.aqd(&["fp", "list", "--json"])?.ok()?.json()?;
        let rows = json
            .as_array()
            .ok_or_else(|| anyhow!("`aqd fp list --json`: {json}"))?;
        if let Some(fp) = rows
            .iter()
            .find(|r| r["kind"] == "syn" && r["connections"].as_u64() >= Some(1))
            .and_then(|r| r["fingerprint"].as_str())
        {
            return Ok(fp.to_string());
        }
        if Instant::now() >= deadline {
            bail!("the daemon lists no SYN signature after a connection: {json}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Audit records (JSON lines) of changes that reduce protection and touch `mgmt`.
fn audited_on_management(lab: &Lab, mgmt: IpNet) -> anyhow::Result<Vec<Value>> {
    let text = fs::read_to_string(lab.audit_log())?;
    // The accepted block on the other client must be there, or an empty or misplaced log would pass.
    ensure!(
        text.lines()
            .any(|l| l.contains("\"block\"") && l.contains(&lab.client_v4_alt.to_string())),
        "the audit log {} lacks the accepted block on {}",
        lab.audit_log().display(),
        lab.client_v4_alt
    );
    let mut hits = Vec::new();
    for line in text.lines() {
        let record: Value = serde_json::from_str(line)?;
        let target = record["target"].as_str().unwrap_or("");
        let reduces = matches!(
            record["action"].as_str(),
            Some("block" | "throttle" | "monitor" | "deny" | "disallow")
        );
        let net = target
            .parse::<IpNet>()
            .or_else(|_| target.parse::<IpAddr>().map(IpNet::from));
        if reduces && net.is_ok_and(|n| detector_user::lockout::overlaps(n, mgmt)) {
            hits.push(record);
        }
    }
    Ok(hits)
}

#[test]
fn management_stays_reachable_through_every_attempt() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    let mgmt = management(&lab);
    let protection = format!("[protection]\nmanagement = [\"{mgmt}\"]\n");
    lab.write_config("", &protection)?;
    lab.start_daemon()?;
    reachable(&lab, "start")?;
    let passed = lab.status()?.reason("pass_management");
    ensure!(
        passed > 0,
        "no pass_management counted for the management host's packets"
    );
    ensure!(
        other_connects(&lab)?,
        "the non-management address cannot connect at start"
    );

    // CLI through the daemon.
    attempt_all(&lab, false)?;

    // An accepted block on the other address applies (enforcement is on) and leaves management alone.
    lab.aqd(&["block", &lab.client_v4_alt.to_string(), "--ttl", "10m"])?
        .ok()?;
    ensure!(
        !other_connects(&lab)?,
        "the block on {} did not apply",
        lab.client_v4_alt
    );
    reachable(&lab, "a block on the other address")?;
    lab.aqd(&["unblock", &lab.client_v4_alt.to_string()])?.ok()?;
    ensure!(
        other_connects(&lab)?,
        "the other address stays blocked after unblock"
    );

    // An import file with a management address in any spelling: nothing imported.
    let file = lab.file("import.netset");
    fs::write(&file, format!("198.51.100.9\n::ffff:{}\n", lab.client_v4))?;
    let path = file.display().to_string();
    refused(
        lab.aqd(&["import", &path, "--into", "block", "--force"])?,
        2,
        &["entry 2", "management network", "nothing imported"],
    )?;
    fs::write(&file, "203.0.113.0/24\n::/8\n")?;
    refused(
        lab.aqd(&["import", &path, "--into", "deny", "--force"])?,
        2,
        &["entry 2", "::ffff:0:0/96", "nothing imported"],
    )?;
    reachable(&lab, "the imports")?;

    // A config reload with a covering deny entry, then a deny file with one: rejected, running config kept.
    lab.write_config(
        "",
        &format!("{protection}[lists]\ndeny = [\"203.0.113.0/24\",\n  \"::/8\"]\n"),
    )?;
    let config = lab.config().display().to_string();
    let out = refused(
        lab.aqd(&["reload"])?,
        2,
        &["running config kept", "lists.deny", "refusing to deny ::/8"],
    )?;
    ensure!(out.stderr.contains(&format!("{config}:")), "no file:line: {out}");
    reachable(&lab, "a reload with lists.deny = [\"::/8\"]")?;
    let deny_file = lab.file("bogons.netset");
    fs::write(
        &deny_file,
        format!(
            "# bogons\n192.0.2.0/24\n{}\n",
            Ipv4Net::new(lab.client_v4, 16)?.trunc()
        ),
    )?;
    lab.write_config(
        "",
        &format!("{protection}[lists]\ndeny_files = [{deny_file:?}]\n"),
    )?;
    refused(
        lab.aqd(&["reload"])?,
        2,
        &[
            &format!("{}:3: refusing to deny", deny_file.display()),
            &mgmt.to_string(),
        ],
    )?;
    reachable(&lab, "a reload with a covering deny file")?;
    let view = lab.aqd(&["list", "all", "--json"])?.ok()?.json()?;
    ensure!(
        view["lists"]
            .as_array()
            .is_none_or(|rows| rows.iter().all(|r| r["list"] != "deny")),
        "a rejected config wrote deny entries: {view}"
    );
    lab.write_config("", &protection)?;
    lab.aqd(&["reload"])?.ok()?;

    // A verdict on the SYN signature of the client's stack (the management host's too): it drops the other
    // address's SYNs, never the management host's (the kernel passes management ahead of fingerprint verdicts).
    let syn = listed_syn(&lab)?;
    lab.aqd(&["fp", "block", &syn, "--ttl", "10m", "--reason", "lockout test"])?
        .ok()?;
    ensure!(
        !other_connects(&lab)?,
        "the SYN verdict on {syn} did not apply to the other address"
    );
    reachable(&lab, &format!("`aqd fp block {syn}`"))?;

    // The CLI with the daemon down (the program stays attached): the same guard on the pinned maps.
    lab.stop_daemon()?;
    attempt_all(&lab, true)?;
    // Even with a config that names no management network: the kernel's MANAGEMENT map is guarded too.
    lab.write_config("", "")?;
    let host = format!("::ffff:{}", lab.client_v4);
    refused(
        lab.aqd(&["block", &host, "--force"])?,
        2,
        &[
            "the daemon is not running",
            "management network",
            &mgmt.to_string(),
        ],
    )?;
    refused(
        lab.aqd(&["disallow", &mgmt.to_string()])?,
        2,
        &["management network"],
    )?;
    reachable(&lab, "offline attempts with a config without management")?;

    let hits = audited_on_management(&lab, mgmt)?;
    ensure!(
        hits.is_empty(),
        "changes touching the management network were audited: {hits:?}"
    );
    let after = lab.status()?.reason("pass_management");
    ensure!(
        after > passed,
        "pass_management did not grow ({passed} → {after})"
    );
    Ok(())
}

/// `aqd check-config` applies the same rule to deny files as the daemon (file:line), without a daemon.
#[test]
fn check_config_refuses_deny_files_covering_management() -> anyhow::Result<()> {
    let Some(lab) = netns::lab_for_test() else {
        return Ok(());
    };
    let deny_file = lab.file("deny.netset");
    fs::write(&deny_file, "198.51.100.0/24\n::fffe:0:0/95\n")?;
    lab.write_config(
        "",
        &format!("[protection]\nmanagement = [\"198.19.11.0/24\"]\n[lists]\ndeny_files = [{deny_file:?}]\n"),
    )?;
    let mut cmd = lab.aqd_command(false);
    cmd.arg("check-config");
    let out = run_bounded(cmd, Duration::from_secs(10))?;
    ensure!(
        !out.success(),
        "check-config accepted a deny file covering management: {out}"
    );
    ensure!(
        out.stderr.contains(&format!(
            "{}:2: refusing to deny ::fffe:0:0/95",
            deny_file.display()
        )) && out.stderr.contains("198.19.11.0/24"),
        "{out}"
    );
    Ok(())
}
