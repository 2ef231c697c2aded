//! Control-plane cost of aqd: decisions applied per second through the CLI and the control socket, one by one
//! and by bulk import, and the daemon's resident memory with 100,000 decisions. The anchors (CrowdSec's
//! firewall bouncer: about 40 decisions/s with nftables, about 1,000/s with ipset; cs-firewall-bouncer #114) are
//! quoted, not measured here.
//!
//! `cargo bench -p aqd-tests --bench control` (root). Prints Markdown tables; asserts nothing about speed.
//!
//! Method:
//! - the daemon is the **release** `aqd` (`$AQD_BIN` if set, else `cargo build --release -p detector-user` is
//!   run first, a no-op when up to date); it runs as in production: `aqd run` attached in native mode to the
//!   server veth of a [`Lab`] (own namespaces, private bpffs, config, socket and audit log), protected port,
//!   1 s stats logging, audit log on. No traffic: this is the control plane only;
//! - CLI rows spawn one `aqd` process per decision from the bench's own namespace (as an operator or a bouncer
//!   would: the socket is a file), each timed from spawn to exit; socket rows call `control::call` from this
//!   process (one connection per request, as the protocol is), each timed around the call;
//! - one-by-one runs go first on empty maps (after a short warm-up), are removed again one by one, then 100,000
//!   addresses are imported with `aqd import`, read back with `aqd list --json`, re-imported straight through the
//!   socket (same addresses: replaces), and a last one-by-one socket run shows the cost with 100,000 loaded;
//! - a second table shows what one decision's cost depends on: a reason text (distinct per decision, or one for
//!   all) and the allowlist's size (1,000 entries added through the socket);
//! - memory is read from `/proc/<daemon>/status` (the pid is checked to be the `aqd` binary itself, not `ip netns
//!   exec`): VmRSS after each step, and the step's peak as VmHWM after resetting it (`clear_refs` 5) before the
//!   step. The kernel's map memory is not in VmRSS; it is reported separately (memlock of the daemon's map fds);
//! - decision counts are read from the pinned maps by the bench, outside the timed windows.

use std::{
    fmt::Write as _,
    fs::{self, File},
    io::Write as _,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aqd_tests::netns::{self, Lab};
use aya::maps::{HashMap, Map, MapData};
use detector_common::{AddrKey, Decision, map_names};
use detector_user::{
    control::{self, ImportInto, Request},
    maps::List,
    paths,
};

/// Decisions applied one by one through the socket, per run.
const SOCKET_DECISIONS: u32 = 10_000;
/// Decisions applied one by one through the CLI (one process each).
const CLI_DECISIONS: u32 = 500;
/// Addresses in the bulk import.
const IMPORT_DECISIONS: u32 = 100_000;
/// Decisions per row of the sensitivity table.
const SENSITIVITY_DECISIONS: u32 = 1_000;
/// Allowlist entries for the allowlist-size row.
const ALLOWLIST_ENTRIES: u32 = 1_000;
const WARMUP_SOCKET: u32 = 200;
const WARMUP_CLI: u32 = 20;
/// TTL of every decision (`--ttl 1h`).
const TTL_SECS: u64 = 3600;
/// How long to let the daemon finish a request (its malloc_trim runs after the answer is sent) before reading
/// its memory.
const SETTLE: Duration = Duration::from_millis(300);

// ---- address plan (all /32, the exact decision map; none overlaps the lab's 10.x addresses) ----
const WARMUP_BASE: [u8; 4] = [100, 127, 0, 0];
const SOCKET_BASE: [u8; 4] = [100, 64, 0, 0];
const CLI_BASE: [u8; 4] = [100, 65, 0, 0];
const LOADED_BASE: [u8; 4] = [100, 66, 0, 0];
const IMPORT_BASE: [u8; 4] = [100, 80, 0, 0];
const DISTINCT_REASON_BASE: [u8; 4] = [100, 67, 0, 0];
const SAME_REASON_BASE: [u8; 4] = [100, 68, 0, 0];
const ALLOWED_BASE: [u8; 4] = [100, 69, 0, 0];
/// Allowlist entries: none overlaps a decision above.
const ALLOWLIST_BASE: [u8; 4] = [198, 18, 0, 0];

fn v4_at(base: [u8; 4], offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be_bytes(base) + offset)
}

fn addresses(base: [u8; 4], n: u32) -> Vec<String> {
    (0..n).map(|i| v4_at(base, i).to_string()).collect()
}

