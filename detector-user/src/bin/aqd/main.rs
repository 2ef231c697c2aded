//! `aqd`: the daemon (`aqd run`) and the sysadmin's CLI.
//!
//! Exit codes: 0 success; 1 operation failed; 2 bad usage or input (clap's own, and rejected CIDRs);
//! 3 nothing to do (e.g. `unblock` of an address that had no decision).

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use detector_common::{Action, Origin, Reason, Verdict, event::EventKind};
use detector_user::{
    attach::{self, AttachMode},
    daemon::{self, DaemonSettings, RateLimits},
    loader,
    maps::{KernelMaps, List, MapsError},
    paths,
};
use ipnet::IpNet;

#[derive(Parser)]
#[command(
    name = "aqd",
    version,
    about = "Adversarial query detection: an XDP classifier for AI API load balancers"
)]
struct Cli {
    /// bpffs directory under which aqd pins its maps and links (a versioned subdirectory is used).
    #[arg(long, global = true, default_value = paths::DEFAULT_PIN_ROOT, env = "AQD_PIN_ROOT")]
    pin_root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the XDP program and run the detector until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Block an address or prefix: all its traffic is dropped.
    Block(DecisionArgs),
    /// Throttle an address, /24 or /64: its traffic to protected ports is limited by a rate class.
    Throttle(ThrottleArgs),
    /// Watch an address, /24 or /64 (counted, never dropped).
    Monitor(DecisionArgs),
    /// Remove the decision on an address or prefix.
    Unblock(TargetArg),
    /// Add an address or prefix to the allowlist (always passes; beats every deny and decision).
    Allow(ListArgs),
    /// Remove an address or prefix from the allowlist.
    Disallow(TargetArg),
    /// Add an address or prefix to the denylist.
    Deny(ListArgs),
    /// Remove an address or prefix from the denylist.
    Undeny(TargetArg),
    /// List allowlist, denylist and decisions with hit counts and time left.
    List(ListCmd),
    /// Show attachments and per-reason packet counters.
    Status(JsonArg),
    /// Detach from interfaces and remove the pinned state (everything, unless --iface is given).
    Detach(DetachArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Interface to attach to (repeatable).
    #[arg(long = "iface", short = 'i', required = true)]
    interfaces: Vec<String>,
    /// XDP mode: native (in the driver) or skb (generic). Never falls back silently.
    #[arg(long, value_enum, default_value_t = AttachMode::Native)]
    xdp_mode: AttachMode,
    /// Protected service ports: rate limits apply only to traffic towards these (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "443")]
    protected_ports: Vec<u16>,
    /// Limits for sources without a decision: PPS/BURST,CONNS/BURST (0 = unlimited).
    #[arg(long, default_value = "0/0,0/0", value_parser = parse_limits)]
    default_class: RateLimits,
    /// Limits for throttled sources (rate class 1): PPS/BURST,CONNS/BURST.
    #[arg(long, default_value = "50/100,5/10", value_parser = parse_limits)]
    throttle_class: RateLimits,
    /// Sample 1 in N drops to the event stream (0 = none).
    #[arg(long, default_value_t = 64)]
    drop_sample_every: u32,
    /// Seconds between counter reports in the log.
    #[arg(long, default_value_t = 10)]
    stats_interval: u64,
}

#[derive(Args)]
struct TargetArg {
    /// An address (192.0.2.7, 2001:db8::1) or a prefix (192.0.2.0/24, 2001:db8::/64).
    target: String,
}

#[derive(Args)]
struct DecisionArgs {
    #[command(flatten)]
    target: TargetArg,
    /// How long the decision lasts (e.g. 30s, 10m, 2h, 7d); permanent if omitted.
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// Numeric reason code recorded with the decision.
    #[arg(long, default_value_t = 0)]
    reason: u16,
}

#[derive(Args)]
struct ThrottleArgs {
    #[command(flatten)]
    decision: DecisionArgs,
    /// Rate class index (1 = the --throttle-class of `aqd run`).
    #[arg(long, default_value_t = 1)]
    class: u8,
}

#[derive(Args)]
struct ListArgs {
    #[command(flatten)]
    target: TargetArg,
    /// How long the entry lasts; permanent if omitted.
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
}

#[derive(Args)]
struct JsonArg {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ListCmd {
    /// What to list.
    #[arg(value_enum, default_value_t = ListWhat::All)]
    what: ListWhat,
    #[command(flatten)]
    json: JsonArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ListWhat {
    All,
    Allow,
    Deny,
    Decisions,
}

#[derive(Args)]
struct DetachArgs {
    /// Detach only this interface and keep the maps.
    #[arg(long)]
    iface: Option<String>,
}

/// Failure kinds mapped to exit codes.
enum Outcome {
    Done,
    NothingToDo(String),
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let pin_dir = paths::versioned_pin_dir(&cli.pin_root);
    match execute(cli.command, pin_dir) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::NothingToDo(msg)) => {
            eprintln!("aqd: {msg}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("aqd: {e:#}");
            let bad_input = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<MapsError>(),
                    Some(
                        MapsError::HostBits { .. }
                            | MapsError::DecisionScope { .. }
                            | MapsError::RateClass { .. }
                    )
                ) || c.downcast_ref::<BadInput>().is_some()
            });
            ExitCode::from(if bad_input { 2 } else { 1 })
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AQD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadInput(String);

fn execute(command: Command, pin_dir: PathBuf) -> anyhow::Result<Outcome> {
    match command {
        Command::Run(args) => {
            let settings = DaemonSettings {
                interfaces: args.interfaces,
                mode: args.xdp_mode,
                pin_dir,
                protected_ports: args.protected_ports,
                rate_classes: vec![(0, args.default_class), (1, args.throttle_class)],
                drop_sample_every: args.drop_sample_every,
                stats_interval: Duration::from_secs(args.stats_interval.max(1)),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(daemon::run(settings))?;
            Ok(Outcome::Done)
        }
        Command::Block(a) => decide(&pin_dir, &a, Action::Block, 0),
        Command::Monitor(a) => decide(&pin_dir, &a, Action::Monitor, 0),
        Command::Throttle(a) => decide(&pin_dir, &a.decision, Action::Throttle, a.class),
        Command::Unblock(t) => {
            let net = parse_target(&t.target)?;
            if open_maps(&pin_dir)?.decision_remove(net)? {
                println!("removed the decision on {net}");
                Ok(Outcome::Done)
            } else {
                Ok(Outcome::NothingToDo(format!("{net} has no decision")))
            }
        }
        Command::Allow(a) => list_add(&pin_dir, List::Allow, &a),
        Command::Deny(a) => list_add(&pin_dir, List::Deny, &a),
        Command::Disallow(t) => list_remove(&pin_dir, List::Allow, &t),
        Command::Undeny(t) => list_remove(&pin_dir, List::Deny, &t),
        Command::List(args) => list(&pin_dir, args),
        Command::Status(args) => status(&pin_dir, args.json),
        Command::Detach(args) => detach(&pin_dir, args.iface.as_deref()),
    }
}

fn open_maps(pin_dir: &std::path::Path) -> anyhow::Result<KernelMaps> {
    Ok(KernelMaps::from_pins(pin_dir)?)
}

fn parse_target(s: &str) -> anyhow::Result<IpNet> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err(BadInput(format!(
        "'{s}' is not an IP address or CIDR prefix (examples: 192.0.2.7, 2001:db8::/64)"
    ))
    .into())
}

fn decide(pin_dir: &std::path::Path, a: &DecisionArgs, action: Action, class: u8) -> anyhow::Result<Outcome> {
    let net = parse_target(&a.target.target)?;
    let mut maps = open_maps(pin_dir)?;
    maps.decision_insert(net, action, class, a.reason, Origin::Cli, a.ttl)?;
    let ttl = a
        .ttl
        .map(|t| format!(" for {}s", t.as_secs()))
        .unwrap_or_default();
    println!("{} {net}{ttl}", detector_user::maps::action_name(Some(action)));
    Ok(Outcome::Done)
}

fn list_add(pin_dir: &std::path::Path, list: List, a: &ListArgs) -> anyhow::Result<Outcome> {
    let net = parse_target(&a.target.target)?;
    open_maps(pin_dir)?.list_insert(list, net, a.ttl)?;
    println!("{net} added to the {}list", list_name(list));
    Ok(Outcome::Done)
}

fn list_remove(pin_dir: &std::path::Path, list: List, t: &TargetArg) -> anyhow::Result<Outcome> {
    let net = parse_target(&t.target)?;
    if open_maps(pin_dir)?.list_remove(list, net)? {
        println!("{net} removed from the {}list", list_name(list));
        Ok(Outcome::Done)
    } else {
        Ok(Outcome::NothingToDo(format!(
            "{net} is not in the {}list",
            list_name(list)
        )))
    }
}

fn list_name(list: List) -> &'static str {
    match list {
        List::Allow => "allow",
        List::Deny => "deny",
    }
}

fn ttl_text(secs: Option<u64>) -> String {
    secs.map(|s| format!("{s}s"))
        .unwrap_or_else(|| "permanent".into())
}

fn list(pin_dir: &std::path::Path, args: ListCmd) -> anyhow::Result<Outcome> {
    let maps = open_maps(pin_dir)?;
    let want = |w: ListWhat| {
        matches!(args.what, ListWhat::All) || std::mem::discriminant(&args.what) == std::mem::discriminant(&w)
    };
    let mut lists = Vec::new();
    if want(ListWhat::Allow) {
        lists.extend(maps.list_entries(List::Allow)?);
    }
    if want(ListWhat::Deny) {
        lists.extend(maps.list_entries(List::Deny)?);
    }
    let decisions = if want(ListWhat::Decisions) {
        maps.decisions()?
    } else {
        Vec::new()
    };
    if args.json.json {
        println!(
            "{}",
            serde_json::json!({ "lists": lists, "decisions": decisions })
        );
        return Ok(Outcome::Done);
    }
    println!("{:<8} {:<44} {:>12} {:>12}", "LIST", "TARGET", "HITS", "TTL");
    for row in &lists {
        println!(
            "{:<8} {:<44} {:>12} {:>12}",
            list_name(row.list),
            row.net,
            row.hits,
            ttl_text(row.remaining_secs)
        );
    }
    println!();
    println!(
        "{:<9} {:<44} {:>5} {:>7} {:>7} {:>12} {:>12}",
        "ACTION", "TARGET", "CLASS", "REASON", "ORIGIN", "HITS", "TTL"
    );
    for d in &decisions {
        println!(
            "{:<9} {:<44} {:>5} {:>7} {:>7} {:>12} {:>12}",
            d.action,
            d.net,
            d.rate_class,
            d.reason,
            d.origin,
            d.hits,
            ttl_text(d.remaining_secs)
        );
    }
    Ok(Outcome::Done)
}

fn status(pin_dir: &std::path::Path, json: bool) -> anyhow::Result<Outcome> {
    let links = attach::attachments();
    let maps = open_maps(pin_dir)?;
    let counters = maps.counters()?;
    let fill = maps.fill_levels();
    let reasons: Vec<_> = Reason::ALL
        .iter()
        .map(|r| (r.name(), counters.by_reason[*r as usize]))
        .collect();
    let verdict_total = |v: Verdict| -> u64 {
        Reason::ALL
            .iter()
            .filter(|r| r.verdict() == v)
            .map(|r| counters.by_reason[*r as usize])
            .sum()
    };
    let events = [EventKind::Conn, EventKind::Drop];
    if json {
        let out = serde_json::json!({
            "pin_dir": pin_dir,
            "attachments": links,
            "packets": counters.packets(),
            "passed": verdict_total(Verdict::Pass),
            "dropped": verdict_total(Verdict::Drop),
            "reasons": reasons.iter().map(|(n, v)| (n.to_string(), serde_json::Value::from(*v))).collect::<serde_json::Map<_, _>>(),
            "events_sent": events.iter().map(|k| (k.name().to_string(), serde_json::Value::from(counters.events_sent[*k as usize]))).collect::<serde_json::Map<_, _>>(),
            "events_lost": events.iter().map(|k| (k.name().to_string(), serde_json::Value::from(counters.events_lost[*k as usize]))).collect::<serde_json::Map<_, _>>(),
            "maps": fill.iter().map(|(n, used, cap)| serde_json::json!({"name": n, "entries": used, "capacity": cap})).collect::<Vec<_>>(),
        });
        println!("{out}");
        return Ok(Outcome::Done);
    }
    println!("pin dir: {}", pin_dir.display());
    if links.is_empty() {
        println!("attached: nowhere");
    }
    for l in &links {
        println!(
            "attached: {} ({} mode, program id {})",
            l.iface, l.mode, l.program_id
        );
    }
    println!(
        "packets: {}  passed: {}  dropped: {}",
        counters.packets(),
        verdict_total(Verdict::Pass),
        verdict_total(Verdict::Drop)
    );
    for (name, value) in &reasons {
        println!("  {name:<24} {value:>14}");
    }
    for k in events {
        println!(
            "events {:<12} sent {:>12} lost {:>12}",
            k.name(),
            counters.events_sent[k as usize],
            counters.events_lost[k as usize]
        );
    }
    for (name, used, cap) in fill {
        println!(
            "map {name:<16} {used:>9} / {cap:<9} ({:.1}%)",
            used as f64 * 100.0 / cap as f64
        );
    }
    Ok(Outcome::Done)
}

fn detach(pin_dir: &std::path::Path, iface: Option<&str>) -> anyhow::Result<Outcome> {
    let outcome: anyhow::Result<Outcome> = match iface {
        Some(iface) => {
            if attach::detach(iface)? {
                println!(
                    "detached from {iface}; pinned maps kept under {}",
                    pin_dir.display()
                );
                Ok(Outcome::Done)
            } else {
                Ok(Outcome::NothingToDo(format!("aqd is not attached to {iface}")))
            }
        }
        None => {
            let mut detached = Vec::new();
            for a in attach::attachments() {
                attach::detach(&a.iface)?;
                detached.push(a.iface);
            }
            loader::remove_pins(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
            println!(
                "detached from [{}]; pinned state under {} removed",
                detached.join(", "),
                pin_dir.display()
            );
            Ok(Outcome::Done)
        }
    };
    outcome.context("detach")
}

/// `PPS/BURST,CONNS/BURST`, e.g. `50/100,5/10`.
fn parse_limits(s: &str) -> Result<RateLimits, String> {
    let err = || format!("'{s}': expected PPS/BURST,CONNS/BURST such as 50/100,5/10");
    let (packets, conns) = s.split_once(',').ok_or_else(err)?;
    let pair = |p: &str| -> Result<(u32, u32), String> {
        let (rate, burst) = p.split_once('/').ok_or_else(err)?;
        Ok((
            rate.trim().parse().map_err(|_| err())?,
            burst.trim().parse().map_err(|_| err())?,
        ))
    };
    let (packets_per_s, packet_burst) = pair(packets)?;
    let (conns_per_s, conn_burst) = pair(conns)?;
    Ok(RateLimits {
        packets_per_s,
        packet_burst,
        conns_per_s,
        conn_burst,
    })
}

/// `90`, `30s`, `10m`, `2h`, `7d`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}': expected a duration such as 30s, 10m, 2h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use s, m, h or d)")),
    };
    if secs == 0 {
        return Err(format!("'{s}': a TTL must be positive"));
    }
    Ok(Duration::from_secs(secs))
}
