//! Decisions → kernel maps: the single writer while the daemon runs.
//!
//! Every change (CLI, import, model, config) goes through [`Enforcer`], which
//! - refuses what would lock the operator out (management networks, allowlisted sources, prefixes shorter than
//!   the configured minimum) unless forced — and never blocks a management network, forced or not;
//! - spreads expiries with jitter so a bulk import never expires in one second;
//! - appends every change to the audit log (JSON lines).

use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use detector_common::{Action, Decision, FlowTuple, Origin};
use ipnet::IpNet;
use thiserror::Error;

use crate::{
    clock,
    config::Config,
    fingerprint::{
        hello_key::key_of_ja4_r,
        live::{FpAction, FpTarget, FpVerdict, FpVerdicts},
    },
    maps::{KernelMaps, List, MapsError, VerdictMap, action_name, origin_name},
};

#[derive(Debug, Error)]
pub enum EnforceError {
    #[error(
        "refusing to {action} {target}: it overlaps the management network {network}, which is never blocked"
    )]
    Management {
        action: &'static str,
        target: IpNet,
        network: IpNet,
    },
    #[error(
        "refusing to {action} {target}: it overlaps the allowlist entry {entry}; remove that first or use --force"
    )]
    Allowlisted {
        action: &'static str,
        target: IpNet,
        entry: IpNet,
    },
    #[error(
        "refusing to {action} {target}: prefixes shorter than /{min} need --force (this one covers {count} addresses)"
    )]
    TooBroad {
        action: &'static str,
        target: IpNet,
        min: u8,
        count: String,
    },
    #[error("unknown rate class '{0}' (see the rate_classes section of the config)")]
    UnknownClass(String),
    #[error("{0}")]
    Fingerprint(String),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("audit log {path}: {source}")]
    Audit {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl EnforceError {
    /// Whether the request was refused as given (vs. a failure applying it).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::Management { .. }
                | Self::Allowlisted { .. }
                | Self::TooBroad { .. }
                | Self::UnknownClass(_)
                | Self::Fingerprint(_)
        ) || matches!(
            self,
            Self::Maps(
                MapsError::HostBits { .. } | MapsError::DecisionScope { .. } | MapsError::RateClass { .. }
            )
        )
    }
}

/// A decision to apply.
#[derive(Clone, Debug)]
pub struct DecisionRequest {
    pub target: IpNet,
    pub action: Action,
    /// Rate class name or id (throttle only); default "throttle".
    pub class: Option<String>,
    /// None = the configured default TTL; Some(ZERO) is not allowed (permanent = `permanent: true`).
    pub ttl: Option<Duration>,
    pub permanent: bool,
    pub reason: String,
    pub origin: Origin,
    pub force: bool,
}

/// A verdict by fingerprint to apply.
#[derive(Clone, Debug)]
pub struct FpRequest {
    pub target: FpTarget,
    pub action: FpAction,
    /// Rate class name or id (throttle only); default "throttle".
    pub class: Option<String>,
    /// None = the configured default TTL.
    pub ttl: Option<Duration>,
    pub permanent: bool,
    pub reason: String,
    pub origin: Origin,
    /// Kernel ClientHello keys already known for a JA4 (from traffic).
    pub known_keys: Vec<u64>,
    /// For config verdicts: the rule as written.
    pub config_rule: Option<String>,
}

/// Fingerprint-verdict counters of the writer (status and metrics).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct FpWriteStats {
    /// Writes of a verdict into SYN_VERDICTS / HELLO_VERDICTS.
    pub verdict_installs: u64,
    /// Removals from those maps.
    pub verdict_removals: u64,
    /// Flows given a fingerprint action in FLOWS by the daemon.
    pub flow_actions: u64,
    /// Flows that had already ended (or been evicted) when the daemon came to act on them.
    pub flow_actions_missed: u64,
}

/// One line of the audit log.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AuditRecord {
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub origin: String,
    pub target: String,
    /// block, throttle, monitor, unblock, allow, disallow, deny, undeny.
    pub action: String,
    /// Seconds; None = permanent or not applicable.
    pub ttl: Option<u64>,
    pub reason: String,
}

/// Appends JSON lines; opened once, flushed per record.
pub struct AuditLog {
    path: PathBuf,
    file: Option<File>,
}

