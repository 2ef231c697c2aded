//! End to end: client fingerprints of real TLS clients, and verdicts by fingerprint, in a two-namespace lab
//! ([`aqd_tests::netns::Lab`]) with `aqd run` attached in native mode on the server's veth.
//!
//! The server namespace runs a TLS/HTTP server ([`aqd_tests::tls::TlsServer`], Python `ssl` + `http.server`)
//! on the protected port, which waits [`DELAY`] before its ServerHello and before each response (a realistic
//! round trip; this kernel has no netem). The client namespace runs real clients: curl, `openssl s_client` and
//! Python `ssl`/`http.client`, all on the system's OpenSSL, all naming the server by SNI. The tests check:
//! 1. each client's JA4 is the same over several connections and differs between the clients, in an offline
//!    capture (tcpdump on the server veth → `aqd fingerprint --json`) and in the daemon (`aqd fp list --json`),
//!    which agree with each other, also for the SYN signature;
//! 2. with one client's JA4 blocked (`aqd fp block`), that client never gets an HTTP response (and the server
//!    never sees its request), from the first connection on, while the other clients from the same address
//!    are untouched; `aqd fp remove` restores it;
//! 3. with a SYN signature blocked, connections sending it never complete a handshake, while the same stack's
//!    other signature is untouched: the client namespace routes one of its addresses with another `advmss`,
//!    so one Linux stack sends two distinct SYN signatures;
//! 4. a ClientHello split over two TCP segments (Python with a small `TCP_MAXSEG`) is fingerprinted by the daemon
//!    (the kernel cannot key it from the first segment), and with its JA4 blocked that flow gets no response —
//!    the daemon's path, raced against the server's round trip; the hello→verdict latency is printed when
//!    `aqd status --json` reports it.
//!
//! Each test builds its own lab and server and removes them at the end; all traffic stays between the two
//! namespaces, every client attempt is bounded in time, and the whole file runs in well under a minute. Needs
//! root and curl, openssl, python3, tcpdump (installed by `cargo xtask bootstrap`): skipped with a message
//! otherwise, failed under CI. Run `cargo build -p detector-user` first (the tests run `target/debug/aqd`, or
//! `$AQD_BIN`).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure};
use aqd_tests::{
    netns::{self, Lab, SERVER_IF, SERVICE_PORT},
    tls::{
        self, Attempt, Capture, Client, ClientRun, DEFAULT_DELAY, Offline, OfflineHello, OfflineSyn,
        TlsServer,
    },
};
use detector_common::Reason;
use serde_json::Value;

/// The server's delay before its ServerHello and before each response.
const DELAY: Duration = DEFAULT_DELAY;
/// Connections per client for the stability check.
const CONNECTIONS: usize = 3;
/// Time limit of an attempt that must fail (blocked): short, since it is waited out in full.
const BLOCKED_MAX_TIME: Duration = Duration::from_millis(2000);
/// Time limit of an attempt that must succeed.
const ALLOWED_MAX_TIME: Duration = Duration::from_secs(5);
/// How long the daemon may take to show what it has seen in `aqd fp list`.
const FP_LIST_WAIT: Duration = Duration::from_secs(5);
/// The `advmss` of the client's alternative address (the ordinary route gives 1460).
const ALT_ADVMSS: u32 = 1200;

/// A lab with a daemon and the TLS server. The server is declared first so it stops before the lab goes.
struct Setup {
    server: TlsServer,
    lab: Lab,
    started: Instant,
}

