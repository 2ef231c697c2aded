//! Decisions → kernel maps: the single writer while the daemon runs.
//!
//! Every change (CLI, import, model, config) goes through [`Enforcer`], which
//! - refuses what would lock the operator out (management networks, allowlisted sources, prefixes shorter than
//!   the configured minimum) unless forced — and never touches a management network, forced or not (the
//!   guard is [`crate::lockout`]; its management networks are the config's and the kernel's);
//! - spreads expiries with jitter so a bulk import never expires in one second;
//! - appends every change to the audit log (JSON lines) *before* making it (write-ahead: a kill never leaves a
//!   kernel change unaudited; a change that then fails gets a following record with outcome `failed`);
//! - records every change in the state store ([`crate::store`]), from which [`Enforcer::restore_policy`] and
//!   [`Enforcer::restore_fingerprints`] put it back into fresh maps at start.

use std::{
    collections::BTreeSet,
    fs::{File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use detector_common::{
    Action, CONFIG_FLAG_CAPTURE, CONFIG_FLAG_CONN_EVENTS, CONFIG_FLAG_HANDSHAKE_ACK_ONLY,
    CONFIG_FLAG_NO_TCP_CHECKSUM, CONFIG_FLAG_PASS_TCP_FRAGMENTS, CONFIG_FLAG_REQUEST_EVENTS,
    Config as ProgramConfig, Decision, FlowTuple, Origin,
};
use ipnet::IpNet;
use thiserror::Error;

use crate::{
    clock,
    config::Config,
    fingerprint::{
        hello_key::key_of_ja4_r,
        live::{FpAction, FpTarget, FpVerdict, FpVerdicts},
    },
    lockout::{Guard, LockoutError, MinPrefix, Verb},
    maps::{ExpiredEntry, KernelMaps, List, MapsError, VerdictMap, decision_slot, rate_class_limits},
    store::{self, Remaining, Store, StoreError, StoredDecision, StoredFp, StoredListEntry, UnixMs},
};

#[derive(Debug, Error)]
pub enum EnforceError {
    /// Refused by the lockout guard (management, allowlist overlap, minimum prefix).
    #[error(transparent)]
    Lockout(#[from] LockoutError),
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
            Self::Lockout(_) | Self::UnknownClass(_) | Self::Fingerprint(_)
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
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
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
    pub origin: Origin,
    pub target: String,
    /// block, throttle, monitor, unblock, allow, disallow, deny, undeny.
    pub action: String,
    /// Seconds; None = permanent or not applicable.
    pub ttl: Option<u64>,
    pub reason: String,
    /// None: the change, written before it is made. Otherwise what became of it (see [`AuditOutcome`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<AuditOutcome>,
}

/// What a record says beyond "this change is being made".
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditOutcome {
    /// The change announced by the previous record for this target did not happen (the reason says why).
    Failed,
    /// Put back from the state store at start (after a reboot or into maps of a new layout), with the TTL left.
    Restored,
}

impl AuditRecord {
    /// This record's change did not happen, because of `why`.
    fn failed(&self, why: &dyn std::fmt::Display) -> Self {
        Self {
            time: now_secs(),
            origin: self.origin,
            target: self.target.clone(),
            action: self.action.clone(),
            ttl: self.ttl,
            reason: why.to_string(),
            outcome: Some(AuditOutcome::Failed),
        }
    }

    fn restored(mut self) -> Self {
        self.outcome = Some(AuditOutcome::Restored);
        self
    }
}

/// What [`Enforcer::restore_policy`] / [`Enforcer::restore_fingerprints`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestoreReport {
    pub decisions: usize,
    pub list_entries: usize,
    pub fingerprints: usize,
    /// Already in the kernel (a restart over kept pins): left as they are.
    pub already_present: usize,
    /// Expired while the daemon was down: dropped.
    pub expired: usize,
    /// Refused by the lockout guard under the current config (a management network added meanwhile, …).
    pub refused: usize,
    /// Rejected by the kernel maps (a hand-edited or future record: host bits, an unknown rate class): logged,
    /// audited as failed and skipped, so one bad record never keeps the daemon from starting.
    pub failed: usize,
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

    /// Opens the file at the same path again (after logrotate moved it away); on error the old file is kept.
    pub fn reopen(&mut self) -> Result<(), EnforceError> {
        if self.file.is_none() {
            return Ok(());
        }
        *self = Self::open(&self.path)?;
        Ok(())
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

/// The single writer of the policy maps: decisions, list entries, management networks, ports, rate classes,
/// program settings and verdicts by fingerprint, for every origin (CLI, socket, config, list files, imports,
/// the model, the fingerprint stage, the fleet). Others read the maps through [`Enforcer::maps`].
pub struct Enforcer {
    maps: KernelMaps,
    audit: AuditLog,
    config: Config,
    /// Verdicts by fingerprint (the daemon's table; the kernel holds them by key).
    pub fp: FpVerdicts,
    pub fp_stats: FpWriteStats,
    /// Durable state (None: not kept, e.g. in tests without a state directory).
    store: Option<Store>,
    /// What the last restore did.
    pub restored: RestoreReport,
    /// Source of jitter: a cheap xorshift, reseeded from the clock (no need for cryptographic randomness).
    jitter_state: u64,
    /// The lockout guard: the config's management networks and those the kernel holds.
    guard: Guard,
}

impl Enforcer {
    pub fn new(maps: KernelMaps, audit: AuditLog, config: Config) -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        let guard = guard_for(&maps, &config);
        Self {
            maps,
            audit,
            config,
            fp: FpVerdicts::default(),
            fp_stats: FpWriteStats::default(),
            store: None,
            restored: RestoreReport::default(),
            jitter_state: seed,
            guard,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The maps, to read (counters, lists, decisions); every write goes through the enforcer.
    pub fn maps(&self) -> &KernelMaps {
        &self.maps
    }

    pub fn set_config(&mut self, config: Config) {
        self.guard = guard_for(&self.maps, &config);
        self.config = config;
    }

    /// The lockout guard every change passes (also the fleet's hook: [`Guard::admit_remote`]).
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// Keeps every change from now on in `store`.
    pub fn set_store(&mut self, store: Store) {
        self.store = Some(store);
    }

    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    pub fn store_mut(&mut self) -> Option<&mut Store> {
        self.store.as_mut()
    }

    /// Reopens the audit log (SIGHUP, `aqd reload`: logrotate moved it).
    pub fn reopen_audit(&mut self) -> Result<(), EnforceError> {
        self.audit.reopen()
    }

    /// Records a change in the store. A store failure never undoes the change: it applies now, and the warning
    /// says it would not survive a restart (counted in the store's `write_errors`).
    fn persist(&mut self, what: &str, write: impl FnOnce(&mut Store) -> Result<(), StoreError>) {
        if let Some(store) = self.store.as_mut()
            && let Err(e) = write(store)
        {
            tracing::warn!("{e}; the {what} applies now but is not kept across a restart");
        }
    }

    fn stored_decision(
        request: &DecisionRequest,
        d: &Decision,
        ttl: Option<Duration>,
        now: UnixMs,
    ) -> StoredDecision {
        StoredDecision {
            target: request.target,
            action: request.action,
            rate_class: d.rate_class,
            reason: request.reason.clone(),
            origin: request.origin,
            force: request.force,
            set_unix_ms: now,
            expires_unix_ms: store::expiry_after(ttl, now),
        }
    }

    /// Appends the "did not happen" record after a write-ahead record whose change failed.
    fn audit_failed(&mut self, records: &[AuditRecord], why: &dyn std::fmt::Display) {
        let failed: Vec<AuditRecord> = records.iter().map(|r| r.failed(why)).collect();
        if let Err(e) = self.audit.append_all(&failed) {
            tracing::warn!("{e}: could not mark {} audited change(s) as failed", failed.len());
        }
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
            self.check_lockout_with(request.target, request.action.into(), request.force, &allowlist)
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
        let records: Vec<AuditRecord> = requests
            .iter()
            .zip(&batch)
            .map(|(request, (_, _, ttl))| {
                let action = request.action.name();
                record(request.origin, request.target, action, *ttl, &request.reason)
            })
            .collect();
        self.audit.append_all(&records).map_err(|e| (0, e))?;
        if let Err(e) = self.maps.decision_put_many(&entries) {
            self.audit_failed(&records, &e);
            return Err((0, e.into()));
        }
        let made: Vec<(&DecisionRequest, Decision, Option<Duration>)> = requests
            .iter()
            .zip(&batch)
            .map(|(r, (_, d, ttl))| (r, *d, *ttl))
            .collect();
        self.persist_decisions(&made);
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
        let action = request.action.name();
        self.check_lockout_with(request.target, request.action.into(), request.force, allowlist)?;
        let code = self.maps.reason_code(&request.reason)?;
        let (decision, ttl) = self.decision_for(request, code)?;
        let rec = record(request.origin, request.target, action, ttl, &request.reason);
        self.audit.append(&rec)?;
        if let Err(e) = self.maps.decision_put(request.target, decision) {
            self.audit_failed(&[rec], &e);
            return Err(e.into());
        }
        self.persist_decisions(&[(request, decision, ttl)]);
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
        let rec = record(origin, target, "unblock", None, reason);
        self.audit.append(&rec)?;
        let removed = self.maps.decision_remove(target);
        match &removed {
            Ok(true) => {}
            Ok(false) => self.audit_failed(&[rec], &"no such decision"),
            Err(e) => self.audit_failed(&[rec], e),
        }
        let removed = removed?;
        if decision_slot(target).is_some() {
            self.persist("removal", |s| s.remove_decision(target));
        } else {
            // A block on another prefix length lives in the denylist (`KernelMaps::decision_put`): so does its record.
            self.persist("removal", |s| s.remove_list_entry(List::Deny, target));
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
            self.check_lockout_with(target, Verb::Deny, force, &allowlist)?;
        }
        let ttl = ttl.map(|t| self.jittered(t));
        let rec = record(origin, target, verb, ttl, "");
        self.audit.append(&rec)?;
        if let Err(e) = self.maps.list_insert(list, target, ttl) {
            self.audit_failed(&[rec], &e);
            return Err(e.into());
        }
        self.persist_list_adds(list, &[(target, ttl)], origin, force);
        Ok(())
    }

    /// Keeps decisions where the kernel keeps them: a block on a prefix that is not a decision scope is a
    /// denylist entry there (`KernelMaps::decision_put`), so it is stored as one, and `undeny` removes both.
    fn persist_decisions(&mut self, made: &[(&DecisionRequest, Decision, Option<Duration>)]) {
        let now = store::now_unix_ms();
        let mut decisions = Vec::with_capacity(made.len());
        for (request, decision, ttl) in made {
            if decision_slot(request.target).is_some() {
                decisions.push(Self::stored_decision(request, decision, *ttl, now));
            } else {
                self.persist_list_adds(
                    List::Deny,
                    &[(request.target, *ttl)],
                    request.origin,
                    request.force,
                );
            }
        }
        if !decisions.is_empty() {
            self.persist("decision", |s| s.put_decisions(decisions));
        }
    }

    /// Keeps operator list entries (the config's own come back from the config).
    fn persist_list_adds(
        &mut self,
        list: List,
        added: &[(IpNet, Option<Duration>)],
        origin: Origin,
        force: bool,
    ) {
        if origin == Origin::Config {
            return;
        }
        let now = store::now_unix_ms();
        let entries = added
            .iter()
            .map(|(target, ttl)| StoredListEntry {
                list,
                target: *target,
                origin,
                force,
                set_unix_ms: now,
                expires_unix_ms: store::expiry_after(*ttl, now),
            })
            .collect();
        self.persist("list entry", |s| s.put_list_entries(entries));
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
                self.check_lockout_with(*target, Verb::Deny, force, &allowlist)
                    .map_err(|e| (i, e))?;
            }
        }
        let added: Vec<(IpNet, Option<Duration>)> = targets
            .iter()
            .map(|t| (*t, ttl.map(|t| self.jittered(t))))
            .collect();
        let records: Vec<AuditRecord> = added
            .iter()
            .map(|(target, ttl)| record(origin, *target, verb, *ttl, ""))
            .collect();
        self.audit.append_all(&records).map_err(|e| (0, e))?;
        for (i, (target, ttl)) in added.iter().enumerate() {
            if let Err(e) = self.maps.list_insert(list, *target, *ttl) {
                self.audit_failed(&records[i..], &e);
                self.persist_list_adds(list, &added[..i], origin, force);
                return Err((i, e.into()));
            }
        }
        self.persist_list_adds(list, &added, origin, force);
        Ok(targets.len())
    }

    /// Applies the config's kernel settings and lists: management networks, protected ports, rate classes,
    /// program settings, and the config's allow/deny entries (`previous` → `wanted`, as (allowlist?, network)).
    /// New management networks are written first, so they hold before any list changes; dropped ones are removed
    /// only once every step that can fail has succeeded (a failed reload keeps them). List changes are audited
    /// before they are written (write-ahead, like every other change). The config is the enforcer's from then on.
    pub fn apply_config(
        &mut self,
        config: &Config,
        previous: &BTreeSet<(bool, IpNet)>,
        wanted: &BTreeSet<(bool, IpNet)>,
    ) -> Result<(), EnforceError> {
        let maps = &mut self.maps;
        maps.management_add(&config.management)?;
        maps.set_protected_ports(&config.protected_ports)?;
        for class in 0..detector_common::capacity::RATE_CLASSES {
            let limits = match config.rate_classes.iter().find(|r| r.id as u32 == class) {
                Some(r) => rate_class_limits(
                    r.limits.packets_per_second,
                    r.limits.packet_burst,
                    r.limits.connections_per_second,
                    r.limits.connection_burst,
                ),
                None => detector_common::RateClass::UNLIMITED,
            };
            maps.set_rate_class(class, limits)?;
        }
        maps.set_config(program_config(config))?;
        let removed: Vec<(bool, IpNet)> = previous.difference(wanted).copied().collect();
        let added: Vec<(bool, IpNet)> = wanted.difference(previous).copied().collect();
        self.audit_config_lists(&added, &removed)?;
        let list = |allow: bool| if allow { List::Allow } else { List::Deny };
        for (allow, net) in &removed {
            self.maps.list_remove(list(*allow), *net)?;
        }
        for (allow, net) in wanted {
            self.maps.list_insert(list(*allow), *net, None)?;
        }
        self.maps.management_sync(&config.management)?;
        self.set_config(config.clone());
        Ok(())
    }

    /// Removes one entry the purger found expired, if it still is (a refreshed entry stays).
    pub fn purge_if_expired(&mut self, entry: &ExpiredEntry, now_ns: u64) -> Result<bool, EnforceError> {
        Ok(self.maps.remove_if_expired(entry, now_ns)?)
    }

    /// Records list changes made from the config file; `added` and `removed` are (allowlist?, network).
    fn audit_config_lists(
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

    /// Removes from a list. Removing a management network from the allowlist is refused: it is held in the
    /// kernel's own map, changed only through `protection.management`.
    pub fn list_remove(&mut self, list: List, target: IpNet, origin: Origin) -> Result<bool, EnforceError> {
        if list == List::Allow {
            self.guard.check_disallow(target)?;
        }
        let verb = match list {
            List::Allow => "disallow",
            List::Deny => "undeny",
        };
        let rec = record(origin, target, verb, None, "");
        self.audit.append(&rec)?;
        let removed = self.maps.list_remove(list, target);
        match &removed {
            Ok(true) => {}
            Ok(false) => self.audit_failed(&[rec], &"not in that list"),
            Err(e) => self.audit_failed(&[rec], e),
        }
        let removed = removed?;
        self.persist("list removal", |s| s.remove_list_entry(list, target));
        Ok(removed)
    }

    /// The lockout guard ([`crate::lockout`]). Management networks are absolute; the allowlist and minimum
    /// prefix yield to `force`.
    pub fn check_lockout_with(
        &self,
        target: IpNet,
        verb: Verb,
        force: bool,
        allowlist: &[IpNet],
    ) -> Result<(), EnforceError> {
        let min = MinPrefix {
            v4: self.config.min_block_prefix_v4,
            v6: self.config.min_block_prefix_v6,
        };
        Ok(self.guard.check(verb, target, force, allowlist, min)?)
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
            origin: request.origin,
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
        let rec = fp_record(request.origin, &id, request.action.name(), ttl, &verdict.reason);
        self.audit.append(&rec)?;
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
        for (i, &(map, key)) in touched.iter().enumerate() {
            if let Err(e) = self.fp_sync_key(map, key) {
                self.audit_failed(&[rec], &e);
                // The change failed: the previous verdict stands, in the table, the kernel keys already
                // written (best effort) and the store, so a restart does not bring the failed one back.
                match previous {
                    Some(p) => self.fp.by_id.insert(id.clone(), p),
                    None => self.fp.by_id.remove(&id),
                };
                for &(map, key) in &touched[..i] {
                    let _ = self.fp_sync_key(map, key);
                }
                self.fp_persist(&id);
                return Err(e);
            }
        }
        self.fp_persist(&id);
        Ok(verdict)
    }

    /// Removes a verdict by fingerprint (its id, see `FpTarget::id`); `Ok(None)` if there was none.
    pub fn fp_remove(&mut self, id: &str, origin: Origin) -> Result<Option<FpVerdict>, EnforceError> {
        let Some(old) = self.fp.by_id.get(id).cloned() else {
            return Ok(None);
        };
        let rec = fp_record(origin, id, "unblock", None, &old.reason);
        self.audit.append(&rec)?;
        self.fp.by_id.remove(id);
        let synced = self.fp_resync(&old);
        if let Err(e) = &synced {
            self.audit_failed(&[rec], e);
        }
        self.fp_persist(id);
        synced?;
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
        self.fp_persist(&id);
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
            self.fp_persist(&v.id);
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
                    origin: v.origin as u8,
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

    /// Keeps the verdict `id` as the table has it now (or its removal), with a wall-clock expiry.
    fn fp_persist(&mut self, id: &str) {
        let now = store::now_unix_ms();
        let stored = self.fp.by_id.get(id).map(|v| StoredFp {
            verdict: v.clone(),
            expires_unix_ms: clock::remaining(v.expires_ns)
                .map(|left| store::expiry_after(Some(left), now).unwrap_or(now)),
        });
        self.persist("fingerprint verdict", |s| match stored {
            Some(f) => s.put_fp(f),
            None => s.remove_fp(id),
        });
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

    // ---- restore from the state store (daemon start) ----

    /// Puts the stored list edits and decisions back into the kernel, each with the TTL it had left (expired ones
    /// dropped and counted). Management networks are checked against the current config (a network made
    /// management meanwhile is never blocked again); the allowlist and minimum-prefix guards are not: they
    /// judged these entries when they were made, and the state they were part of is what comes back (a /24
    /// decision made before an allowlist entry inside it, for instance). Entries the kernel already holds
    /// (a restart over kept pins) are left alone; the rest are audited (outcome `restored`) before they are
    /// written. Call after the config's lists are in.
    pub fn restore_policy(&mut self) -> Result<RestoreReport, EnforceError> {
        let mut report = RestoreReport::default();
        let Some(store) = &self.store else {
            return Ok(report);
        };
        let state = store.state().clone();
        let now = store::now_unix_ms();
        let mono = clock::monotonic_ns();
        let kernel_expiry = |expires: Option<UnixMs>| match store::remaining(expires, now) {
            Remaining::Permanent => Some((0, None)),
            Remaining::Left(left) => Some((mono.saturating_add(left.as_nanos() as u64).max(1), Some(left))),
            Remaining::Expired => None,
        };

        // List entries, the allowlist first.
        for list in [List::Allow, List::Deny] {
            let present: std::collections::HashSet<IpNet> =
                self.maps.list_entries(list)?.into_iter().map(|e| e.net).collect();
            let (verb, entries) = match list {
                List::Allow => ("allow", &state.allow),
                List::Deny => ("deny", &state.deny),
            };
            let mut records = Vec::new();
            let mut writes = Vec::new();
            for e in entries.values() {
                let Some((expires_ns, left)) = kernel_expiry(e.expires_unix_ms) else {
                    report.expired += 1;
                    continue;
                };
                if present.contains(&e.target) {
                    report.already_present += 1;
                    continue;
                }
                if list == List::Deny
                    && let Err(refusal) =
                        self.check_lockout_with(e.target, crate::lockout::Verb::Deny, true, &[])
                {
                    tracing::warn!("not restoring a denylist entry: {refusal}");
                    report.refused += 1;
                    continue;
                }
                records.push(record(e.origin, e.target, verb, left, "").restored());
                writes.push((e.target, expires_ns));
            }
            self.audit.append_all(&records)?;
            for (i, (target, expires_ns)) in writes.iter().enumerate() {
                match self.maps.list_put(list, *target, *expires_ns) {
                    Ok(()) => report.list_entries += 1,
                    Err(e) => {
                        tracing::warn!("not restoring list entry {target}: {e}");
                        self.audit_failed(&records[i..=i], &e);
                        report.failed += 1;
                    }
                }
            }
        }

        // Decisions.
        let present: std::collections::HashSet<IpNet> =
            self.maps.decisions()?.into_iter().map(|d| d.net).collect();
        let mut records = Vec::new();
        let mut batch = Vec::new();
        for d in state.decisions.values() {
            let Some((expires_ns, left)) = kernel_expiry(d.expires_unix_ms) else {
                report.expired += 1;
                continue;
            };
            if present.contains(&d.target) {
                report.already_present += 1;
                continue;
            }
            let action = d.action.name();
            if let Err(refusal) =
                self.check_lockout_with(d.target, crate::lockout::Verb::from(d.action), true, &[])
            {
                tracing::warn!("not restoring a decision: {refusal}");
                report.refused += 1;
                continue;
            }
            let reason = self.maps.reason_code(&d.reason)?;
            records.push(record(d.origin, d.target, action, left, &d.reason).restored());
            batch.push((
                d.target,
                Decision {
                    expires_ns,
                    hits: 0,
                    action: d.action as u8,
                    rate_class: d.rate_class,
                    reason,
                    origin: d.origin as u8,
                    _pad: [0; 3],
                },
            ));
        }
        self.audit.append_all(&records)?;
        report.decisions = batch.len();
        if !batch.is_empty() && self.maps.decision_put_many(&batch).is_err() {
            // One bad record fails the batch: write them one by one, skipping (and counting) the bad ones.
            for (i, (target, decision)) in batch.iter().enumerate() {
                if let Err(e) = self.maps.decision_put(*target, *decision) {
                    tracing::warn!("not restoring the decision on {target}: {e}");
                    self.audit_failed(&records[i..=i], &e);
                    report.decisions -= 1;
                    report.failed += 1;
                }
            }
        }
        self.restored = RestoreReport {
            fingerprints: self.restored.fingerprints,
            expired: self.restored.expired + report.expired,
            ..report
        };
        Ok(report)
    }

    /// Puts the stored verdicts by fingerprint back into the daemon's table with the time they had left (the
    /// kernel keys follow with [`Self::fp_reinstall_all`]). Call before the config's fingerprint rules, so an
    /// unchanged rule keeps its expiry.
    pub fn restore_fingerprints(&mut self) -> Result<RestoreReport, EnforceError> {
        let mut report = RestoreReport::default();
        let Some(store) = &self.store else {
            return Ok(report);
        };
        let stored: Vec<StoredFp> = store.state().fingerprints.values().cloned().collect();
        let now = store::now_unix_ms();
        let mono = clock::monotonic_ns();
        let mut records = Vec::new();
        for f in stored {
            let (expires_ns, left) = match store::remaining(f.expires_unix_ms, now) {
                Remaining::Permanent => (0, None),
                Remaining::Left(left) => (mono.saturating_add(left.as_nanos() as u64).max(1), Some(left)),
                Remaining::Expired => {
                    report.expired += 1;
                    continue;
                }
            };
            if self.fp.by_id.contains_key(&f.verdict.id) {
                report.already_present += 1;
                continue;
            }
            let origin = f.verdict.origin;
            records.push(
                fp_record(
                    origin,
                    &f.verdict.id,
                    f.verdict.action.name(),
                    left,
                    &f.verdict.reason,
                )
                .restored(),
            );
            self.fp.by_id.insert(
                f.verdict.id.clone(),
                FpVerdict {
                    expires_ns,
                    ..f.verdict
                },
            );
            report.fingerprints += 1;
        }
        // Written before the kernel keys are (fp_reinstall_all follows).
        self.audit.append_all(&records)?;
        self.restored.fingerprints = report.fingerprints;
        self.restored.expired += report.expired;
        Ok(report)
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn record(origin: Origin, target: IpNet, action: &str, ttl: Option<Duration>, reason: &str) -> AuditRecord {
    fp_record(origin, &target.to_string(), action, ttl, reason)
}

fn fp_record(origin: Origin, id: &str, action: &str, ttl: Option<Duration>, reason: &str) -> AuditRecord {
    AuditRecord {
        time: now_secs(),
        origin,
        target: id.to_string(),
        action: action.to_string(),
        ttl: ttl.map(|t| t.as_secs()),
        reason: reason.to_string(),
        outcome: None,
    }
}

/// The guard for `config`'s management networks and those the kernel already holds (pinned by a daemon that
/// may have been started with another config: the offline CLI must protect them too).
fn guard_for(maps: &KernelMaps, config: &Config) -> Guard {
    let kernel = maps.management_entries().unwrap_or_else(|e| {
        tracing::warn!("reading the kernel's management networks: {e}; guarding the config's only");
        Vec::new()
    });
    Guard::new(config.management.iter().copied().chain(kernel))
}

/// The program's settings from the config: event kinds, fragment and checksum policy.
fn program_config(config: &Config) -> ProgramConfig {
    let flag = |on: bool, flag: u32| if on { flag } else { 0 };
    ProgramConfig {
        drop_sample_every: config.drop_sample_every,
        flags: CONFIG_FLAG_CONN_EVENTS
            | CONFIG_FLAG_CAPTURE
            | CONFIG_FLAG_REQUEST_EVENTS
            | flag(config.pass_tcp_fragments, CONFIG_FLAG_PASS_TCP_FRAGMENTS)
            | flag(!config.verify_tcp_checksums, CONFIG_FLAG_NO_TCP_CHECKSUM)
            | flag(config.handshake_ack_only, CONFIG_FLAG_HANDSHAKE_ACK_ONLY),
        test_now_ns: 0,
        request_gap_ns: 0,
    }
}
