//! Command-line arguments. The doc comments are the help text.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use detector_user::{
    attach::AttachMode,
    config::{parse_cidr, parse_duration},
    control::{ControlError, ErrorKind, ImportInto, ListWhat},
};
use ipnet::IpNet;

#[derive(Parser)]
#[command(
    name = "aqd",
    version,
    about = "Adversarial query detection: an XDP classifier for AI API load balancers",
    after_help = "Exit codes: 0 done, 1 failed, 2 bad input or refused, 3 nothing to do, 4 daemon not running."
)]
pub struct Cli {
    /// Config file [default: /etc/aqd/aqd.toml if it exists, else built-in defaults].
    #[arg(long, global = true, env = "AQD_CONFIG")]
    pub config: Option<PathBuf>,
    /// bpffs directory for the pinned maps (overrides daemon.pin_root) [default: /sys/fs/bpf/aqd].
    #[arg(long, global = true, env = "AQD_PIN_ROOT")]
    pub pin_root: Option<PathBuf>,
    /// Control socket (overrides daemon.socket) [default: /run/aqd/aqd.sock].
    #[arg(long, global = true, env = "AQD_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Durable state directory (overrides daemon.state_dir) [default: /var/lib/aqd].
    #[arg(long, global = true, env = "AQD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load and attach the XDP program and run the daemon until SIGINT/SIGTERM (SIGHUP reloads the config).
    Run(RunArgs),
    /// Interfaces, XDP mode, program, per-reason counters, events and map fill levels.
    Status(JsonArg),
    /// Allowlist, denylist and decisions with hit counts and time left.
    List(ListCmd),
    /// Busiest sources now (traffic to protected ports): packets, bytes, new connections, rate-limit drops.
    Top(TopArgs),
    /// Block an address or prefix: all its traffic is dropped.
    Block(DecisionArgs),
    /// Throttle an address, /24 or /64: its traffic to protected ports is limited by a rate class.
    Throttle(ThrottleArgs),
    /// Watch an address, /24 or /64: counted, never dropped.
    Monitor(DecisionArgs),
    /// Remove the decision (block, throttle or monitor) on an address or prefix.
    Unblock(TargetArg),
    /// Add to the allowlist: always passes, beats every deny and decision.
    Allow(ListArgs),
    /// Remove from the allowlist.
    Disallow(TargetArg),
    /// Add to the denylist: always dropped (unless allowlisted).
    Deny(ListArgs),
    /// Remove from the denylist.
    Undeny(TargetArg),
    /// Bulk-load a list file (one address or CIDR per line, # comments; ipset/FireHOL .netset files).
    Import(ImportArgs),
    /// Ask the daemon to reload its config (like SIGHUP); a bad config is rejected and the old one kept.
    Reload,
    /// Validate the config file (and the list files it names) without touching anything.
    CheckConfig,
    /// Detach from interfaces and remove the pinned state (everything, unless --iface is given).
    Detach(DetachArgs),
    /// Fingerprint a capture offline: JA4/JA4_r of every ClientHello, p0f signature and label of every SYN.
    Fingerprint(FingerprintArgs),
    /// Live fingerprints (JA4, SYN signatures) and verdicts by fingerprint.
    #[command(subcommand)]
    Fp(FpCommand),
    /// Why the model scores an address, prefix or fingerprint as it does: features, contributions, decisions.
    Explain(ExplainArgs),
    /// Print shell completions.
    Completions(CompletionArgs),
}

/// FP is a JA4 (t13d1516h2_8daaf6152771_b186095e22b6), a JA4_r, a p0f SYN signature as `aqd fp list` or
/// `aqd fingerprint` prints it (quote it), `syn:0x<key>` or `hello:0x<key>`.
#[derive(Subcommand)]
pub enum FpCommand {
    /// Fingerprints seen (JA4 with JA4_r and kernel keys; SYN signatures with their p0f label): connections,
    /// distinct sources, first/last seen, verdict.
    List(JsonArg),
    /// Drop connections with this fingerprint in the kernel (SYN, or ClientHello and the rest of its flow).
    Block(FpVerdictArgs),
    /// Limit connections with this fingerprint by a rate class.
    Throttle(FpThrottleArgs),
    /// Count connections with this fingerprint; never drop them.
    Monitor(FpVerdictArgs),
    /// Explicitly allow this fingerprint: nothing drops it, and the model never acts on it.
    Allow(FpVerdictArgs),
    /// Remove the verdict on a fingerprint.
    #[command(alias = "unblock")]
    Remove(FpArg),
}

#[derive(Args)]
pub struct FpArg {
    /// The fingerprint.
    pub fp: String,
}