/// A lab, its daemon and the TLS server, or `None` where the test cannot run (skipped; failed under CI).
fn setup() -> anyhow::Result<Option<Setup>> {
    let missing = tls::missing_tools();
    if !missing.is_empty() {
        aqd_tests::skip_or_fail(&format!(
            "{} not installed (`cargo xtask bootstrap` installs them)",
            missing.join(", ")
        ));
        return Ok(None);
    }
    let started = Instant::now();
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(None);
    };
    let lab_ms = started.elapsed().as_millis();
    // SYN labels from the shared p0f database when it is there (none otherwise: the default path is the
    // system's /etc/aqd/p0f.fp).
    let p0f_db = tls::p0f_db().map_or(String::new(), |p| p.to_string_lossy().into_owned());
    lab.write_config("", &format!("[fingerprints]\np0f_db = {p0f_db:?}\n"))?;
    lab.start_daemon()?;
    let daemon_ms = started.elapsed().as_millis() - lab_ms;
    let server = TlsServer::start(&lab, SERVICE_PORT, DELAY)?;
    eprintln!(
        "lab {} ({lab_ms} ms), daemon ({daemon_ms} ms) and TLS server ({} ms delay) on {} ready in {} ms",
        lab.id(),
        DELAY.as_millis(),
        server.addr,
        started.elapsed().as_millis()
    );
    Ok(Some(Setup { server, lab, started }))
}

impl Setup {
    fn attempt(&self) -> Attempt {
        Attempt::to(self.server.addr).max_time(ALLOWED_MAX_TIME)
    }

    fn blocked_attempt(&self) -> Attempt {
        Attempt::to(self.server.addr)
            .max_time(BLOCKED_MAX_TIME)
            .connect_timeout(BLOCKED_MAX_TIME)
    }

    /// Runs `count` attempts of `client` while capturing on the server veth; returns the attempts and what
    /// `aqd fingerprint` finds in the capture.
    fn captured(
        &self,
        tag: &str,
        client: Client,
        attempt: &Attempt,
        count: usize,
    ) -> anyhow::Result<(Vec<ClientRun>, Offline)> {
        let capture = Capture::start(
            &self.lab.server,
            SERVER_IF,
            &format!("tcp port {}", attempt.to.port()),
            self.lab.file(&format!("{tag}.pcap")),
        )?;
        let runs = tls::run_client(&self.lab, &self.server, client, attempt, count)?;
        let pcap = capture.stop()?;
        let offline = tls::offline_fingerprints(&self.lab, &pcap)?;
        Ok((runs, offline))
    }

    /// Every attempt got its HTTP response.
    fn expect_responses(&self, runs: &[ClientRun], what: &str) -> anyhow::Result<()> {
        for run in runs {
            ensure!(
                run.responded,
                "{what}: {} got no HTTP response ({:?}): {}\n--- server\n{}",
                run.client,
                run.elapsed,
                run.detail,
                self.server.output()
            );
        }
        Ok(())
    }

    /// No attempt got an HTTP response, and the server saw no request from the attempts whose port is known.
    fn expect_no_responses(&self, runs: &[ClientRun], what: &str) -> anyhow::Result<()> {
        let events = self.server.events()?;
        for run in runs {
            eprintln!(
                "{what}: {} gave up after {} ms: {}",
                run.client,
                run.elapsed.as_millis(),
                run.detail
            );
            ensure!(!run.responded, "{what}: {} got an HTTP response", run.client);
            if let Some(port) = run.local_port {
                let seen: Vec<&str> = events
                    .iter()
                    .filter(|e| e.port == port)
                    .map(|e| e.event.as_str())
                    .collect();
                eprintln!("{what}: the server saw from port {port}: {seen:?}");
                ensure!(
                    !seen.contains(&"request"),
                    "{what}: the server got the request of {} (port {port})",
                    run.client
                );
            }
        }
        Ok(())
    }

    fn elapsed_note(&self) -> String {
        format!("{} ms into the test", self.started.elapsed().as_millis())
    }
}