// ---- the daemon process ----

/// The pid of the `aqd` process itself: `pid` if its executable is `aqd`, else the first descendant that is (in
/// case something between the bench and aqd forks instead of exec'ing).
fn resolve_daemon_pid(pid: u32, aqd: &Path) -> anyhow::Result<u32> {
    let want = fs::canonicalize(aqd)?;
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        if fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|exe| exe == want) {
            return Ok(p);
        }
        for task in fs::read_dir(format!("/proc/{p}/task"))?.flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            queue.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    bail!("no process running {} under pid {pid}", want.display())
}

/// What `/proc/<pid>/status` says about memory, in KiB.
#[derive(Clone, Copy, Debug)]
struct Mem {
    rss: u64,
    hwm: u64,
    anon: u64,
    threads: u64,
}

fn mem(pid: u32) -> anyhow::Result<Mem> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok(Mem {
        rss: field("VmRSS")?,
        hwm: field("VmHWM")?,
        anon: field("RssAnon")?,
        threads: field("Threads")?,
    })
}

/// Resets the daemon's VmHWM to its current VmRSS (Linux ≥ 4.0), so the next reading is the peak of one step.
fn reset_peak(pid: u32) -> anyhow::Result<()> {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").with_context(|| format!("resetting VmHWM of {pid}"))
}

/// Kernel memory of the daemon's BPF maps (memlock of each map fd, once per map id), in bytes: the total, and
/// the decision maps'.
fn map_memlock(pid: u32) -> anyhow::Result<(u64, u64)> {
    let mut seen = std::collections::BTreeSet::new();
    let (mut total, mut decisions) = (0, 0);
    for fd in fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let info = fs::read_to_string(fd.path()).unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(memlock)) = (field("map_id"), field("memlock")) else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        total += memlock;
        let name = aya::maps::MapInfo::from_id(id as u32)
            .ok()
            .and_then(|m| m.name_as_str().map(String::from));
        if matches!(
            name.as_deref(),
            Some(map_names::DECISION_EXACT | map_names::DECISION_PREFIX)
        ) {
            decisions += memlock;
        }
    }
    Ok((total, decisions))
}

/// The pinned decision maps, opened by the bench to count their entries (independently of the daemon, and of
/// the rest of [`detector_user::maps::KernelMaps`]).
struct DecisionMaps(Vec<HashMap<MapData, AddrKey, Decision>>);

impl DecisionMaps {
    fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let mut maps = Vec::new();
        for name in [map_names::DECISION_EXACT, map_names::DECISION_PREFIX] {
            let path = paths::map_pin(pin_dir, name);
            let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            maps.push(HashMap::try_from(Map::HashMap(data))?);
        }
        Ok(Self(maps))
    }

    /// Decisions in the maps (walks them).
    fn count(&self) -> usize {
        self.0.iter().map(|m| m.keys().count()).sum()
    }
}

// ---- timing ----

/// A timed run of `n` operations.
struct Run {
    n: usize,
    wall: Duration,
    /// Per-operation latencies, when each one was timed.
    latencies: Vec<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.n as f64 / self.wall.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Option<Duration> {
        let mut v = self.latencies.clone();
        v.sort_unstable();
        let last = v.len().checked_sub(1)?;
        Some(v[((v.len() as f64 * p) as usize).min(last)])
    }
}

/// A bench address as the protocol carries it.
fn net(target: &str) -> ipnet::IpNet {
    detector_user::config::parse_cidr(target).expect("bench addresses are valid")
}

fn decide_request(target: &str, reason: String) -> Request {
    Request::Decide {
        target: net(target),
        action: detector_common::Action::Block,
        class: None,
        ttl_secs: Some(TTL_SECS),
        permanent: false,
        reason,
        force: false,
    }
}

/// Sends each request through the socket (one connection each, as the protocol is), timing each call.
fn socket_one_by_one(socket: &Path, requests: &[Request]) -> anyhow::Result<Run> {
    let mut latencies = Vec::with_capacity(requests.len());
    let start = Instant::now();
    for request in requests {
        let t = Instant::now();
        control::call(socket, request).with_context(|| format!("{request:?}"))?;
        latencies.push(t.elapsed());
    }
    Ok(Run {
        n: requests.len(),
        wall: start.elapsed(),
        latencies,
    })
}

