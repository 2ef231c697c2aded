//! The daemon's TOML configuration: parsing, defaults, validation.
//!
//! Two stages (as ripgrep does with arguments): [`RawConfig`] is what serde reads, with source spans kept for
//! every value a person can get wrong; [`Config::from_toml`] validates it into typed values. Every error names
//! the file, the line and the field. A reload that fails validation is rejected and the running config kept.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use crate::{
    attach::AttachMode,
    fingerprint::live::{FpAction, LiveSettings, parse_fp},
    paths,
};

/// Where `aqd run` reads its config unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/aqd/aqd.toml";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax errors and unknown or mistyped fields (the toml crate names the line, column and field).
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value that parsed but is not acceptable.
    #[error("{path}:{line}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
}

/// A rate class as written in the config: rates per second and bursts. 0 = unlimited.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    pub packets_per_second: u32,
    pub packet_burst: u32,
    pub connections_per_second: u32,
    pub connection_burst: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    protection: RawProtection,
    #[serde(default)]
    rate_classes: BTreeMap<String, Spanned<RawRateClass>>,
    #[serde(default)]
    lists: RawLists,
    #[serde(default)]
    decisions: RawDecisions,
    #[serde(default)]
    events: RawEvents,
    #[serde(default)]
    fingerprints: RawFingerprints,
    /// `[[fingerprint]]` verdict rules.
    #[serde(default)]
    fingerprint: Vec<Spanned<RawFingerprintRule>>,
    /// `[model]`: the behavioural model's settings (every key optional; unknown keys are errors).
    #[serde(default)]
    model: crate::model::ModelConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFingerprints {
    p0f_db: Option<Spanned<PathBuf>>,
    max_flows: Option<Spanned<usize>>,
    flow_timeout: Option<Spanned<String>>,
    max_fingerprints: Option<Spanned<usize>>,
    escalate_after: Option<Spanned<u32>>,
    escalate_window: Option<Spanned<String>>,
    escalate_ttl: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFingerprintRule {
    fp: Spanned<String>,
    action: Spanned<String>,
    ttl: Option<Spanned<String>>,
    #[serde(default)]
    reason: String,
    class: Option<Spanned<String>>,
}

/// A `[[fingerprint]]` rule: a verdict by fingerprint from the config file.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FingerprintRule {
    /// The fingerprint as written (JA4, JA4_r, p0f SYN text, `syn:0x…`, `hello:0x…`).
    pub fp: String,
    pub action: FpAction,
    /// None = permanent.
    pub ttl: Option<Duration>,
    pub reason: String,
    /// Rate class (throttle only).
    pub class: Option<String>,
}

