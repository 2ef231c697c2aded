//! Human-readable renderings of the typed views (`--json` prints the view itself, as it travels).

use std::path::Path;

use detector_user::control::views::{ExplainView, FpKind, FpRow, ListView, ScoreTopView, StatusView};
use serde::Serialize;
use serde_json::Value;

/// `3h2m`, `45s`.
pub fn duration(secs: u64) -> String {
    match secs {
        s if s >= 86400 => format!("{}d{}h", s / 86400, s % 86400 / 3600),
        s if s >= 3600 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// ` for 10m0s` or ` permanently`.
pub fn for_ttl(secs: Option<u64>) -> String {
    secs.map(|s| format!(" for {}", duration(s)))
        .unwrap_or_else(|| " permanently".into())
}

fn ttl(secs: Option<u64>) -> String {
    secs.map(duration).unwrap_or_else(|| "permanent".into())
}

fn name<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "unknown".into(), |v| v.to_string())
}

/// The view as one line of JSON (`--json`).
pub fn json<T: Serialize>(view: &T) {
    println!("{}", serde_json::to_string(view).expect("views serialize"));
}

/// The view as indented JSON (`--json` for the model's views).
pub fn json_pretty<T: Serialize>(view: &T) {
    println!("{}", serde_json::to_string_pretty(view).expect("views serialize"));
}

pub fn list(view: &ListView, as_json: bool) {
    if as_json {
        return json(view);
    }
    println!("{:<6} {:<43} {:>12} {:>10}", "LIST", "TARGET", "HITS", "TTL");
    for row in &view.lists {
        let list = match row.list {
            detector_user::maps::List::Allow => "allow",
            detector_user::maps::List::Deny => "deny",
        };
        println!(
            "{list:<6} {:<43} {:>12} {:>10}",
            row.net.to_string(),
            row.hits,
            ttl(row.remaining_secs)
        );
    }
    println!();
    println!(
        "{:<9} {:<43} {:>5} {:>7} {:>12} {:>10}  REASON",
        "ACTION", "TARGET", "CLASS", "ORIGIN", "HITS", "TTL"
    );
    for d in &view.decisions {
        println!(
            "{:<9} {:<43} {:>5} {:>7} {:>12} {:>10}  {}",
            name(d.action),
            d.net.to_string(),
            d.rate_class,
            name(d.origin),
            d.hits,
            ttl(d.remaining_secs),
            d.reason
        );
    }
}

pub fn status(view: &StatusView, pin_dir: &Path, as_json: bool) {
    if as_json {
        return json(view);
    }
    match &view.daemon.details {
        Some(d) if view.daemon.running => println!(
            "daemon: running for {}, program id {}{}",
            duration(d.uptime_secs),
            d.program_id,
            if d.dry_run {
                ", DRY RUN (model decisions not enforced)"
            } else {
                ""
            }
        ),
        _ => println!("daemon: not running (the kernel keeps enforcing what is in the maps)"),
    }
    if view.pinned_state == Some(false) {
        println!(
            "pin dir: {} (nothing pinned: aqd is not loaded)",
            pin_dir.display()
        );
    } else {
        println!("pin dir: {}", pin_dir.display());
    }
    if view.attachments.is_empty() {
        println!("attached: nowhere");
    }
    for at in &view.attachments {
        println!(
            "attached: {} ({} mode, program id {})",
            at.iface, at.mode, at.program_id
        );
    }
    let Some(k) = &view.kernel else {
        return;
    };
    println!(
        "packets: {}  passed: {}  dropped: {}",
        k.packets, k.passed, k.dropped
    );
    for (name, value) in &k.reasons {
        println!("  {name:<24} {value:>14}");
    }
    for (kind, sent) in &k.events_sent {
        let lost = k.events_lost.get(kind).copied().unwrap_or(0);
        println!("events {kind:<12} sent {sent:>12}  lost {lost:>10}");
    }
    for m in &k.maps {
        println!(
            "map {:<16} {:>9} / {:<9} ({:.1}%)",
            m.name,
            m.entries,
            m.capacity,
            m.entries as f64 * 100.0 / m.capacity.max(1) as f64
        );
    }
    if let Some(ft) = &view.flow_table {
        let (f, h, a) = (&ft.flows, &ft.half_open, &ft.aging);
        println!(
            "flows: {} / {} tracked; established {}  reset {}  FIN {}  aged idle {}  aged closed {}  evicted (LRU) {}",
            f.entries, f.capacity, f.established, f.reset, f.fin, f.aged_idle, f.aged_closed, f.evicted
        );
        println!(
            "  half-open: {} / {}; SYNs {}  aged {}  evicted (LRU) ≥ {}",
            h.entries, h.capacity, h.created, h.aged, h.evicted_at_least
        );
        println!(
            "  ageing: idle flows after {}, closed after {}, half-open after {}; {} passes",
            duration(a.flow_idle_timeout_secs),
            duration(a.flow_fin_timeout_secs),
            duration(a.half_open_timeout_secs),
            a.passes
        );
    }
    if let Some(fp) = &view.fingerprints {
        println!(
            "fingerprints: {} JA4, {} SYN signatures (max {} each), {} KiB; {} verdicts",
            fp.ja4_tracked,
            fp.syn_tracked,
            fp.max_fingerprints,
            fp.memory_bytes / 1024,
            fp.verdicts
        );
        println!(
            "  JA4 computed {}  failed {}  not TLS {}  flows in progress {} (max {})  kernel key mismatches {}",
            fp.ja4_computed,
            fp.ja4_failed.values().sum::<u64>(),
            fp.not_tls,
            fp.flows_in_progress,
            fp.max_flows,
            fp.key_mismatch
        );
        let w = &fp.writes;
        println!(
            "  verdict installs {}  removals {}  flow verdicts {} (missed {})  escalations {}",
            w.verdict_installs, w.verdict_removals, w.flow_actions, w.flow_actions_missed, fp.escalations
        );
        let l = &fp.hello_to_flow_verdict_latency;
        if l.count > 0 {
            let us = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| v.to_string());
            println!(
                "  ClientHello → flow verdict: {} samples, mean {} µs, p50 ≤ {} µs, p99 ≤ {} µs, max {} µs",
                l.count,
                us(l.mean_us),
                us(l.p50_le_us),
                us(l.p99_le_us),
                us(l.max_us)
            );
        }
        match (fp.p0f_signatures, &fp.p0f_error) {
            (Some(sigs), _) => println!(
                "  p0f: {sigs} signatures from {}",
                fp.p0f_db
                    .as_deref()
                    .map_or_else(|| "-".into(), |p| p.display().to_string())
            ),
            (None, Some(e)) => println!("  p0f: unavailable ({e}); SYN signatures unlabelled"),
            (None, None) => println!("  p0f: no database configured; SYN signatures unlabelled"),
        }
    }
}