impl AuditLog {
    /// Opens (creating directories) the audit log for appending.
    pub fn open(path: &Path) -> Result<Self, EnforceError> {
        let err = |source| EnforceError::Audit {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Some(file),
        })
    }

    /// An audit log that records nothing (tests, dry tools).
    pub fn disabled() -> Self {
        Self {
            path: PathBuf::new(),
            file: None,
        }
    }

    pub fn append(&mut self, record: &AuditRecord) -> Result<(), EnforceError> {
        self.append_all(std::slice::from_ref(record))
    }

    /// Appends many records with one write.
    pub fn append_all(&mut self, records: &[AuditRecord]) -> Result<(), EnforceError> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let mut lines = Vec::with_capacity(records.len() * 128);
        for record in records {
            serde_json::to_writer(&mut lines, record).expect("audit records serialize");
            lines.push(b'\n');
        }
        file.write_all(&lines).map_err(|source| EnforceError::Audit {
            path: self.path.clone(),
            source,
        })
    }
}

/// The single writer of decisions and list entries.
pub struct Enforcer {
    pub maps: KernelMaps,
    audit: AuditLog,
    config: Config,
    /// Verdicts by fingerprint (the daemon's table; the kernel holds them by key).
    pub fp: FpVerdicts,
    pub fp_stats: FpWriteStats,
    /// Source of jitter: a cheap xorshift, reseeded from the clock (no need for cryptographic randomness).
    jitter_state: u64,
}