impl FingerprintRule {
    /// The rule as one line, to tell a changed rule from an unchanged one across reloads.
    pub fn canonical(&self) -> String {
        format!(
            "{}|{}|{:?}|{}|{:?}",
            self.fp,
            self.action.name(),
            self.ttl.map(|t| t.as_secs()),
            self.reason,
            self.class
        )
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    #[serde(default)]
    interfaces: Vec<Spanned<String>>,
    xdp_mode: Option<AttachMode>,
    pin_root: Option<PathBuf>,
    socket: Option<PathBuf>,
    socket_group: Option<Spanned<String>>,
    audit_log: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    metrics_address: Option<Spanned<String>>,
    stats_interval: Option<Spanned<String>>,
    #[serde(default)]
    dry_run: bool,
    control_max_connections: Option<Spanned<i64>>,
    metrics_max_connections: Option<Spanned<i64>>,
}

/// A duration given as whole seconds (`3600`) or as text (`"1h"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SecsOrDuration {
    Secs(i64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProtection {
    ports: Option<Spanned<Vec<u16>>>,
    #[serde(default)]
    management: Vec<Spanned<String>>,
    min_block_prefix_v4: Option<Spanned<u8>>,
    min_block_prefix_v6: Option<Spanned<u8>>,
    #[serde(default)]
    pass_tcp_fragments: bool,
    verify_tcp_checksums: Option<bool>,
    #[serde(default)]
    handshake_ack_only: bool,
    flow_idle_timeout: Option<Spanned<SecsOrDuration>>,
    flow_fin_timeout: Option<Spanned<SecsOrDuration>>,
    half_open_timeout: Option<Spanned<SecsOrDuration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateClass {
    id: u8,
    // Spelled out rather than a flattened RateLimits: with flatten, toml reports type errors at the table's
    // header line without naming the key.
    #[serde(default)]
    packets_per_second: u32,
    #[serde(default)]
    packet_burst: u32,
    #[serde(default)]
    connections_per_second: u32,
    #[serde(default)]
    connection_burst: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLists {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    #[serde(default)]
    allow_files: Vec<Spanned<PathBuf>>,
    #[serde(default)]
    deny_files: Vec<Spanned<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDecisions {
    default_ttl: Option<Spanned<String>>,
    ttl_jitter: Option<Spanned<f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvents {
    drop_sample_every: Option<u32>,
}

/// A named rate class.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RateClassConfig {
    pub name: String,
    pub id: u8,
    pub limits: RateLimits,
}

/// The largest connection cap a config may set (each connection costs a descriptor and a task).
const MAX_CONNECTIONS_CAP: usize = 65_536;

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Config {
    pub interfaces: Vec<String>,
    pub xdp_mode: AttachMode,
    pub pin_root: PathBuf,
    pub socket: PathBuf,
    /// Group allowed to use the control socket (besides root); None = root only.
    pub socket_group: Option<String>,
    pub audit_log: PathBuf,
    /// Durable state (the state store and the single-instance lock).
    pub state_dir: PathBuf,
    pub metrics_address: Option<SocketAddr>,
    pub stats_interval: Duration,
    /// `[daemon] control_max_connections` (default 64): concurrent control-socket connections (see `serve`).
    pub control_max_connections: usize,
    /// `[daemon] metrics_max_connections` (default 32): concurrent metrics connections.
    pub metrics_max_connections: usize,
    /// Compute and show decisions, enforce none (model decisions only; manual ones are always enforced).
    pub dry_run: bool,
    pub protected_ports: Vec<u16>,
    /// Networks that can never be blocked or throttled (the operator's own access).
    pub management: Vec<IpNet>,
    pub min_block_prefix_v4: u8,
    pub min_block_prefix_v6: u8,
    /// `[protection] pass_tcp_fragments`: pass TCP fragments towards protected ports (dropped by default).
    pub pass_tcp_fragments: bool,
    /// `[protection] verify_tcp_checksums` (default true): off only for generic XDP behind GRO.
    pub verify_tcp_checksums: bool,
    /// `[protection] handshake_ack_only`: for hosts that never see the server's SYN-ACK (a load balancer that
    /// does not terminate TCP); forged sources can then complete handshakes in aqd's eyes.
    pub handshake_ack_only: bool,
    /// `[protection] flow_idle_timeout`, `flow_fin_timeout`, `half_open_timeout`: when the daemon deletes idle
    /// entries of the kernel's connection tables (see `aging`).
    pub aging: crate::aging::AgingPolicy,
    /// Rate classes by name; id 0 ("default") applies to every source without a decision.
    pub rate_classes: Vec<RateClassConfig>,
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    pub allow_files: Vec<PathBuf>,
    pub deny_files: Vec<PathBuf>,
    pub default_ttl: Duration,
    /// Expiries are spread by up to this fraction of the TTL so a bulk import never expires in one second.
    pub ttl_jitter: f64,
    pub drop_sample_every: u32,
    /// `[fingerprints]`: the live fingerprint pipeline.
    pub fingerprints: LiveSettings,
    /// `[[fingerprint]]`: verdicts by fingerprint.
    pub fingerprint_rules: Vec<FingerprintRule>,
    /// `[model]`: the behavioural model.
    pub model: crate::model::ModelConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self::from_toml("", Path::new("<defaults>")).expect("the empty config is valid")
    }
}

/// Maps byte offsets to 1-based line numbers.
struct Lines<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Lines<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        self.text[..span.start.min(self.text.len())].matches('\n').count() + 1
    }

    fn invalid(&self, span: Range<usize>, field: &str, message: impl fmt::Display) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: self.line(span),
            field: field.to_string(),
            message: message.to_string(),
        }
    }
}