#[derive(Args)]
pub struct FpVerdictArgs {
    #[command(flatten)]
    pub fp: FpArg,
    /// How long it lasts (30s, 10m, 2h, 7d) [default: decisions.default_ttl, 4h].
    #[arg(long, value_parser = parse_duration, conflicts_with = "permanent")]
    pub ttl: Option<Duration>,
    /// Never expires.
    #[arg(long)]
    pub permanent: bool,
    /// Why (shown by `fp list`, recorded in the audit log).
    #[arg(long, default_value = "")]
    pub reason: String,
}

#[derive(Args)]
pub struct FpThrottleArgs {
    #[command(flatten)]
    pub verdict: FpVerdictArgs,
    /// Rate class name or id from the config.
    #[arg(long, default_value = "throttle")]
    pub class: String,
}

#[derive(Args)]
pub struct RunArgs {
    /// Interface to attach to (repeatable; overrides daemon.interfaces).
    #[arg(long = "iface", short = 'i')]
    pub interfaces: Vec<String>,
    /// XDP mode: native (in the driver) or skb (generic). Never falls back silently.
    #[arg(long, value_enum)]
    pub xdp_mode: Option<AttachMode>,
    /// Protected service ports, comma-separated (overrides protection.ports).
    #[arg(long, value_delimiter = ',')]
    pub protected_ports: Option<Vec<u16>>,
    /// Seconds between counter reports in the log.
    #[arg(long)]
    pub stats_interval: Option<u64>,
    /// Prometheus endpoint address:port, or "" to disable.
    #[arg(long)]
    pub metrics_address: Option<String>,
    /// Audit log path (overrides daemon.audit_log).
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// Compute and show model decisions without enforcing them.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args)]
pub struct TargetArg {
    /// An address (192.0.2.7, 2001:db8::1) or a prefix (192.0.2.0/24, 2001:db8::/64).
    pub target: String,
}

impl TargetArg {
    pub fn net(&self) -> Result<IpNet, ControlError> {
        parse_cidr(&self.target).map_err(|m| ControlError::new(ErrorKind::BadRequest, m))
    }
}

#[derive(Args)]
pub struct DecisionArgs {
    #[command(flatten)]
    pub target: TargetArg,
    /// How long it lasts (30s, 10m, 2h, 7d) [default: decisions.default_ttl, 4h].
    #[arg(long, value_parser = parse_duration, conflicts_with = "permanent")]
    pub ttl: Option<Duration>,
    /// Never expires.
    #[arg(long)]
    pub permanent: bool,
    /// Why (shown by `list`, recorded in the audit log).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Override the allowlist and minimum-prefix guards (management networks are never blocked).
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct ThrottleArgs {
    #[command(flatten)]
    pub decision: DecisionArgs,
    /// Rate class name or id from the config.
    #[arg(long, default_value = "throttle")]
    pub class: String,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub target: TargetArg,
    /// How long the entry lasts; permanent if omitted.
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Override the allowlist and minimum-prefix guards (deny only).
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct ImportArgs {
    /// The list file.
    pub file: PathBuf,
    /// Where the entries go.
    #[arg(long, value_enum)]
    pub into: ImportInto,
    /// How long the entries last [block: decisions.default_ttl; lists: permanent].
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Why (shown by `list` for blocks, recorded in the audit log).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Override the allowlist and minimum-prefix guards.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct JsonArg {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ListCmd {
    /// What to list.
    #[arg(value_enum, default_value_t = ListWhat::All)]
    pub what: ListWhat,
    #[command(flatten)]
    pub json: JsonArg,
}

#[derive(Args)]
pub struct TopArgs {
    /// Sort by this rate.
    #[arg(long, value_enum, default_value_t = TopBy::Packets)]
    pub by: TopBy,
    /// How many sources to show.
    #[arg(long, short = 'n', default_value_t = 20)]
    pub limit: usize,
    /// Measurement window.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub interval: Duration,
    /// With `--by score`: rank sources, prefixes or fingerprint clusters.
    #[arg(long, value_enum, default_value_t = ScoreKind::Source)]
    pub kind: ScoreKind,
    #[command(flatten)]
    pub json: JsonArg,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopBy {
    Packets,
    Bytes,
    Conns,
    Drops,
    /// The behavioural model's score (from the daemon).
    Score,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScoreKind {
    Source,
    Prefix,
    Fingerprint,
}

#[derive(Args)]
pub struct ExplainArgs {
    /// An address, a prefix, a JA4 or `syn:0x<key>`.
    pub target: String,
    #[command(flatten)]
    pub json: JsonArg,
}

#[derive(Args)]
pub struct DetachArgs {
    /// Detach only this interface and keep the maps.
    #[arg(long)]
    pub iface: Option<String>,
}

#[derive(Args)]
pub struct FingerprintArgs {
    /// A pcap or pcapng file.
    pub file: PathBuf,
    /// p0f v3 signature database for SYN labels [default: /etc/aqd/p0f.fp if it exists].
    #[arg(long)]
    pub p0f_db: Option<PathBuf>,
    /// One JSON object per record instead of text lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CompletionArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}