/// The single JA4 of a client's connections in a capture (one ClientHello per connection, all the same).
fn stable_ja4(client: Client, runs: &[ClientRun], offline: &Offline) -> anyhow::Result<OfflineHello> {
    ensure!(
        offline.hellos.len() == runs.len(),
        "{client}: {} connections, {} ClientHellos in the capture: {:?}",
        runs.len(),
        offline.hellos.len(),
        offline.hellos
    );
    let first = offline.hellos[0].clone();
    for hello in &offline.hellos {
        ensure!(
            (hello.ja4.as_str(), hello.ja4_r.as_str()) == (first.ja4.as_str(), first.ja4_r.as_str()),
            "{client}: JA4 not stable across connections: {} vs {}",
            hello.ja4,
            first.ja4
        );
        ensure!(
            hello.sni.as_deref() == Some(tls::SERVER_NAME),
            "{client}: SNI {:?}",
            hello.sni
        );
    }
    for run in runs {
        if let Some(port) = run.local_port {
            ensure!(
                offline.hellos.iter().any(|h| h.srcport == port),
                "{client}: no ClientHello from its port {port} in the capture: {:?}",
                offline.hellos
            );
        }
    }
    Ok(first)
}

/// The single SYN signature in a capture.
fn only_syn_signature(what: &str, offline: &Offline) -> anyhow::Result<OfflineSyn> {
    let first = offline
        .syns
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("{what}: no SYN in the capture"))?;
    for syn in &offline.syns {
        ensure!(
            syn.signature == first.signature && syn.key == first.key,
            "{what}: two SYN signatures: {} and {}",
            syn.signature,
            first.signature
        );
    }
    Ok(first)
}

// ---------------------------------------------------------------------------------------------------------------
// The daemon's fingerprints (`aqd fp`)
// ---------------------------------------------------------------------------------------------------------------

/// One row of `aqd fp list --json`.
#[derive(Clone, Debug)]
struct FpEntry {
    kind: String,
    fingerprint: String,
    ja4_r: Option<String>,
    label: Option<String>,
    connections: u64,
    verdict: Value,
    json: Value,
}

/// Whether this aqd has the `fp` verb; an error telling so if not.
fn require_fp_cli(lab: &Lab) -> anyhow::Result<()> {
    let help = lab.aqd(&["fp", "--help"])?;
    ensure!(
        help.success(),
        "this aqd has no `aqd fp` (fingerprint verdicts are not implemented): {help}"
    );
    Ok(())
}

fn fp_list(lab: &Lab) -> anyhow::Result<Vec<FpEntry>> {
    let json = lab.aqd(&["fp", "list", "--json"])?.ok()?.json()?;
    let rows = json
        .as_array()
        .ok_or_else(|| anyhow!("`aqd fp list --json` is not an array: {json}"))?;
    rows.iter()
        .map(|row| {
            let s = |k: &str| row[k].as_str().map(String::from);
            Ok(FpEntry {
                kind: s("kind").ok_or_else(|| anyhow!("no kind: {row}"))?,
                fingerprint: s("fingerprint").ok_or_else(|| anyhow!("no fingerprint: {row}"))?,
                ja4_r: s("ja4_r"),
                label: s("label"),
                connections: row["connections"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("no connections: {row}"))?,
                verdict: row["verdict"].clone(),
                json: row.clone(),
            })
        })
        .collect()
}

fn fp_entry(list: &[FpEntry], kind: &str, fingerprint: &str) -> Option<FpEntry> {
    list.iter()
        .find(|e| e.kind == kind && e.fingerprint == fingerprint)
        .cloned()
}