impl Config {
    /// The entries of `allow_files` and `deny_files`, read now, as (allowlist?, network). A deny entry that
    /// touches a management network is refused (the lockout guard), naming the file and line; as is any bad line.
    pub fn list_file_entries(&self) -> Result<Vec<(bool, IpNet)>, String> {
        let guard = crate::lockout::Guard::new(self.management.iter().copied());
        let mut entries = Vec::new();
        for (files, allow) in [(&self.allow_files, true), (&self.deny_files, false)] {
            for file in files {
                let nets = crate::listfile::load_numbered(file)?;
                if !allow {
                    crate::listfile::check_deny(file, &nets, &guard)?;
                }
                entries.extend(nets.into_iter().map(|(_, net)| (allow, net)));
            }
        }
        Ok(entries)
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Validates config text; `path` is only used in messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })?;
        let lines = Lines { text, path };

        let interfaces = raw
            .daemon
            .interfaces
            .iter()
            .map(|i| i.get_ref().clone())
            .collect();
        for iface in &raw.daemon.interfaces {
            let name = iface.get_ref();
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                return Err(lines.invalid(
                    iface.span(),
                    "daemon.interfaces",
                    format!("'{name}' is not an interface name"),
                ));
            }
        }
        let metrics_address = match &raw.daemon.metrics_address {
            None => None,
            Some(a) if a.get_ref().is_empty() => None,
            Some(a) => Some(a.get_ref().parse::<SocketAddr>().map_err(|_| {
                lines.invalid(
                    a.span(),
                    "daemon.metrics_address",
                    format!("'{}' is not an address:port", a.get_ref()),
                )
            })?),
        };
        let cap = |v: &Option<Spanned<i64>>, field: &str, default: usize| match v {
            None => Ok(default),
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(c) if (1..=MAX_CONNECTIONS_CAP).contains(&c) => Ok(c),
                _ => Err(lines.invalid(
                    n.span(),
                    field,
                    format!(
                        "{} is out of range: 1 to {MAX_CONNECTIONS_CAP} connections",
                        n.get_ref()
                    ),
                )),
            },
        };
        let control_max_connections = cap(
            &raw.daemon.control_max_connections,
            "daemon.control_max_connections",
            64,
        )?;
        let metrics_max_connections = cap(
            &raw.daemon.metrics_max_connections,
            "daemon.metrics_max_connections",
            32,
        )?;
        let duration = |v: &Option<Spanned<String>>, field: &str, default: Duration| match v {
            None => Ok(default),
            Some(s) => parse_duration(s.get_ref()).map_err(|m| lines.invalid(s.span(), field, m)),
        };
        let stats_interval = duration(
            &raw.daemon.stats_interval,
            "daemon.stats_interval",
            Duration::from_secs(10),
        )?;
        let default_ttl = duration(
            &raw.decisions.default_ttl,
            "decisions.default_ttl",
            Duration::from_secs(4 * 3600),
        )?;
        // Connection-table ageing: 1 s .. 7 d (an entry idle longer than a week is no connection worth a slot).
        let aging_timeout = |v: &Option<Spanned<SecsOrDuration>>, field: &str, default: Duration| {
            let Some(v) = v else { return Ok(default) };
            let (text, parsed) = match v.get_ref() {
                SecsOrDuration::Secs(n) => (
                    n.to_string(),
                    u64::try_from(*n)
                        .ok()
                        .filter(|n| *n > 0)
                        .map(Duration::from_secs)
                        .ok_or_else(|| format!("{n}: must be a positive number of seconds")),
                ),
                SecsOrDuration::Text(t) => (t.clone(), parse_duration(t)),
            };
            match parsed {
                Ok(d) if d <= Duration::from_secs(7 * 86400) => Ok(d),
                Ok(_) => Err(lines.invalid(
                    v.span(),
                    field,
                    format!("'{text}' is longer than 7d (give seconds, or a duration from 1s to 7d)"),
                )),
                Err(m) => Err(lines.invalid(v.span(), field, m)),
            }
        };
        let aging = crate::aging::AgingPolicy {
            flow_idle: aging_timeout(
                &raw.protection.flow_idle_timeout,
                "protection.flow_idle_timeout",
                crate::aging::DEFAULT_FLOW_IDLE_TIMEOUT,
            )?,
            fin_idle: aging_timeout(
                &raw.protection.flow_fin_timeout,
                "protection.flow_fin_timeout",
                crate::aging::DEFAULT_FLOW_FIN_TIMEOUT,
            )?,
            half_open: aging_timeout(
                &raw.protection.half_open_timeout,
                "protection.half_open_timeout",
                crate::aging::DEFAULT_HALF_OPEN_TIMEOUT,
            )?,
        };
        let ttl_jitter = match &raw.decisions.ttl_jitter {
            None => 0.1,
            Some(j) if (0.0..=0.5).contains(j.get_ref()) => *j.get_ref(),
            Some(j) => {
                return Err(lines.invalid(j.span(), "decisions.ttl_jitter", "must be between 0.0 and 0.5"));
            }
        };

        let protected_ports = match &raw.protection.ports {
            None => vec![443],
            Some(p) if p.get_ref().is_empty() || p.get_ref().contains(&0) => {
                return Err(lines.invalid(
                    p.span(),
                    "protection.ports",
                    "list at least one port, each 1-65535",
                ));
            }
            Some(p) => p.get_ref().clone(),
        };
        let cidrs = |items: &[Spanned<String>], field: &str| -> Result<Vec<IpNet>, ConfigError> {
            items
                .iter()
                .map(|s| parse_cidr(s.get_ref()).map_err(|m| lines.invalid(s.span(), field, m)))
                .collect()
        };
        let management = cidrs(&raw.protection.management, "protection.management")?;
        let prefix = |v: &Option<Spanned<u8>>, field: &str, default: u8, max: u8| match v {
            None => Ok(default),
            Some(p) if *p.get_ref() <= max => Ok(*p.get_ref()),
            Some(p) => Err(lines.invalid(p.span(), field, format!("must be at most {max}"))),
        };
        let min_block_prefix_v4 = prefix(
            &raw.protection.min_block_prefix_v4,
            "protection.min_block_prefix_v4",
            16,
            32,
        )?;
        let min_block_prefix_v6 = prefix(
            &raw.protection.min_block_prefix_v6,
            "protection.min_block_prefix_v6",
            48,
            128,
        )?;

        let mut rate_classes = vec![RateClassConfig {
            name: "default".into(),
            id: 0,
            limits: RateLimits::default(),
        }];
        let mut throttle_defined = false;
        for (name, class) in &raw.rate_classes {
            let field = format!("rate_classes.{name}");
            let c = class.get_ref();
            if c.id as u32 >= detector_common::capacity::RATE_CLASSES {
                return Err(lines.invalid(
                    class.span(),
                    &field,
                    format!(
                        "id {} is out of range (0..{})",
                        c.id,
                        detector_common::capacity::RATE_CLASSES
                    ),
                ));
            }
            if (name == "default") != (c.id == 0) {
                return Err(lines.invalid(
                    class.span(),
                    &field,
                    "id 0 is the class named \"default\", and only it",
                ));
            }
            if let Some(other) = rate_classes.iter().find(|r| r.id == c.id && r.name != "default") {
                return Err(lines.invalid(
                    class.span(),
                    &field,
                    format!("id {} is also used by {}", c.id, other.name),
                ));
            }
            throttle_defined |= name == "throttle";
            let limits = RateLimits {
                packets_per_second: c.packets_per_second,
                packet_burst: c.packet_burst,
                connections_per_second: c.connections_per_second,
                connection_burst: c.connection_burst,
            };
            let entry = RateClassConfig {
                name: name.clone(),
                id: c.id,
                limits,
            };
            match rate_classes.iter_mut().find(|r| r.id == c.id) {
                Some(existing) => *existing = entry,
                None => rate_classes.push(entry),
            }
        }
        if !throttle_defined && !rate_classes.iter().any(|r| r.id == 1) {
            rate_classes.push(RateClassConfig {
                name: "throttle".into(),
                id: 1,
                limits: RateLimits {
                    packets_per_second: 50,
                    packet_burst: 100,
                    connections_per_second: 5,
                    connection_burst: 10,
                },
            });
        }
        rate_classes.sort_by_key(|r| r.id);

        let allow = cidrs(&raw.lists.allow, "lists.allow")?;
        let deny = cidrs(&raw.lists.deny, "lists.deny")?;
        // The lockout guard: a deny entry touching a management network is a config error (never forced).
        let guard = crate::lockout::Guard::new(management.iter().copied());
        for (item, net) in raw.lists.deny.iter().zip(&deny) {
            guard
                .check_management(crate::lockout::Verb::Deny, *net)
                .map_err(|e| lines.invalid(item.span(), "lists.deny", e))?;
        }
        let files = |v: &[Spanned<PathBuf>]| v.iter().map(|p| p.get_ref().clone()).collect::<Vec<_>>();

        let fpc = &raw.fingerprints;
        let mut fingerprints = LiveSettings::default();
        if let Some(p) = &fpc.p0f_db {
            fingerprints.p0f_db = (!p.get_ref().as_os_str().is_empty()).then(|| p.get_ref().clone());
        }
        let positive = |v: &Option<Spanned<usize>>, field: &str, default: usize, max: usize| match v {
            None => Ok(default),
            Some(n) if (1..=max).contains(n.get_ref()) => Ok(*n.get_ref()),
            Some(n) => Err(lines.invalid(n.span(), field, format!("must be between 1 and {max}"))),
        };
        fingerprints.max_flows = positive(
            &fpc.max_flows,
            "fingerprints.max_flows",
            fingerprints.max_flows,
            1 << 20,
        )?;
        fingerprints.max_fingerprints = positive(
            &fpc.max_fingerprints,
            "fingerprints.max_fingerprints",
            fingerprints.max_fingerprints,
            1 << 20,
        )?;
        fingerprints.flow_timeout = duration(
            &fpc.flow_timeout,
            "fingerprints.flow_timeout",
            fingerprints.flow_timeout,
        )?;
        fingerprints.escalate_window = duration(
            &fpc.escalate_window,
            "fingerprints.escalate_window",
            fingerprints.escalate_window,
        )?;
        fingerprints.escalate_ttl = duration(
            &fpc.escalate_ttl,
            "fingerprints.escalate_ttl",
            fingerprints.escalate_ttl,
        )?;
        if let Some(n) = &fpc.escalate_after {
            fingerprints.escalate_after = *n.get_ref();
        }

        let mut fingerprint_rules: Vec<FingerprintRule> = Vec::new();
        let mut rule_ids: BTreeMap<String, usize> = BTreeMap::new();
        for rule in &raw.fingerprint {
            let r = rule.get_ref();
            let target = parse_fp(r.fp.get_ref(), |_| None)
                .map_err(|m| lines.invalid(r.fp.span(), "fingerprint.fp", m))?;
            if let Some(first) = rule_ids.insert(target.id(), lines.line(rule.span())) {
                return Err(lines.invalid(
                    r.fp.span(),
                    "fingerprint.fp",
                    format!("the same fingerprint has a rule at line {first} already"),
                ));
            }
            let action = FpAction::parse(r.action.get_ref())
                .map_err(|m| lines.invalid(r.action.span(), "fingerprint.action", m))?;
            let ttl = match &r.ttl {
                None => None,
                Some(t) => Some(
                    parse_duration(t.get_ref()).map_err(|m| lines.invalid(t.span(), "fingerprint.ttl", m))?,
                ),
            };
            let class = match &r.class {
                None => None,
                Some(c) if action != FpAction::Throttle => {
                    return Err(lines.invalid(
                        c.span(),
                        "fingerprint.class",
                        "only a throttle rule takes a class",
                    ));
                }
                Some(c) => {
                    let name = c.get_ref();
                    if !rate_classes
                        .iter()
                        .any(|rc| rc.name == *name || rc.id.to_string() == *name)
                    {
                        return Err(lines.invalid(
                            c.span(),
                            "fingerprint.class",
                            format!("unknown rate class '{name}'"),
                        ));
                    }
                    Some(name.clone())
                }
            };
            fingerprint_rules.push(FingerprintRule {
                fp: r.fp.get_ref().trim().to_string(),
                action,
                ttl,
                reason: r.reason.trim().to_string(),
                class,
            });
        }

        Ok(Self {
            interfaces,
            xdp_mode: raw.daemon.xdp_mode.unwrap_or(AttachMode::Native),
            pin_root: raw
                .daemon
                .pin_root
                .unwrap_or_else(|| PathBuf::from(paths::DEFAULT_PIN_ROOT)),
            socket: raw
                .daemon
                .socket
                .unwrap_or_else(|| PathBuf::from(paths::DEFAULT_SOCKET)),
            socket_group: raw
                .daemon
                .socket_group
                .map(|g| g.into_inner())
                .filter(|g| !g.is_empty()),
            audit_log: raw
                .daemon
                .audit_log
                .unwrap_or_else(|| PathBuf::from(paths::DEFAULT_AUDIT_LOG)),
            state_dir: raw
                .daemon
                .state_dir
                .unwrap_or_else(|| PathBuf::from(paths::DEFAULT_STATE_DIR)),
            metrics_address,
            stats_interval,
            control_max_connections,
            metrics_max_connections,
            dry_run: raw.daemon.dry_run,
            protected_ports,
            management,
            min_block_prefix_v4,
            min_block_prefix_v6,
            pass_tcp_fragments: raw.protection.pass_tcp_fragments,
            verify_tcp_checksums: raw.protection.verify_tcp_checksums.unwrap_or(true),
            handshake_ack_only: raw.protection.handshake_ack_only,
            aging,
            rate_classes,
            allow,
            deny,
            allow_files: files(&raw.lists.allow_files),
            deny_files: files(&raw.lists.deny_files),
            default_ttl,
            ttl_jitter,
            drop_sample_every: raw.events.drop_sample_every.unwrap_or(64),
            fingerprints,
            fingerprint_rules,
            model: raw.model,
        })
    }

    /// The rate class with this name, or this numeric id.
    pub fn rate_class(&self, name_or_id: &str) -> Option<&RateClassConfig> {
        self.rate_classes
            .iter()
            .find(|r| r.name == name_or_id || r.id.to_string() == name_or_id)
    }
}

