//! Config → kernel: a reload re-reads the file and applies it (settings and lists through the enforcer, the
//! single writer), the config's fingerprint rules, and the record of the config's list entries.

use super::*;

/// The config's list entries as the previous daemon left them (empty if none or unreadable: then a
/// removed entry lingers until the operator removes it, which `list` shows).
pub(super) fn load_config_entries(path: &std::path::Path) -> BTreeSet<(bool, IpNet)> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Writes the config's list entries atomically (temp file + rename).
pub(super) fn save_config_entries(
    path: &std::path::Path,
    entries: &BTreeSet<(bool, IpNet)>,
) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(entries)?)?;
    std::fs::rename(&tmp, path).with_context(|| format!("saving {}", path.display()))?;
    Ok(())
}

impl DaemonState {
    /// Re-reads the config file; on any error the running config stays. The audit log is reopened first
    /// (logrotate's SIGHUP), whatever the config holds.
    pub fn reload(&mut self) -> anyhow::Result<()> {
        if let Err(e) = self.enforcer.reopen_audit() {
            tracing::error!("reopening the audit log: {e}; still writing to the old file");
        }
        let result = resolve_config(self.config_path.as_deref(), &self.overrides).and_then(|new| {
            let old = self.enforcer.config().clone();
            for (what, changed) in [
                ("interfaces", new.interfaces != old.interfaces),
                ("xdp_mode", new.xdp_mode != old.xdp_mode),
                ("pin_root", new.pin_root != old.pin_root),
                ("socket", new.socket != old.socket),
                ("state_dir", new.state_dir != old.state_dir),
                ("metrics_address", new.metrics_address != old.metrics_address),
                (
                    "control_max_connections",
                    new.control_max_connections != old.control_max_connections,
                ),
                (
                    "metrics_max_connections",
                    new.metrics_max_connections != old.metrics_max_connections,
                ),
            ] {
                if changed {
                    tracing::warn!("daemon.{what} changed; it takes effect at the next restart");
                }
            }
            self.apply_config(&new)
        });
        match &result {
            Ok(()) => {
                self.reloads.ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!("config reloaded");
            }
            Err(_) => {
                self.reloads.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// Writes ports, rate classes, program settings and the config's lists into the kernel. Validates all list
    /// files before changing anything, so a bad file leaves the running state untouched.
    pub(super) fn apply_config(&mut self, config: &Config) -> anyhow::Result<()> {
        let mut wanted: BTreeSet<(bool, IpNet)> = BTreeSet::new();
        for net in &config.allow {
            wanted.insert((true, *net));
        }
        // `lists.deny` was checked against the management networks when the config was parsed.
        for net in &config.deny {
            wanted.insert((false, *net));
        }
        let files = config
            .list_file_entries()
            .map_err(|m| ControlError::new(ErrorKind::BadRequest, m))?;
        wanted.extend(files);
        // Management networks live in their own map, which the kernel checks before any other rule and which
        // `allow`/`disallow` never touch; the enforcer writes them, the settings and the lists (see
        // `Enforcer::apply_config`).
        self.enforcer
            .apply_config(config, &self.config_entries, &wanted)?;
        self.config_entries = wanted;
        save_config_entries(&self.config_entries_path, &self.config_entries)?;
        self.aging.set_policy(config.aging);
        self.live.configure(&config.fingerprints);
        self.apply_fingerprint_rules(config)?;
        Ok(())
    }

    /// The config's `[[fingerprint]]` rules: new or changed ones are set (origin config), unchanged ones keep
    /// their expiry, and config verdicts no longer in the file are removed. Verdicts made from the CLI on
    /// other fingerprints are untouched.
    pub(super) fn apply_fingerprint_rules(&mut self, config: &Config) -> anyhow::Result<()> {
        let mut wanted = BTreeSet::new();
        for rule in &config.fingerprint_rules {
            let target = parse_fp(&rule.fp, |t| self.live.known_syn(t))
                .map_err(|m| ControlError::new(ErrorKind::BadRequest, m))?;
            let id = target.id();
            wanted.insert(id.clone());
            let canonical = rule.canonical();
            if self.enforcer.fp.by_id.get(&id).is_some_and(|v| {
                v.origin == Origin::Config && v.config_rule.as_deref() == Some(canonical.as_str())
            }) {
                continue;
            }
            let known_keys = self.known_keys(&target);
            self.enforcer
                .fp_set(&FpRequest {
                    target,
                    action: rule.action,
                    class: rule.class.clone(),
                    ttl: rule.ttl,
                    permanent: rule.ttl.is_none(),
                    reason: if rule.reason.is_empty() {
                        "config".into()
                    } else {
                        rule.reason.clone()
                    },
                    origin: Origin::Config,
                    known_keys,
                    config_rule: Some(canonical),
                })
                .with_context(|| format!("fingerprint rule {}", rule.fp))?;
        }
        let stale: Vec<String> = self
            .enforcer
            .fp
            .by_id
            .values()
            .filter(|v| v.origin == Origin::Config && !wanted.contains(&v.id))
            .map(|v| v.id.clone())
            .collect();
        for id in stale {
            self.enforcer.fp_remove(&id, Origin::Config)?;
        }
        Ok(())
    }
}