/// The `fp list` row of `kind`/`fingerprint` once its connection count reaches `at_least` (polled).
fn wait_fp(lab: &Lab, kind: &str, fingerprint: &str, at_least: u64) -> anyhow::Result<FpEntry> {
    let deadline = Instant::now() + FP_LIST_WAIT;
    loop {
        let list = fp_list(lab)?;
        if let Some(entry) = fp_entry(&list, kind, fingerprint)
            && entry.connections >= at_least
        {
            return Ok(entry);
        }
        if Instant::now() >= deadline {
            bail!(
                "`aqd fp list` has no {kind} {fingerprint} with >= {at_least} connections after {FP_LIST_WAIT:?}:\n{}",
                serde_json::to_string_pretty(&list.iter().map(|e| &e.json).collect::<Vec<_>>())?
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Connections the daemon has counted for `kind`/`fingerprint` (0 if not listed).
fn fp_connections(lab: &Lab, kind: &str, fingerprint: &str) -> anyhow::Result<u64> {
    Ok(fp_entry(&fp_list(lab)?, kind, fingerprint).map_or(0, |e| e.connections))
}

fn fp_block(lab: &Lab, fingerprint: &str) -> anyhow::Result<()> {
    let out = lab
        .aqd(&["fp", "block", fingerprint, "--ttl", "10m", "--reason", "test"])?
        .ok()?;
    eprintln!("aqd fp block {fingerprint}: {}", out.stdout.trim());
    Ok(())
}

/// Lifts the verdict on `fingerprint` (`aqd fp remove`).
fn fp_remove(lab: &Lab, fingerprint: &str) -> anyhow::Result<()> {
    let out = lab.aqd(&["fp", "remove", fingerprint])?.ok()?;
    eprintln!("aqd fp remove {fingerprint}: {}", out.stdout.trim());
    Ok(())
}

/// Per-reason packet counters whose value changed between two `aqd status --json`.
fn reason_deltas(before: &Value, after: &Value) -> BTreeMap<String, u64> {
    let mut deltas = BTreeMap::new();
    if let Some(reasons) = after["reasons"].as_object() {
        for (name, value) in reasons {
            let d = value.as_u64().unwrap_or(0) - before["reasons"][name].as_u64().unwrap_or(0);
            if d > 0 {
                deltas.insert(name.clone(), d);
            }
        }
    }
    deltas
}

/// The growth of one reason's packet counter.
fn delta(deltas: &BTreeMap<String, u64>, reason: Reason) -> u64 {
    deltas.get(reason.name()).copied().unwrap_or(0)
}

/// Every field of `json` whose path mentions latency (e.g. the daemon's hello→verdict latency), as
/// `path = value` lines.
fn latency_fields(json: &Value, path: &str, out: &mut Vec<String>) {
    match json {
        Value::Object(map) => {
            for (k, v) in map {
                latency_fields(v, &format!("{path}.{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                latency_fields(v, &format!("{path}[{i}]"), out);
            }
        }
        other if path.to_ascii_lowercase().contains("latency") => out.push(format!("{path} = {other}")),
        _ => {}
    }
}

/// Source decisions the daemon may have made on `addr` (escalation of repeated fingerprint hits).
fn decisions_on(lab: &Lab, addr: IpAddr) -> anyhow::Result<Vec<netns::DecisionInfo>> {
    let host = format!("{addr}/");
    Ok(lab
        .decisions()?
        .into_iter()
        .filter(|d| d.net.starts_with(&host))
        .collect())
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Stable, distinct JA4 per client; offline capture and daemon agree
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn real_clients_have_stable_distinct_ja4_offline_and_in_the_daemon() -> anyhow::Result<()> {
    let Some(s) = setup()? else {
        return Ok(());
    };
    let mut ja4s: BTreeMap<Client, OfflineHello> = BTreeMap::new();
    let mut syns = Vec::new();
    for client in Client::ALL {
        let tag = client
            .name()
            .split_whitespace()
            .next()
            .unwrap_or("client")
            .replace('/', "-");
        let started = Instant::now();
        let (runs, offline) = s.captured(&format!("stable-{tag}"), client, &s.attempt(), CONNECTIONS)?;
        s.expect_responses(&runs, "allowed client")?;
        let hello = stable_ja4(client, &runs, &offline)?;
        let syn = only_syn_signature(client.name(), &offline)?;
        let times: Vec<u128> = runs.iter().map(|r| r.elapsed.as_millis()).collect();
        eprintln!(
            "{client:>24}: JA4 {}  JA4_r {}\n{:>24}  SYN {} ({}), key {}; {CONNECTIONS} connections in {} ms, each {times:?} ms",
            hello.ja4,
            hello.ja4_r,
            "",
            syn.signature,
            syn.label.as_deref().unwrap_or("?"),
            syn.key,
            started.elapsed().as_millis()
        );
        syns.push(syn);
        ja4s.insert(client, hello);
    }
    // All three run on this system's OpenSSL, but configure it differently: curl offers ALPN h2 and http/1.1,
    // Python http/1.1 (plus post-handshake auth and its own cipher list), s_client no ALPN at all. So every
    // pair differs, at least in JA4_a's ALPN characters.
    let clients: Vec<&Client> = ja4s.keys().collect();
    for (i, a) in clients.iter().enumerate() {
        for b in &clients[i + 1..] {
            ensure!(
                ja4s[*a].ja4 != ja4s[*b].ja4,
                "{a} and {b} have the same JA4 {}",
                ja4s[*a].ja4
            );
        }
    }
    // One Linux stack: one SYN signature for all of them.
    ensure!(
        syns.iter().all(|s| s.signature == syns[0].signature),
        "one stack, several SYN signatures: {syns:?}"
    );
    // Over IPv6 curl's JA4 is the same (JA4 does not depend on the network), its SYN signature is not.
    let (runs, offline) = s.captured("stable-curl-v6", Client::Curl, &Attempt::to(s.server.addr_v6), 1)?;
    s.expect_responses(&runs, "curl over IPv6")?;
    let v6 = stable_ja4(Client::Curl, &runs, &offline)?;
    let v6_syn = only_syn_signature("curl over IPv6", &offline)?;
    eprintln!("curl over IPv6: JA4 {}, SYN {}", v6.ja4, v6_syn.signature);
    ensure!(
        v6.ja4 == ja4s[&Client::Curl].ja4 && v6.ja4_r == ja4s[&Client::Curl].ja4_r,
        "curl's JA4 over IPv6 {} differs from over IPv4 {}",
        v6.ja4,
        ja4s[&Client::Curl].ja4
    );
    ensure!(
        v6_syn.signature.starts_with("6:") && v6_syn.signature != syns[0].signature,
        "IPv6 SYN signature {}",
        v6_syn.signature
    );
    eprintln!("offline: stable and pairwise distinct ({})", s.elapsed_note());

    // The daemon saw the same: every client's JA4 (with the same JA4_r) over all its connections, and the SYN.
    require_fp_cli(&s.lab)?;
    for (client, hello) in &ja4s {
        // curl's count includes its IPv6 connection.
        let expected = CONNECTIONS as u64 + u64::from(*client == Client::Curl);
        let entry = wait_fp(&s.lab, "ja4", &hello.ja4, expected)?;
        ensure!(
            entry.ja4_r.as_deref() == Some(hello.ja4_r.as_str()),
            "{client}: the daemon's JA4_r {:?} differs from the capture's {}",
            entry.ja4_r,
            hello.ja4_r
        );
        eprintln!(
            "daemon: {client}: {} connections, verdict {}",
            entry.connections, entry.verdict
        );
    }
    let syn = wait_fp(
        &s.lab,
        "syn",
        &syns[0].signature,
        (CONNECTIONS * Client::ALL.len()) as u64,
    )?;
    let syn6 = wait_fp(&s.lab, "syn", &v6_syn.signature, 1)?;
    for (entry, offline) in [(&syn, &syns[0]), (&syn6, &v6_syn)] {
        ensure!(
            offline.label.is_none() || entry.label == offline.label,
            "SYN {}: the daemon's label {:?}, the offline one {:?}",
            entry.fingerprint,
            entry.label,
            offline.label
        );
        eprintln!(
            "daemon: SYN {} label {:?}, {} connections",
            entry.fingerprint, entry.label, entry.connections
        );
    }
    eprintln!("done ({})", s.elapsed_note());
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// 2. A blocked JA4 gets no response; other clients are untouched
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn blocked_ja4_gets_no_http_response_other_clients_untouched() -> anyhow::Result<()> {
    let Some(s) = setup()? else {
        return Ok(());
    };
    require_fp_cli(&s.lab)?;
    let client_addr: IpAddr = s.lab.client_v4.into();
    let (runs, offline) = s.captured("learn-curl", Client::Curl, &s.attempt(), 1)?;
    s.expect_responses(&runs, "before the block")?;
    let curl = stable_ja4(Client::Curl, &runs, &offline)?;
    wait_fp(&s.lab, "ja4", &curl.ja4, 1)?;
    eprintln!("curl's JA4 {} ({})", curl.ja4, s.elapsed_note());

    let before = s.lab.status()?.json;
    fp_block(&s.lab, &curl.ja4)?;
    let blocked_at = Instant::now();
    let listed = wait_fp(&s.lab, "ja4", &curl.ja4, 1)?;
    eprintln!("fp list after the block: verdict {}", listed.verdict);

    // The other clients, from the same address, right after the block.
    for client in [Client::Python, Client::OpensslSClient] {
        let runs = tls::run_client(&s.lab, &s.server, client, &s.attempt(), 1)?;
        s.expect_responses(&runs, "another JA4 while curl's is blocked")?;
    }
    // curl: no response, from the first connection on.
    let runs = tls::run_client(&s.lab, &s.server, Client::Curl, &s.blocked_attempt(), 2)?;
    s.expect_no_responses(&runs, "blocked JA4")?;
    let deltas = reason_deltas(&before, &s.lab.status()?.json);
    eprintln!(
        "packets by reason while blocked: {deltas:?} ({} ms after the block)",
        blocked_at.elapsed().as_millis()
    );
    // The kernel recognised the whole ClientHello itself and dropped it: once per blocked connection.
    ensure!(
        delta(&deltas, Reason::DropHelloFingerprint) >= runs.len() as u64,
        "expected the kernel to drop each blocked ClientHello ({}): {deltas:?}",
        Reason::DropHelloFingerprint.name()
    );
    let escalated = decisions_on(&s.lab, client_addr)?;
    if !escalated.is_empty() {
        eprintln!("the daemon escalated the JA4 hits to source decisions: {escalated:?}");
    }
    // The others are still untouched after curl's hits (unless the hits escalated to a decision on the source).
    for client in [Client::Python, Client::OpensslSClient] {
        let attempt = if escalated.is_empty() {
            s.attempt()
        } else {
            s.attempt().from(s.lab.client_v4_alt.into())
        };
        let runs = tls::run_client(&s.lab, &s.server, client, &attempt, 1)?;
        s.expect_responses(&runs, "another JA4 after the blocked one's hits")?;
    }

    // Lifting the verdict restores curl.
    fp_remove(&s.lab, &curl.ja4)?;
    for decision in &escalated {
        s.lab.aqd(&["unblock", &decision.net])?.ok()?;
    }
    let runs = tls::run_client(&s.lab, &s.server, Client::Curl, &s.attempt(), 1)?;
    s.expect_responses(&runs, "after aqd fp remove")?;
    eprintln!("curl answered again after the removal ({})", s.elapsed_note());
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// 3. A blocked SYN signature never completes a handshake; the other signature is untouched
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn blocked_syn_signature_never_completes_a_handshake() -> anyhow::Result<()> {
    let Some(s) = setup()? else {
        return Ok(());
    };
    require_fp_cli(&s.lab)?;
    let (primary, alt): (IpAddr, IpAddr) = (s.lab.client_v4.into(), s.lab.client_v4_alt.into());
    tls::route_with_advmss(&s.lab, alt, s.server.addr.ip(), ALT_ADVMSS, 100)?;

    let (runs, offline) = s.captured("syn-alt", Client::Curl, &s.attempt().from(alt), 1)?;
    s.expect_responses(&runs, "from the advmss route")?;
    let alt_syn = only_syn_signature("advmss route", &offline)?;
    let (runs, offline) = s.captured("syn-primary", Client::Curl, &s.attempt(), 1)?;
    s.expect_responses(&runs, "from the ordinary route")?;
    let primary_syn = only_syn_signature("ordinary route", &offline)?;
    eprintln!(
        "SYN signatures: {primary} {} (key {}), {alt} {} (key {})",
        primary_syn.signature, primary_syn.key, alt_syn.signature, alt_syn.key
    );
    ensure!(
        alt_syn.signature != primary_syn.signature && alt_syn.key != primary_syn.key,
        "advmss {ALT_ADVMSS} did not change the SYN signature: {alt_syn:?}"
    );
    let entry = wait_fp(&s.lab, "syn", &alt_syn.signature, 1)?;
    eprintln!("daemon: {} label {:?}", entry.fingerprint, entry.label);

    let before = s.lab.status()?.json;
    fp_block(&s.lab, &entry.fingerprint)?;
    // Every client from the blocked signature's address: the connect never completes.
    let mut blocked = Vec::new();
    for client in Client::ALL {
        let attempt = s.blocked_attempt().from(alt);
        blocked.extend(tls::run_client(&s.lab, &s.server, client, &attempt, 1)?);
    }
    s.expect_no_responses(&blocked, "blocked SYN signature")?;
    let events = s.server.events()?;
    let from_alt: Vec<_> = events.iter().filter(|e| e.peer == alt).collect();
    // Before the block: one connection (accept, handshake, request). None after it.
    let accepts = from_alt.iter().filter(|e| e.event == "accept").count();
    ensure!(
        accepts == 1,
        "the server accepted {accepts} connections from {alt} (1 before the block): {from_alt:?}"
    );
    for run in blocked.iter().filter(|r| r.client == Client::Curl) {
        // curl's exit 28 = timed out; its %{local_port} is 0 when the connect never completed.
        ensure!(
            run.detail.starts_with("exit Some(28)") && run.local_port.is_none(),
            "curl from the blocked signature: {}",
            run.detail
        );
    }
    // The ordinary route's signature, from the other address, is untouched.
    for client in Client::ALL {
        let runs = tls::run_client(&s.lab, &s.server, client, &s.attempt().from(primary), 1)?;
        s.expect_responses(&runs, "the other SYN signature")?;
    }
    let deltas = reason_deltas(&before, &s.lab.status()?.json);
    eprintln!("packets by reason while blocked: {deltas:?}");
    ensure!(
        delta(&deltas, Reason::DropSynFingerprint) >= blocked.len() as u64,
        "expected every blocked connect's SYN to be dropped ({}): {deltas:?}",
        Reason::DropSynFingerprint.name()
    );

    fp_remove(&s.lab, &entry.fingerprint)?;
    let runs = tls::run_client(&s.lab, &s.server, Client::Curl, &s.attempt().from(alt), 1)?;
    s.expect_responses(&runs, "after aqd fp remove")?;
    eprintln!("done ({})", s.elapsed_note());
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// 4. A ClientHello split over two segments: fingerprinted and blocked by the daemon
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn split_client_hello_is_fingerprinted_and_blocked() -> anyhow::Result<()> {
    let Some(s) = setup()? else {
        return Ok(());
    };
    // Python's ClientHello in one segment, to size the split.
    let (runs, offline) = s.captured("hello-whole", Client::Python, &s.attempt(), 1)?;
    s.expect_responses(&runs, "whole ClientHello")?;
    let whole = stable_ja4(Client::Python, &runs, &offline)?;
    let segments = tls::client_segments(&s.lab.file("hello-whole.pcap"), SERVICE_PORT)?;
    let hello_len = segments
        .first()
        .and_then(|(_, lens)| lens.first().copied())
        .ok_or_else(|| anyhow!("no client data segment in the capture"))?;
    // An MSS a little over half the ClientHello: exactly two segments.
    let mss = (hello_len / 2 + 16) as u32;
    ensure!(
        mss >= 88,
        "ClientHello of {hello_len} bytes is too small to split"
    );

    let (runs, offline) = s.captured("hello-split", Client::Python, &s.attempt().mss(mss), 1)?;
    s.expect_responses(&runs, "split ClientHello, not blocked")?;
    let split = stable_ja4(Client::Python, &runs, &offline)?;
    let segments = tls::client_segments(&s.lab.file("hello-split.pcap"), SERVICE_PORT)?;
    let first_flow = segments.first().map(|(_, lens)| lens.clone()).unwrap_or_default();
    eprintln!(
        "python ClientHello: {hello_len} bytes whole; with TCP_MAXSEG {mss} its data segments are {first_flow:?}; \
         JA4 {} (whole: {})",
        split.ja4, whole.ja4
    );
    ensure!(
        first_flow.len() >= 2 && first_flow[0] + first_flow[1] == hello_len && first_flow[0] < hello_len,
        "the ClientHello ({hello_len} bytes) was not split over two segments: {first_flow:?}"
    );
    ensure!(
        split.ja4 == whole.ja4 && split.ja4_r == whole.ja4_r,
        "offline reassembly: the split ClientHello's JA4 {} differs from the whole one's {}",
        split.ja4,
        whole.ja4
    );

    // The daemon reassembled it: the JA4's connection count covers the split connection too.
    require_fp_cli(&s.lab)?;
    let entry = wait_fp(&s.lab, "ja4", &whole.ja4, 2)?;
    ensure!(
        entry.ja4_r.as_deref() == Some(whole.ja4_r.as_str()),
        "daemon's JA4_r {:?}",
        entry.ja4_r
    );
    eprintln!(
        "daemon: JA4 {} counted {} connections (whole + split)",
        entry.fingerprint, entry.connections
    );

    // Blocked: the split flow never gets its request through (the daemon must win against the round trip).
    let before = s.lab.status()?.json;
    fp_block(&s.lab, &whole.ja4)?;
    let seen_before = fp_connections(&s.lab, "ja4", &whole.ja4)?;
    let attempt = s.blocked_attempt().mss(mss);
    let runs = tls::run_client(&s.lab, &s.server, Client::Python, &attempt, 2)?;
    s.expect_no_responses(&runs, "blocked JA4, split ClientHello")?;
    let status = s.lab.status()?.json;
    let deltas = reason_deltas(&before, &status);
    eprintln!(
        "packets by reason: {deltas:?}; the daemon counted {} more connections of the JA4",
        fp_connections(&s.lab, "ja4", &whole.ja4)? - seen_before
    );
    // The kernel cannot key a ClientHello from its first segment: the flow verdict the daemon installed
    // dropped the rest of the flow.
    ensure!(
        delta(&deltas, Reason::DropFlowFingerprint) > 0,
        "expected the daemon's flow verdict to drop the split flows ({}): {deltas:?}",
        Reason::DropFlowFingerprint.name()
    );
    if delta(&deltas, Reason::DropHelloFingerprint) > 0 {
        eprintln!("note: the kernel dropped a split ClientHello by its key itself");
    }
    let mut latency = Vec::new();
    latency_fields(&status, "status", &mut latency);
    if latency.is_empty() {
        eprintln!("aqd status --json reports no hello→verdict latency");
    } else {
        eprintln!(
            "hello→verdict latency reported by the daemon:\n  {}",
            latency.join("\n  ")
        );
    }
    // Another JA4 is untouched.
    let runs = tls::run_client(&s.lab, &s.server, Client::Curl, &s.attempt(), 1)?;
    s.expect_responses(&runs, "another JA4 while python's is blocked")?;
    eprintln!("done ({})", s.elapsed_note());
    Ok(())
}