impl Enforcer {
    pub fn new(maps: KernelMaps, audit: AuditLog, config: Config) -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        Self {
            maps,
            audit,
            config,
            fp: FpVerdicts::default(),
            fp_stats: FpWriteStats::default(),
            jitter_state: seed,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn set_config(&mut self, config: Config) {
        self.config = config;
    }

    /// Applies a decision after the lockout checks.
    pub fn decide(&mut self, request: &DecisionRequest) -> Result<Option<Duration>, EnforceError> {
        let allowlist = self.allowlist_overlapping(request.target)?;
        self.decide_with(request, &allowlist)
    }

    /// The allowlist entries that can overlap `target`: for a single address, two lookups (exact, longest
    /// prefix) instead of walking the lists (a walk costs ~150 µs even on an empty hash map).
    fn allowlist_overlapping(&self, target: IpNet) -> Result<Vec<IpNet>, EnforceError> {
        if target.prefix_len() == target.max_prefix_len() {
            return Ok(self.maps.allow_covering(target.addr())?.into_iter().collect());
        }
        self.allowlist()
    }

    /// Applies many decisions with one allowlist snapshot; stops at the first refusal or failure and says
    /// which entry it was. Returns how many were applied.
    pub fn decide_many(&mut self, requests: &[DecisionRequest]) -> Result<usize, (usize, EnforceError)> {
        let allowlist = self.allowlist().map_err(|e| (0, e))?;
        for (i, request) in requests.iter().enumerate() {
            self.check_lockout_with(
                request.target,
                action_name(Some(request.action)),
                request.force,
                &allowlist,
            )
            .map_err(|e| (i, e))?;
        }
        let mut batch = Vec::with_capacity(requests.len());
        // One table lookup per distinct reason, not per entry (an import has one reason for all).
        let mut codes: std::collections::HashMap<&str, u16> = std::collections::HashMap::new();
        for (i, request) in requests.iter().enumerate() {
            let code = match codes.get(request.reason.as_str()) {
                Some(c) => *c,
                None => {
                    let c = self
                        .maps
                        .reason_code(&request.reason)
                        .map_err(|e| (i, e.into()))?;
                    codes.insert(&request.reason, c);
                    c
                }
            };
            let (decision, ttl) = self.decision_for(request, code).map_err(|e| (i, e))?;
            batch.push((request.target, decision, ttl));
        }
        let entries: Vec<(IpNet, Decision)> = batch.iter().map(|(net, d, _)| (*net, *d)).collect();
        self.maps.decision_put_many(&entries).map_err(|e| (0, e.into()))?;
        let records: Vec<AuditRecord> = requests
            .iter()
            .zip(&batch)
            .map(|(request, (_, _, ttl))| {
                let action = action_name(Some(request.action));
                record(request.origin, request.target, action, *ttl, &request.reason)
            })
            .collect();
        self.audit.append_all(&records).map_err(|e| (0, e))?;
        Ok(requests.len())
    }

    /// The current allowlist (exact and prefix entries).
    pub fn allowlist(&self) -> Result<Vec<IpNet>, EnforceError> {
        Ok(self
            .maps
            .list_entries(List::Allow)?
            .into_iter()
            .map(|e| e.net)
            .collect())
    }

    fn decide_with(
        &mut self,
        request: &DecisionRequest,
        allowlist: &[IpNet],
    ) -> Result<Option<Duration>, EnforceError> {
        let action = action_name(Some(request.action));
        self.check_lockout_with(request.target, action, request.force, allowlist)?;
        let code = self.maps.reason_code(&request.reason)?;
        let (decision, ttl) = self.decision_for(request, code)?;
        self.maps.decision_put(request.target, decision)?;
        self.audit(request.origin, request.target, action, ttl, &request.reason)?;
        Ok(ttl)
    }

    /// The kernel value for a request: rate class resolved, TTL defaulted and jittered, reason code given.
    fn decision_for(
        &mut self,
        request: &DecisionRequest,
        reason_code: u16,
    ) -> Result<(Decision, Option<Duration>), EnforceError> {
        let rate_class = match request.action {
            Action::Throttle => {
                let name = request.class.as_deref().unwrap_or("throttle");
                self.config
                    .rate_class(name)
                    .ok_or_else(|| EnforceError::UnknownClass(name.to_string()))?
                    .id
            }
            _ => 0,
        };
        let ttl = if request.permanent {
            None
        } else {
            Some(self.jittered(request.ttl.unwrap_or(self.config.default_ttl)))
        };
        let decision = Decision {
            expires_ns: clock::expiry_from_ttl(ttl),
            hits: 0,
            action: request.action as u8,
            rate_class,
            reason: reason_code,
            origin: request.origin as u8,
            _pad: [0; 3],
        };
        Ok((decision, ttl))
    }

    /// Removes the decision on `target`; `Ok(false)` if there was none.
    pub fn remove_decision(
        &mut self,
        target: IpNet,
        origin: Origin,
        reason: &str,
    ) -> Result<bool, EnforceError> {
        let removed = self.maps.decision_remove(target)?;
        if removed {
            self.audit(origin, target, "unblock", None, reason)?;
        }
        Ok(removed)
    }

    /// Adds to the allowlist or denylist. Denying is subject to the same lockout checks as blocking.
    pub fn list_add(
        &mut self,
        list: List,
        target: IpNet,
        ttl: Option<Duration>,
        origin: Origin,
        force: bool,
    ) -> Result<(), EnforceError> {
        let verb = match list {
            List::Allow => "allow",
            List::Deny => "deny",
        };
        if list == List::Deny {
            let allowlist = self.allowlist_overlapping(target)?;
            self.check_lockout_with(target, verb, force, &allowlist)?;
        }
        let ttl = ttl.map(|t| self.jittered(t));
        self.maps.list_insert(list, target, ttl)?;
        self.audit(origin, target, verb, ttl, "")
    }

    /// Adds many entries to a list with one allowlist snapshot: every entry is checked before any is written
    /// (all or nothing, like [`Self::decide_many`]); one audit write. Returns how many were added.
    pub fn list_add_many(
        &mut self,
        list: List,
        targets: &[IpNet],
        ttl: Option<Duration>,
        origin: Origin,
        force: bool,
    ) -> Result<usize, (usize, EnforceError)> {
        let verb = match list {
            List::Allow => "allow",
            List::Deny => "deny",
        };
        if list == List::Deny {
            let allowlist = self.allowlist().map_err(|e| (0, e))?;
            for (i, target) in targets.iter().enumerate() {
                self.check_lockout_with(*target, verb, force, &allowlist)
                    .map_err(|e| (i, e))?;
            }
        }
        let mut records = Vec::with_capacity(targets.len());
        for (i, target) in targets.iter().enumerate() {
            let ttl = ttl.map(|t| self.jittered(t));
            self.maps
                .list_insert(list, *target, ttl)
                .map_err(|e| (i, e.into()))?;
            records.push(record(origin, *target, verb, ttl, ""));
        }
        self.audit.append_all(&records).map_err(|e| (0, e))?;
        Ok(targets.len())
    }

    /// Records list changes made from the config file (which writes the maps itself, to apply a whole file
    /// at once); `added` and `removed` are (allowlist?, network).
    pub fn audit_config_lists(
        &mut self,
        added: &[(bool, IpNet)],
        removed: &[(bool, IpNet)],
    ) -> Result<(), EnforceError> {
        let verb = |allow: bool, add: bool| match (allow, add) {
            (true, true) => "allow",
            (false, true) => "deny",
            (true, false) => "disallow",
            (false, false) => "undeny",
        };
        let records: Vec<AuditRecord> = added
            .iter()
            .map(|(allow, net)| record(Origin::Config, *net, verb(*allow, true), None, "config"))
            .chain(
                removed
                    .iter()
                    .map(|(allow, net)| record(Origin::Config, *net, verb(*allow, false), None, "config")),
            )
            .collect();
        self.audit.append_all(&records)
    }

    pub fn list_remove(&mut self, list: List, target: IpNet, origin: Origin) -> Result<bool, EnforceError> {
        let removed = self.maps.list_remove(list, target)?;
        if removed {
            let verb = match list {
                List::Allow => "disallow",
                List::Deny => "undeny",
            };
            self.audit(origin, target, verb, None, "")?;
        }
        Ok(removed)
    }

    /// The lockout guard. Management networks are absolute; the allowlist and minimum prefix yield to `force`.
    pub fn check_lockout_with(
        &self,
        target: IpNet,
        action: &'static str,
        force: bool,
        allowlist: &[IpNet],
    ) -> Result<(), EnforceError> {
        if let Some(network) = self.config.management.iter().find(|m| overlaps(**m, target)) {
            return Err(EnforceError::Management {
                action,
                target,
                network: *network,
            });
        }
        if force {
            return Ok(());
        }
        if let Some(entry) = allowlist.iter().find(|e| overlaps(**e, target)) {
            return Err(EnforceError::Allowlisted {
                action,
                target,
                entry: *entry,
            });
        }
        let (len, min, bits) = match target {
            IpNet::V4(n) => (n.prefix_len(), self.config.min_block_prefix_v4, 32),
            IpNet::V6(n) => (n.prefix_len(), self.config.min_block_prefix_v6, 128),
        };
        if len < min {
            let count = match bits - len {
                s if s >= 64 => format!("2^{s}"),
                s => (1u64 << s).to_string(),
            };
            return Err(EnforceError::TooBroad {
                action,
                target,
                min,
                count,
            });
        }
        Ok(())
    }

    // ---- verdicts by fingerprint ----

    /// Sets a verdict by fingerprint: the daemon's table, then the kernel under every key it covers (a JA4:
    /// every kernel ClientHello key known for it, from traffic or from its JA4_r), the file, the audit log.
    pub fn fp_set(&mut self, request: &FpRequest) -> Result<FpVerdict, EnforceError> {
        let id = request.target.id();
        let rate_class = match request.action {
            FpAction::Throttle => {
                let name = request.class.as_deref().unwrap_or("throttle");
                self.config
                    .rate_class(name)
                    .ok_or_else(|| EnforceError::UnknownClass(name.to_string()))?
                    .id
            }
            _ => {
                if request.class.is_some() {
                    return Err(EnforceError::Fingerprint(
                        "--class only applies to throttle".into(),
                    ));
                }
                0
            }
        };
        let ttl = if request.permanent {
            None
        } else {
            Some(request.ttl.unwrap_or(self.config.default_ttl))
        };
        let previous = self.fp.by_id.get(&id).cloned();
        let mut verdict = FpVerdict {
            id: id.clone(),
            action: request.action,
            rate_class,
            expires_ns: clock::expiry_from_ttl(ttl),
            reason: request.reason.trim().to_string(),
            origin: origin_name(Some(request.origin)).to_string(),
            set_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            ja4_r: None,
            syn_text: None,
            hello_keys: Default::default(),
            config_rule: request.config_rule.clone(),
        };
        match &request.target {
            FpTarget::Ja4 { ja4_r, .. } => {
                verdict.ja4_r = ja4_r
                    .clone()
                    .or_else(|| previous.as_ref().and_then(|p| p.ja4_r.clone()));
                verdict
                    .hello_keys
                    .extend(request.known_keys.iter().filter(|k| **k != 0));
                if let Some(r) = &verdict.ja4_r {
                    let key = key_of_ja4_r(r).map_err(|e| EnforceError::Fingerprint(e.to_string()))?;
                    verdict.hello_keys.insert(key);
                }
                if let Some(p) = &previous {
                    verdict.hello_keys.extend(p.hello_keys.iter().copied());
                }
            }
            FpTarget::Syn { text, .. } => {
                verdict.syn_text = text
                    .clone()
                    .or_else(|| previous.as_ref().and_then(|p| p.syn_text.clone()));
            }
            FpTarget::Hello { key } => {
                verdict.hello_keys.insert(*key);
            }
        }
        self.fp.by_id.insert(id.clone(), verdict.clone());
        let mut touched: Vec<(VerdictMap, u64)> = Vec::new();
        for v in [Some(&verdict), previous.as_ref()].into_iter().flatten() {
            if let Some(k) = v.syn_key() {
                touched.push((VerdictMap::Syn, k));
            }
            touched.extend(v.hello_keys.iter().map(|k| (VerdictMap::Hello, *k)));
        }
        touched.sort_unstable();
        touched.dedup();
        for (map, key) in touched {
            self.fp_sync_key(map, key)?;
        }
        self.fp_save();
        self.audit.append(&fp_record(
            request.origin,
            &id,
            request.action.name(),
            ttl,
            &verdict.reason,
        ))?;
        Ok(verdict)
    }

    /// Removes a verdict by fingerprint (its id, see `FpTarget::id`); `Ok(None)` if there was none.
    pub fn fp_remove(&mut self, id: &str, origin: Origin) -> Result<Option<FpVerdict>, EnforceError> {
        let Some(old) = self.fp.by_id.remove(id) else {
            return Ok(None);
        };
        self.fp_resync(&old)?;
        self.fp_save();
        self.audit
            .append(&fp_record(origin, id, "unblock", None, &old.reason))?;
        Ok(Some(old))
    }

    /// A kernel ClientHello key learned for a JA4 (from traffic): installed at once under the JA4's live
    /// verdict, if it has one and does not cover the key yet. Returns whether it was installed.
    pub fn fp_learn_key(&mut self, ja4: &str, key: u64) -> Result<bool, EnforceError> {
        if key == 0 {
            return Ok(false);
        }
        let now = clock::monotonic_ns();
        let id = format!("ja4:{ja4}");
        match self.fp.by_id.get_mut(&id) {
            Some(v) if v.live(now) && !v.hello_keys.contains(&key) => {
                if v.hello_keys.len() >= 64 {
                    return Ok(false);
                }
                v.hello_keys.insert(key);
            }
            _ => return Ok(false),
        }
        self.fp_sync_key(VerdictMap::Hello, key)?;
        self.fp_save();
        tracing::info!(
            ja4,
            key = format_args!("{key:#018x}"),
            "installed a fingerprint verdict under a new ClientHello key"
        );
        Ok(true)
    }

    /// Gives one tracked flow a fingerprint action (Block drops the rest of it). `Ok(false)` when the flow is
    /// no longer tracked by the kernel.
    pub fn fp_flow_action(
        &mut self,
        flow: &FlowTuple,
        action: Action,
        rate_class: u8,
    ) -> Result<bool, EnforceError> {
        let done = self.maps.flow_set_action(flow, action, rate_class)?;
        if done {
            self.fp_stats.flow_actions += 1;
        } else {
            self.fp_stats.flow_actions_missed += 1;
        }
        Ok(done)
    }

    /// Writes every key of the table again (daemon start: the pinned maps may have been recreated).
    pub fn fp_reinstall_all(&mut self) -> Result<usize, EnforceError> {
        let mut keys: Vec<(VerdictMap, u64)> = Vec::new();
        for v in self.fp.by_id.values() {
            if let Some(k) = v.syn_key() {
                keys.push((VerdictMap::Syn, k));
            }
            keys.extend(v.hello_keys.iter().map(|k| (VerdictMap::Hello, *k)));
        }
        keys.sort_unstable();
        keys.dedup();
        for &(map, key) in &keys {
            self.fp_sync_key(map, key)?;
        }
        Ok(keys.len())
    }

    /// Drops expired verdicts from the table (the kernel already ignores them; `purge_expired` frees their
    /// map slots).
    pub fn fp_purge_expired(&mut self) -> Result<usize, EnforceError> {
        let removed = self.fp.purge_expired(clock::monotonic_ns());
        for v in &removed {
            self.fp_resync(v)?;
        }
        if !removed.is_empty() {
            self.fp_save();
        }
        Ok(removed.len())
    }

    fn fp_resync(&mut self, old: &FpVerdict) -> Result<(), EnforceError> {
        if let Some(k) = old.syn_key() {
            self.fp_sync_key(VerdictMap::Syn, k)?;
        }
        for k in old.hello_keys.clone() {
            self.fp_sync_key(VerdictMap::Hello, k)?;
        }
        Ok(())
    }

    /// Makes the kernel hold what the table says for one key (see `FpVerdicts::desired`).
    fn fp_sync_key(&mut self, map: VerdictMap, key: u64) -> Result<(), EnforceError> {
        let now = clock::monotonic_ns();
        let desired = self
            .fp
            .desired(map == VerdictMap::Syn, key, now)
            .and_then(|v| v.action.kernel().map(|a| (a, v.clone())));
        match desired {
            Some((action, v)) => {
                let reason = self.maps.reason_code(&v.reason)?;
                let decision = Decision {
                    expires_ns: v.expires_ns,
                    hits: 0,
                    action: action as u8,
                    rate_class: v.rate_class,
                    reason,
                    origin: Origin::from_u8(match v.origin.as_str() {
                        "config" => Origin::Config as u8,
                        "model" => Origin::Model as u8,
                        _ => Origin::Cli as u8,
                    })
                    .unwrap_or(Origin::Cli) as u8,
                    _pad: [0; 3],
                };
                self.maps.verdict_put(map, key, decision)?;
                self.fp_stats.verdict_installs += 1;
            }
            None => {
                if self.maps.verdict_remove(map, key)? {
                    self.fp_stats.verdict_removals += 1;
                }
            }
        }
        Ok(())
    }

    fn fp_save(&self) {
        if let Err(e) = self.fp.save() {
            tracing::warn!("saving the fingerprint verdicts: {e}; they apply until the daemon restarts");
        }
    }

    fn jittered(&mut self, ttl: Duration) -> Duration {
        let spread = self.config.ttl_jitter;
        if spread <= 0.0 {
            return ttl;
        }
        // xorshift64*: enough to spread expiries; not a security boundary.
        self.jitter_state ^= self.jitter_state >> 12;
        self.jitter_state ^= self.jitter_state << 25;
        self.jitter_state ^= self.jitter_state >> 27;
        let unit = (self.jitter_state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        ttl.mul_f64(1.0 - spread * unit).max(Duration::from_secs(1))
    }

    fn audit(
        &mut self,
        origin: Origin,
        target: IpNet,
        action: &str,
        ttl: Option<Duration>,
        reason: &str,
    ) -> Result<(), EnforceError> {
        self.audit.append(&record(origin, target, action, ttl, reason))
    }
}

fn record(origin: Origin, target: IpNet, action: &str, ttl: Option<Duration>, reason: &str) -> AuditRecord {
    AuditRecord {
        time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
        origin: origin_name(Some(origin)).to_string(),
        target: target.to_string(),
        action: action.to_string(),
        ttl: ttl.map(|t| t.as_secs()),
        reason: reason.to_string(),
    }
}

fn fp_record(origin: Origin, id: &str, action: &str, ttl: Option<Duration>, reason: &str) -> AuditRecord {
    AuditRecord {
        time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
        origin: origin_name(Some(origin)).to_string(),
        target: id.to_string(),
        action: action.to_string(),
        ttl: ttl.map(|t| t.as_secs()),
        reason: reason.to_string(),
    }
}

/// Whether two networks share any address (one contains the other).
pub fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_symmetric_and_family_aware() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        assert!(overlaps(n("10.0.0.0/8"), n("10.1.2.3/32")));
        assert!(overlaps(n("10.1.2.3/32"), n("10.0.0.0/8")));
        assert!(!overlaps(n("10.0.0.0/8"), n("11.0.0.0/8")));
        assert!(!overlaps(n("::ffff:10.0.0.0/104"), n("10.0.0.0/8")));
    }
}