/// A CIDR or a bare address; host bits set is an error (a typo more often than intent).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = match s.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match s.parse::<std::net::IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => {
                return Err(format!(
                    "'{s}' is not an IP address or CIDR prefix (e.g. 192.0.2.0/24, 2001:db8::1)"
                ));
            }
        },
    };
    if net.trunc() != net {
        return Err(format!("'{s}' has host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

/// `90`, `30s`, `10m`, `2h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (examples: 30s, 10m, 2h, 7d)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use s, m, h or d)")),
    };
    if secs == 0 {
        return Err(format!("'{s}': must be positive"));
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::from_toml(text, Path::new("/etc/aqd/aqd.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_are_safe() {
        let c = Config::default();
        assert_eq!(c.protected_ports, vec![443]);
        assert_eq!(c.xdp_mode, AttachMode::Native);
        assert_eq!(
            c.rate_classes[0].limits,
            RateLimits::default(),
            "sources without a decision are not limited"
        );
        assert!(c.rate_class("throttle").is_some());
        assert!(!c.dry_run);
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../../packaging/aqd.toml");
        let c = Config::from_toml(text, Path::new("packaging/aqd.toml")).unwrap();
        assert!(!c.interfaces.is_empty());
    }

    #[test]
    fn bad_cidr_names_file_line_and_field() {
        let e = err("[lists]\nallow = [\"10.0.0.0/8\",\n  \"10.1.2.3/33\"]\n");
        assert!(e.starts_with("/etc/aqd/aqd.toml:3: lists.allow:"), "{e}");
        assert!(e.contains("10.1.2.3/33"), "{e}");
    }

    #[test]
    fn host_bits_suggest_the_network() {
        let e = err("[protection]\nmanagement = [\"192.0.2.5/24\"]\n");
        assert!(
            e.contains(":2: protection.management") && e.contains("192.0.2.0/24"),
            "{e}"
        );
    }

    #[test]
    fn deny_entries_covering_management_are_refused_with_their_line() {
        for entry in ["::/8", "198.19.0.0/16", "::ffff:198.19.11.1", "0.0.0.0/0"] {
            let e = err(&format!(
                "[protection]\nmanagement = [\"198.19.11.0/24\"]\n[lists]\ndeny = [\"10.0.0.0/8\",\n  \"{entry}\"]\n"
            ));
            assert!(
                e.starts_with("/etc/aqd/aqd.toml:5: lists.deny: refusing to deny"),
                "{entry}: {e}"
            );
            assert!(e.contains("management network 198.19.11.0/24"), "{entry}: {e}");
        }
        let ok = "[protection]\nmanagement = [\"198.19.11.0/24\"]\n[lists]\ndeny = [\"198.19.12.0/24\", \"::ffff:198.19.12.0/120\"]\n";
        Config::from_toml(ok, Path::new("t.toml")).unwrap();
    }

    #[test]
    fn unknown_field_is_named() {
        let e = err("[daemon]\ninterfacez = [\"eth0\"]\n");
        assert!(e.contains("interfacez") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = err("[protection]\nports = \"443\"\n");
        assert!(e.contains("ports") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn bad_duration_and_ranges() {
        assert!(err("[decisions]\ndefault_ttl = \"4 hours\"\n").contains(":2: decisions.default_ttl"));
        assert!(err("[protection]\nports = [0]\n").contains("protection.ports"));
        assert!(err("[decisions]\nttl_jitter = 0.9\n").contains("decisions.ttl_jitter"));
        assert!(err("[daemon]\nmetrics_address = \"localhost\"\n").contains("daemon.metrics_address"));
        assert!(err("[daemon]\ncontrol_max_connections = 0\n").contains("daemon.control_max_connections"));
        assert!(err("[daemon]\nmetrics_max_connections = -3\n").contains("daemon.metrics_max_connections"));
        assert!(err("[rate_classes.slow]\nid = 99\n").contains("rate_classes.slow"));
        assert!(err("[rate_classes.slow]\nid = 0\n").contains("only it"));
    }

    #[test]
    fn connection_table_timeouts_take_seconds_or_durations_and_are_validated() {
        let c = Config::default();
        assert_eq!(c.aging, crate::aging::AgingPolicy::default());
        let c = Config::from_toml(
            "[protection]\nflow_idle_timeout = 7200\nflow_fin_timeout = \"2m\"\nhalf_open_timeout = \"10s\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.aging.flow_idle, Duration::from_secs(7200));
        assert_eq!(c.aging.fin_idle, Duration::from_secs(120));
        assert_eq!(c.aging.half_open, Duration::from_secs(10));
        let e = err("[protection]\nflow_idle_timeout = 0\n");
        assert!(
            e.contains(":2: protection.flow_idle_timeout") && e.contains("positive"),
            "{e}"
        );
        let e = err("[protection]\nflow_idle_timeout = -5\n");
        assert!(e.contains(":2: protection.flow_idle_timeout"), "{e}");
        let e = err("[protection]\n\nflow_fin_timeout = \"1 minute\"\n");
        assert!(e.contains(":3: protection.flow_fin_timeout"), "{e}");
        let e = err("[protection]\nhalf_open_timeout = \"30d\"\n");
        assert!(
            e.contains("protection.half_open_timeout") && e.contains("7d"),
            "{e}"
        );
        let e = err("[protection]\nflow_idle_timeout = 1.5\n");
        assert!(e.contains("flow_idle_timeout"), "{e}");
    }

    #[test]
    fn fingerprint_rules_are_validated_with_their_line() {
        let ok = Config::from_toml(
            "[fingerprints]\np0f_db = \"\"\nescalate_after = 5\n\n[[fingerprint]]\n\
             fp = \"t13d1516h2_8daaf6152771_b186095e22b6\"\naction = \"block\"\nttl = \"1h\"\nreason = \"scraper\"\n\n\
             [[fingerprint]]\nfp = \"syn:0x1234\"\naction = \"throttle\"\nclass = \"throttle\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(ok.fingerprints.p0f_db, None);
        assert_eq!(ok.fingerprints.escalate_after, 5);
        assert_eq!(ok.fingerprint_rules.len(), 2);
        assert_eq!(ok.fingerprint_rules[0].ttl, Some(Duration::from_secs(3600)));
        assert_eq!(ok.fingerprint_rules[1].ttl, None);
        let e = err("[[fingerprint]]\nfp = \"t13d1516h2_8daaf6152771_b186095e22b6\"\naction = \"nuke\"\n");
        assert!(e.contains(":3: fingerprint.action") && e.contains("nuke"), "{e}");
        let e = err("[[fingerprint]]\nfp = \"firefox\"\naction = \"block\"\n");
        assert!(
            e.contains(":2: fingerprint.fp") && e.contains("not a fingerprint"),
            "{e}"
        );
        let e = err("[[fingerprint]]\nfp = \"hello:0x1\"\naction = \"block\"\nttl = \"soon\"\n");
        assert!(e.contains(":4: fingerprint.ttl"), "{e}");
        let e = err("[[fingerprint]]\nfp = \"hello:0x1\"\naction = \"block\"\nclass = \"throttle\"\n");
        assert!(e.contains(":4: fingerprint.class"), "{e}");
        let e = err("[[fingerprint]]\nfp = \"hello:0x1\"\naction = \"throttle\"\nclass = \"nope\"\n");
        assert!(e.contains("unknown rate class 'nope'"), "{e}");
        let e = err(
            "[[fingerprint]]\nfp = \"hello:0x1\"\naction = \"block\"\n[[fingerprint]]\nfp = \"hello:0x01\"\naction = \"allow\"\n",
        );
        assert!(e.contains(":5: fingerprint.fp") && e.contains("line 1"), "{e}");
        let e = err("[[fingerprint]]\nfp = \"hello:0x1\"\nverdict = \"block\"\n");
        assert!(e.contains("verdict"), "{e}");
        let e = err("[fingerprints]\nmax_flows = 0\n");
        assert!(e.contains(":2: fingerprints.max_flows"), "{e}");
    }

    #[test]
    fn rate_classes_by_name_or_id() {
        let c = Config::from_toml(
            "[rate_classes.default]\nid = 0\npackets_per_second = 1000\npacket_burst = 2000\n\
             [rate_classes.crawler]\nid = 2\npackets_per_second = 5\npacket_burst = 5\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.rate_class("default").unwrap().limits.packets_per_second, 1000);
        assert_eq!(c.rate_class("2").unwrap().name, "crawler");
        assert_eq!(c.rate_class("throttle").unwrap().id, 1);
    }
}