/// `Request::Decide` (block, 1h, no reason) for each target.
fn decide_all(socket: &Path, targets: &[String]) -> anyhow::Result<Run> {
    let requests: Vec<Request> = targets.iter().map(|t| decide_request(t, String::new())).collect();
    socket_one_by_one(socket, &requests)
}

/// `Request::Remove` for each target.
fn remove_all(socket: &Path, targets: &[String]) -> anyhow::Result<Run> {
    let requests: Vec<Request> = targets
        .iter()
        .map(|t| Request::Remove { target: net(t) })
        .collect();
    socket_one_by_one(socket, &requests)
}

/// Runs a prepared `aqd` command to completion; fails unless it exits 0 and talked to the daemon.
fn run_cli(mut cmd: Command) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output().context("spawning aqd")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && !stderr.contains("not running"),
        "aqd exited with {}: {stderr}",
        out.status
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// `aqd block ADDR --ttl 1h`, one process per target.
fn cli_one_by_one(lab: &Lab, targets: &[String]) -> anyhow::Result<Run> {
    let mut latencies = Vec::with_capacity(targets.len());
    let start = Instant::now();
    for target in targets {
        let mut cmd = lab.aqd_command(false);
        cmd.args(["block", target, "--ttl", "1h"]);
        let t = Instant::now();
        let stdout = run_cli(cmd)?;
        latencies.push(t.elapsed());
        ensure!(
            stdout.starts_with(&format!("block {target}/32 for ")),
            "unexpected output: {stdout}"
        );
    }
    Ok(Run {
        n: targets.len(),
        wall: start.elapsed(),
        latencies,
    })
}

// ---- formatting ----

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn rate(r: f64) -> String {
    if r >= 100.0 {
        thousands(r.round() as u64)
    } else {
        format!("{r:.1}")
    }
}