pub fn top(rows: &[Value], as_json: bool) {
    if as_json {
        return json(&rows);
    }
    println!(
        "{:<40} {:>10} {:>12} {:>9} {:>9} {:>12} {:>9}",
        "SOURCE", "PKT/S", "BYTES/S", "CONN/S", "DROP/S", "PACKETS", "DECISION"
    );
    for r in rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let text = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
        println!(
            "{:<40} {:>10.1} {:>12.0} {:>9.1} {:>9.1} {:>12} {:>9}",
            text(&r["source"]),
            f("packets_per_s"),
            f("bytes_per_s"),
            f("conns_per_s"),
            f("drops_per_s"),
            r["packets"].as_u64().unwrap_or(0),
            text(&r["decision"])
        );
    }
}

/// `aqd top --by score`.
pub fn score_top(view: &ScoreTopView, kind: &str, as_json: bool) {
    if as_json {
        return json_pretty(view);
    }
    if view.dry_run {
        println!("(dry run: the model's decisions are logged, not enforced)");
    }
    println!("{:<48} {:>8}  tier", kind, "score");
    for row in &view.rows {
        println!(
            "{:<48} {:>8.3}  {}",
            row.scope.to_string(),
            row.score,
            row.tier.map_or("-", |t| t.name())
        );
    }
}

fn ago(t: Option<u64>) -> String {
    let Some(t) = t else {
        return "-".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{} ago", duration(now.saturating_sub(t)))
}

/// `aqd fp list`.
pub fn fp_list(rows: &[FpRow], as_json: bool) {
    if as_json {
        return json(&rows);
    }
    println!(
        "{:<4} {:>8} {:>8} {:>11} {:>11}  {:<22} FINGERPRINT / DETAIL",
        "KIND", "CONNS", "SOURCES", "FIRST", "LAST", "VERDICT"
    );
    for r in rows {
        let verdict = match &r.verdict {
            None => "-".to_string(),
            Some(v) => format!("{} ({})", v.action.name(), ttl(v.expires_in_secs)),
        };
        let sources = format!("{}{}", if r.sources_estimated { "~" } else { "" }, r.sources);
        let kind = match r.kind {
            FpKind::Ja4 => "ja4",
            FpKind::Syn => "syn",
        };
        println!(
            "{kind:<4} {:>8} {:>8} {:>11} {:>11}  {:<22} {}",
            r.connections,
            sources,
            ago(r.first_seen),
            ago(r.last_seen),
            verdict,
            r.fingerprint
        );
        match r.kind {
            FpKind::Syn => println!(
                "{:>71} {}  p0f: {}",
                "",
                r.key.as_deref().unwrap_or("-"),
                r.label.as_deref().unwrap_or("?")
            ),
            FpKind::Ja4 => {
                if let Some(ja4_r) = &r.ja4_r {
                    println!("{:>71} {ja4_r}", "");
                }
                if !r.kernel_keys.is_empty() {
                    println!("{:>71} kernel keys: {}", "", r.kernel_keys.join(" "));
                }
            }
        }
        if let Some(v) = r.verdict.as_ref().filter(|v| !v.reason.is_empty()) {
            println!("{:>71} reason: {}", "", v.reason);
        }
    }
}

/// `aqd explain` as text: the score, the features by contribution, related clusters, decisions.
pub fn explain(view: &ExplainView, as_json: bool) {
    if as_json {
        return json_pretty(view);
    }
    println!("{}", view.target);
    if view.dry_run {
        println!("  (dry run: model decisions are logged, not enforced)");
    }
    match &view.model {
        None => println!("  the model holds no scores for it now"),
        Some(model) => {
            println!(
                "  score {:.3} (bias {:.2}), tier {}, strikes {}",
                model.score,
                model.bias,
                model.tier.map_or("none", |t| t.name()),
                model.strikes
            );
            if let Some(why) = &model.why_not_blocked {
                println!("  not blocked: {why}");
            }
            println!("  features (value → contribution to the log-odds):");
            for f in &model.features {
                println!(
                    "    {:<28} {:>10.3} → {:>+7.3}",
                    f.feature, f.value, f.contribution
                );
            }
            for (scope, score) in &model.related {
                println!("  related: {scope} score {score:.3}");
            }
            for h in &model.history {
                println!(
                    "  history: {}",
                    serde_json::to_string(h).expect("views serialize")
                );
            }
        }
    }
    for h in &view.decisions {
        let d = &h.decision;
        println!(
            "  decision: {} {} ttl {}s → {} ({})",
            d.action,
            d.scope,
            d.ttl.as_secs(),
            h.outcome,
            d.reason
        );
    }
}