fn duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn opt_duration(d: Option<Duration>) -> String {
    d.map(duration).unwrap_or_else(|| "—".into())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

// ---- the report ----

struct Row {
    path: String,
    run: Run,
    notes: String,
}

impl Row {
    fn print(&self) {
        let lat = |p: f64| {
            if self.run.latencies.is_empty() {
                "—".into()
            } else {
                opt_duration(self.run.percentile(p))
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            self.path,
            thousands(self.run.n as u64),
            duration(self.run.wall),
            rate(self.run.rate()),
            lat(0.5),
            lat(0.99),
            lat(1.0),
            self.notes
        );
    }
}

struct MemRow {
    when: String,
    decisions: usize,
    /// VmRSS etc. after the step.
    after: Mem,
    /// VmHWM during the step (reset before it).
    peak: u64,
}

struct Report {
    header: String,
    rows: Vec<Row>,
    sensitivity: Vec<Row>,
    memory: Vec<MemRow>,
    memlock: (u64, u64),
    startup_peak: u64,
}

impl Report {
    fn print(&self) {
        println!("{}", self.header);
        println!("## Decisions applied per second\n");
        println!("| path | decisions | wall time | decisions/s | latency median | p99 | max | notes |");
        println!("|---|---:|---:|---:|---:|---:|---:|---|");
        for r in &self.rows {
            r.print();
        }
        println!(
            "| CrowdSec cs-firewall-bouncer, nftables backend | — | — | ~40 | — | — | — | reference value, **not \
             measured here** (cs-firewall-bouncer #114) |"
        );
        println!(
            "| CrowdSec cs-firewall-bouncer, iptables/ipset backend | — | — | ~1,000 | — | — | — | reference value, \
             **not measured here** (cs-firewall-bouncer #114) |"
        );

        println!("\n## What one decision's cost depends on (socket, one by one, 110,000 decisions loaded)\n");
        println!("| path | operations | wall time | operations/s | latency median | p99 | max | notes |");
        println!("|---|---:|---:|---:|---:|---:|---:|---|");
        for r in &self.sensitivity {
            r.print();
        }

        println!("\n## Daemon resident memory (`/proc/<aqd pid>/status`)\n");
        println!("| after | decisions in the maps | VmRSS | RssAnon | threads | VmHWM during the step |");
        println!("|---|---:|---:|---:|---:|---:|");
        for m in &self.memory {
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                m.when,
                thousands(m.decisions as u64),
                mib(m.after.rss),
                mib(m.after.anon),
                m.after.threads,
                mib(m.peak)
            );
        }
        let overall = self
            .memory
            .iter()
            .map(|m| m.peak)
            .chain([self.startup_peak])
            .max()
            .unwrap_or(0);
        println!(
            "\nVmHWM over the whole run (peak resident): **{}** (start-up alone: {}). VmHWM is reset (`clear_refs` \
             5) before each step, so each row's peak is that step's.",
            mib(overall),
            mib(self.startup_peak)
        );
        println!(
            "Kernel memory of the BPF maps (preallocated, not in VmRSS, independent of the fill): {} in all, of \
             which the decision maps {}.",
            mib(self.memlock.0 / 1024),
            mib(self.memlock.1 / 1024)
        );
    }
}

// ---- the run ----

fn bench(lab: &mut Lab, aqd: &Path) -> anyhow::Result<Report> {
    let attachment = lab.start_daemon()?;
    let child = lab.daemon_pid().context("daemon pid")?;
    let pid = resolve_daemon_pid(child, aqd)?;
    let socket = lab.socket();
    let maps = DecisionMaps::open(&lab.pin_dir())?;
    thread::sleep(Duration::from_millis(500));
    let startup_peak = mem(pid)?.hwm;

    let mut header = String::new();
    let uname = Command::new("uname").arg("-r").output().ok();
    let cpus = thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    writeln!(header, "# aqd control-plane benchmark\n")?;
    writeln!(
        header,
        "`{}` (pid {pid}) attached to {} in {} mode (program id {}); kernel {}, {cpus} CPUs, load average at start: \
         {}; TTL 1h; audit log on.\n",
        aqd.display(),
        attachment.iface,
        attachment.mode,
        attachment.program_id,
        uname
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
        fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    )?;

    let mut rows = Vec::new();
    let mut memory = Vec::new();
    // Closes a step: reads the memory (VmHWM is the step's peak), then resets VmHWM for the next step.
    let sample = |when: String| -> anyhow::Result<MemRow> {
        thread::sleep(SETTLE);
        let after = mem(pid)?;
        reset_peak(pid)?;
        Ok(MemRow {
            when,
            decisions: maps.count(),
            after,
            peak: after.hwm,
        })
    };
    memory.push(sample("start (attached, idle)".into())?);

    // Warm-up (page cache, allocator, the runtime's blocking thread); not reported.
    eprintln!("warm-up");
    let warmup = addresses(WARMUP_BASE, WARMUP_SOCKET);
    decide_all(&socket, &warmup)?;
    cli_one_by_one(lab, &addresses(WARMUP_BASE, WARMUP_CLI))?;
    remove_all(&socket, &warmup)?;

    eprintln!("one by one through the socket: {SOCKET_DECISIONS}");
    let socket_targets = addresses(SOCKET_BASE, SOCKET_DECISIONS);
    let run = decide_all(&socket, &socket_targets)?;
    rows.push(Row {
        path: "socket, one by one: `control::call(Decide)`, one client, empty maps".into(),
        run,
        notes: "one connection per request (the protocol); no process spawn".into(),
    });

    eprintln!("one by one through the CLI: {CLI_DECISIONS}");
    let cli_targets = addresses(CLI_BASE, CLI_DECISIONS);
    let run = cli_one_by_one(lab, &cli_targets)?;
    rows.push(Row {
        path: "CLI, one by one: `aqd block ADDR --ttl 1h`, a process each".into(),
        run,
        notes: "spawn to exit, from the host namespace".into(),
    });

    eprintln!("removing them one by one through the socket");
    let all: Vec<String> = socket_targets.iter().chain(&cli_targets).cloned().collect();
    let run = remove_all(&socket, &all)?;
    rows.push(Row {
        path: "socket, one by one: `control::call(Remove)` (unblock)".into(),
        run,
        notes: "the decisions above".into(),
    });
    ensure!(maps.count() == 0, "decisions left after the removals");
    let applied = WARMUP_SOCKET + WARMUP_CLI + SOCKET_DECISIONS + CLI_DECISIONS;
    memory.push(sample(format!(
        "the one-by-one runs ({} applied, all removed)",
        thousands(applied.into())
    ))?);

    // Bulk import through the CLI.
    let file = lab
        .config()
        .parent()
        .context("lab dir")?
        .join("import-100k.netset");
    let import_targets = addresses(IMPORT_BASE, IMPORT_DECISIONS);
    {
        let mut f = std::io::BufWriter::new(File::create(&file)?);
        writeln!(f, "# aqd control bench: {IMPORT_DECISIONS} addresses")?;
        for t in &import_targets {
            writeln!(f, "{t}")?;
        }
        f.flush()?;
    }
    eprintln!("aqd import: {IMPORT_DECISIONS}");
    let mut cmd = lab.aqd_command(false);
    cmd.arg("import")
        .arg(&file)
        .args(["--into", "block", "--ttl", "1h"]);
    let start = Instant::now();
    let stdout = run_cli(cmd)?;
    let wall = start.elapsed();
    // "imported 100000 entries from FILE in 0.12s"
    let imported: u64 = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected import output: {stdout}"))?;
    let daemon_secs = stdout
        .trim_end()
        .rsplit(' ')
        .next()
        .and_then(|s| s.strip_suffix('s')?.parse::<f64>().ok())
        .with_context(|| format!("unexpected import output: {stdout}"))?;
    ensure!(
        imported == u64::from(IMPORT_DECISIONS),
        "imported {imported}, expected {IMPORT_DECISIONS}"
    );
    rows.push(Row {
        path: "CLI, bulk: `aqd import FILE --into block --ttl 1h`".into(),
        run: Run {
            n: IMPORT_DECISIONS as usize,
            wall,
            latencies: Vec::new(),
        },
        notes: format!(
            "daemon-reported {daemon_secs:.2} s (parse + lockout checks + BPF_MAP_UPDATE_BATCH + audit); the rest \
             is the CLI reading the file and the request's trip"
        ),
    });
    memory.push(sample("`aqd import` of 100,000".into())?);
    let loaded = maps.count();
    ensure!(
        loaded == IMPORT_DECISIONS as usize,
        "{loaded} decisions in the maps after the import"
    );

    eprintln!("aqd list --json");
    let mut cmd = lab.aqd_command(false);
    cmd.args(["list", "--json"]);
    let start = Instant::now();
    let stdout = run_cli(cmd)?;
    let wall = start.elapsed();
    let listed: serde_json::Value = serde_json::from_str(&stdout)?;
    let listed = listed["decisions"].as_array().map_or(0, Vec::len);
    ensure!(
        listed == IMPORT_DECISIONS as usize,
        "`aqd list --json` showed {listed} decisions"
    );
    rows.push(Row {
        path: "CLI, read back: `aqd list --json` (rows/s, not decisions applied)".into(),
        run: Run {
            n: listed,
            wall,
            latencies: Vec::new(),
        },
        notes: format!("{} of JSON", mib(stdout.len() as u64 / 1024)),
    });
    drop(stdout);
    memory.push(sample("`aqd list --json` of 100,000".into())?);

    eprintln!("import through the socket (same 100k: replaces)");
    let request = Request::Import {
        into: ImportInto::Block,
        entries: import_targets.iter().map(|t| net(t)).collect(),
        ttl_secs: Some(TTL_SECS),
        reason: String::new(),
        force: false,
    };
    let start = Instant::now();
    let answer = control::call(&socket, &request)?;
    let wall = start.elapsed();
    drop(request);
    let daemon_secs = answer.into_imported()?.seconds;
    rows.push(Row {
        path: "socket, bulk: `control::call(Import)`, same 100,000 (replaces)".into(),
        run: Run {
            n: IMPORT_DECISIONS as usize,
            wall,
            latencies: Vec::new(),
        },
        notes: format!(
            "daemon-reported {:.3} s in the handler; {:.3} s outside it (encode, send, daemon's JSON decode, \
             answer)",
            daemon_secs,
            wall.as_secs_f64() - daemon_secs
        ),
    });
    memory.push(sample("a second import of the 100,000 (socket)".into())?);

    eprintln!("one by one through the socket with 100k loaded: {SOCKET_DECISIONS}");
    let run = decide_all(&socket, &addresses(LOADED_BASE, SOCKET_DECISIONS))?;
    rows.push(Row {
        path: "socket, one by one: `control::call(Decide)`, 100,000 loaded".into(),
        run,
        notes: "same as the first row, on top of the import".into(),
    });
    memory.push(sample("10,000 more one by one (socket)".into())?);

    // What one decision's cost depends on (on top of the 110,000 loaded).
    let mut sensitivity = Vec::new();
    eprintln!("sensitivity: reason texts, allowlist size");
    let targets = addresses(DISTINCT_REASON_BASE, SENSITIVITY_DECISIONS);
    let requests: Vec<Request> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| decide_request(t, format!("bench reason {i}")))
        .collect();
    sensitivity.push(Row {
        path: "`Decide` with a distinct `reason` each".into(),
        run: socket_one_by_one(&socket, &requests)?,
        notes: "a new reason text takes a slot in the REASONS table".into(),
    });
    let targets = addresses(SAME_REASON_BASE, SENSITIVITY_DECISIONS);
    let requests: Vec<Request> = targets
        .iter()
        .map(|t| decide_request(t, "crowdsecurity/http-probing".into()))
        .collect();
    sensitivity.push(Row {
        path: "`Decide` with one `reason` for all".into(),
        run: socket_one_by_one(&socket, &requests)?,
        notes: format!(
            "after the {} distinct ones above",
            thousands(SENSITIVITY_DECISIONS.into())
        ),
    });
    let allow: Vec<Request> = addresses(ALLOWLIST_BASE, ALLOWLIST_ENTRIES)
        .into_iter()
        .map(|target| Request::ListAdd {
            list: List::Allow,
            target: net(&target),
            ttl_secs: None,
            force: false,
        })
        .collect();
    let run = socket_one_by_one(&socket, &allow)?;
    sensitivity.push(Row {
        path: "`ListAdd` (allowlist) one by one".into(),
        run,
        notes: "growing from 0".into(),
    });
    sensitivity.push(Row {
        path: format!(
            "`Decide`, no reason, {} allowlist entries",
            thousands(ALLOWLIST_ENTRIES.into())
        ),
        run: decide_all(&socket, &addresses(ALLOWED_BASE, SENSITIVITY_DECISIONS))?,
        notes: "compare with the 100,000-loaded row above (empty allowlist)".into(),
    });

    let memlock = map_memlock(pid)?;
    Ok(Report {
        header,
        rows,
        sensitivity,
        memory,
        memlock,
        startup_peak,
    })
}

/// Drops the lab with its teardown report (the daemon log it prints on drop) captured, and shows the capture
/// only if the teardown failed. Warnings and errors from the daemon's log are printed before.
fn drop_lab(lab: Lab) -> anyhow::Result<()> {
    let log = lab.daemon_log(1);
    let notable: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    if !notable.is_empty() {
        eprintln!("daemon warnings and errors:\n{}", notable.join("\n"));
    }
    let capture = std::env::temp_dir().join(format!("aqd-bench-control-{}.stderr", std::process::id()));
    let file = File::create(&capture)?;
    // SAFETY: duplicating and restoring this process's own stderr descriptor; no other thread writes to it.
    let saved = unsafe { libc::dup(2) };
    ensure!(saved >= 0, "dup(2): {}", std::io::Error::last_os_error());
    unsafe { libc::dup2(file.as_raw_fd(), 2) };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(lab)));
    unsafe {
        libc::dup2(saved, 2);
        libc::close(saved);
    }
    let text = fs::read_to_string(&capture).unwrap_or_default();
    let _ = fs::remove_file(&capture);
    if result.is_err() {
        eprint!("{text}");
        bail!("the lab was not torn down cleanly (see above)");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if let Some(why) = netns::unavailable() {
        eprintln!("control bench skipped: {why}");
        return Ok(());
    }
    let bench_start = Instant::now();
    let aqd = netns::release_aqd()?;
    // SAFETY: no other thread exists yet. The lab runs `$AQD_BIN` (else the debug build).
    unsafe { std::env::set_var("AQD_BIN", &aqd) };
    let mut lab = Lab::new()?;
    let report = match bench(&mut lab, &aqd) {
        Ok(report) => report,
        // The lab's Drop prints the daemon log: useful here.
        Err(e) => {
            drop(lab);
            return Err(e);
        }
    };
    drop_lab(lab)?;
    report.print();
    // One core, this thread's CPU time: record reassembly + parse + JA4/JA4_r/JA4_o/JA4_ro of a Chrome-like,
    // two-record ClientHello with a post-quantum key share.
    let _warm = detector_user::fingerprint::ja4_throughput(5_000);
    let ja4_rate = detector_user::fingerprint::ja4_throughput(300_000);
    println!("\n## Userspace fingerprinting\n");
    println!("| work | per second, one core |\n|---|---|");
    println!(
        "| ClientHello → JA4 (reassembly, parse, 4 JA4 forms) | {} |",
        rate(ja4_rate)
    );
    println!(
        "\nBench wall time {:.1} s (lab set up and torn down: namespaces, veth, bpffs, daemon); load average at the \
         end: {}.",
        bench_start.elapsed().as_secs_f64(),
        fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    Ok(())
}
