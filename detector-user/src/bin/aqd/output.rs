//! Human-readable renderings of the JSON views (the `--json` output is the view itself).

use std::path::Path;

use detector_user::maps::List;
use serde_json::Value;

pub fn list_name(list: List) -> &'static str {
    match list {
        List::Allow => "allowlist",
        List::Deny => "denylist",
    }
}

/// `3h2m`, `45s`.
pub fn duration(secs: u64) -> String {
    match secs {
        s if s >= 86400 => format!("{}d{}h", s / 86400, s % 86400 / 3600),
        s if s >= 3600 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn ttl(v: &Value) -> String {
    v.as_u64().map(duration).unwrap_or_else(|| "permanent".into())
}

fn text(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
}

pub fn list(view: &Value, json: bool) {
    if json {
        println!("{view}");
        return;
    }
    let empty = Vec::new();
    let lists = view["lists"].as_array().unwrap_or(&empty);
    let decisions = view["decisions"].as_array().unwrap_or(&empty);
    println!("{:<6} {:<43} {:>12} {:>10}", "LIST", "TARGET", "HITS", "TTL");
    for row in lists {
        let hits = row["hits"].as_u64().unwrap_or(0);
        println!(
            "{:<6} {:<43} {hits:>12} {:>10}",
            text(&row["list"]),
            text(&row["net"]),
            ttl(&row["remaining_secs"])
        );
    }
    println!();
    println!(
        "{:<9} {:<43} {:>5} {:>7} {:>12} {:>10}  REASON",
        "ACTION", "TARGET", "CLASS", "ORIGIN", "HITS", "TTL"
    );
    for d in decisions {
        println!(
            "{:<9} {:<43} {:>5} {:>7} {:>12} {:>10}  {}",
            text(&d["action"]),
            text(&d["net"]),
            d["rate_class"].as_u64().unwrap_or(0),
            text(&d["origin"]),
            d["hits"].as_u64().unwrap_or(0),
            ttl(&d["remaining_secs"]),
            text(&d["reason"])
        );
    }
}

pub fn status(view: &Value, pin_dir: &Path, json: bool) {
    if json {
        println!("{view}");
        return;
    }
    let daemon = &view["daemon"];
    if daemon["running"].as_bool() == Some(true) {
        println!(
            "daemon: running for {}, program id {}{}",
            duration(daemon["uptime_secs"].as_u64().unwrap_or(0)),
            daemon["program_id"],
            if daemon["dry_run"].as_bool() == Some(true) {
                ", DRY RUN (model decisions not enforced)"
            } else {
                ""
            }
        );
    } else {
        println!("daemon: not running (the kernel keeps enforcing what is in the maps)");
    }
    if view["pinned_state"].as_bool() == Some(false) {
        println!(
            "pin dir: {} (nothing pinned: aqd is not loaded)",
            pin_dir.display()
        );
    } else {
        println!("pin dir: {}", pin_dir.display());
    }
    match view["attachments"].as_array() {
        Some(a) if !a.is_empty() => {
            for at in a {
                println!(
                    "attached: {} ({} mode, program id {})",
                    text(&at["iface"]),
                    text(&at["mode"]),
                    at["program_id"]
                );
            }
        }
        _ => println!("attached: nowhere"),
    }
    if view.get("packets").is_none() {
        return;
    }
    println!(
        "packets: {}  passed: {}  dropped: {}",
        view["packets"], view["passed"], view["dropped"]
    );
    if let Some(reasons) = view["reasons"].as_object() {
        for (name, value) in reasons {
            println!("  {name:<24} {:>14}", value.as_u64().unwrap_or(0));
        }
    }
    if let (Some(sent), Some(lost)) = (view["events_sent"].as_object(), view["events_lost"].as_object()) {
        for (kind, n) in sent {
            let lost = lost.get(kind).and_then(Value::as_u64).unwrap_or(0);
            println!(
                "events {kind:<12} sent {:>12}  lost {lost:>10}",
                n.as_u64().unwrap_or(0)
            );
        }
    }
    if let Some(maps) = view["maps"].as_array() {
        for m in maps {
            let (used, cap) = (
                m["entries"].as_u64().unwrap_or(0),
                m["capacity"].as_u64().unwrap_or(1),
            );
            println!(
                "map {:<16} {used:>9} / {cap:<9} ({:.1}%)",
                text(&m["name"]),
                used as f64 * 100.0 / cap as f64
            );
        }
    }
    let ft = &view["flow_table"];
    if ft.is_object() {
        let (f, h, a) = (&ft["flows"], &ft["half_open"], &ft["aging"]);
        let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
        println!(
            "flows: {} / {} tracked; established {}  reset {}  FIN {}  aged idle {}  aged closed {}  evicted (LRU) {}",
            n(f, "entries"),
            n(f, "capacity"),
            n(f, "established"),
            n(f, "reset"),
            n(f, "fin"),
            n(f, "aged_idle"),
            n(f, "aged_closed"),
            n(f, "evicted")
        );
        println!(
            "  half-open: {} / {}; SYNs {}  aged {}  evicted (LRU) ≥ {}",
            n(h, "entries"),
            n(h, "capacity"),
            n(h, "created"),
            n(h, "aged"),
            n(h, "evicted_at_least")
        );
        println!(
            "  ageing: idle flows after {}, closed after {}, half-open after {}; {} passes",
            duration(n(a, "flow_idle_timeout_secs")),
            duration(n(a, "flow_fin_timeout_secs")),
            duration(n(a, "half_open_timeout_secs")),
            n(a, "passes")
        );
    }
    let fp = &view["fingerprints"];
    if fp.is_object() {
        let n = |k: &str| fp[k].as_u64().unwrap_or(0);
        let failed: u64 = fp["ja4_failed"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        println!(
            "fingerprints: {} JA4, {} SYN signatures (max {} each), {} KiB; {} verdicts",
            n("ja4_tracked"),
            n("syn_tracked"),
            n("max_fingerprints"),
            n("memory_bytes") / 1024,
            n("verdicts")
        );
        println!(
            "  JA4 computed {}  failed {}  not TLS {}  flows in progress {} (max {})  kernel key mismatches {}",
            n("ja4_computed"),
            failed,
            n("not_tls"),
            n("flows_in_progress"),
            n("max_flows"),
            n("key_mismatch")
        );
        let w = &fp["writes"];
        println!(
            "  verdict installs {}  removals {}  flow verdicts {} (missed {})  escalations {}",
            w["verdict_installs"].as_u64().unwrap_or(0),
            w["verdict_removals"].as_u64().unwrap_or(0),
            w["flow_actions"].as_u64().unwrap_or(0),
            w["flow_actions_missed"].as_u64().unwrap_or(0),
            n("escalations")
        );
        let l = &fp["hello_to_flow_verdict_latency"];
        if l["count"].as_u64().unwrap_or(0) > 0 {
            println!(
                "  ClientHello → flow verdict: {} samples, mean {} µs, p50 ≤ {} µs, p99 ≤ {} µs, max {} µs",
                l["count"], l["mean_us"], l["p50_le_us"], l["p99_le_us"], l["max_us"]
            );
        }
        match (fp["p0f_signatures"].as_u64(), fp["p0f_error"].as_str()) {
            (Some(sigs), _) => println!("  p0f: {sigs} signatures from {}", text(&fp["p0f_db"])),
            (None, Some(e)) => println!("  p0f: unavailable ({e}); SYN signatures unlabelled"),
            (None, None) => println!("  p0f: no database configured; SYN signatures unlabelled"),
        }
    }
}

pub fn top(rows: &[Value], json: bool) {
    if json {
        println!("{}", Value::from(rows.to_vec()));
        return;
    }
    println!(
        "{:<40} {:>10} {:>12} {:>9} {:>9} {:>12} {:>9}",
        "SOURCE", "PKT/S", "BYTES/S", "CONN/S", "DROP/S", "PACKETS", "DECISION"
    );
    for r in rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
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

fn ago(v: &Value) -> String {
    let Some(t) = v.as_u64() else {
        return "-".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{} ago", duration(now.saturating_sub(t)))
}

/// `aqd fp list`.
pub fn fp_list(rows: &Value, json: bool) {
    if json {
        println!("{rows}");
        return;
    }
    let empty = Vec::new();
    let rows = rows.as_array().unwrap_or(&empty);
    println!(
        "{:<4} {:>8} {:>8} {:>11} {:>11}  {:<22} FINGERPRINT / DETAIL",
        "KIND", "CONNS", "SOURCES", "FIRST", "LAST", "VERDICT"
    );
    for r in rows {
        let verdict = match &r["verdict"] {
            Value::Null => "-".to_string(),
            v => {
                let left = v["expires_in_secs"]
                    .as_u64()
                    .map(duration)
                    .unwrap_or_else(|| "permanent".into());
                format!("{} ({left})", text(&v["action"]))
            }
        };
        let sources = format!(
            "{}{}",
            if r["sources_estimated"].as_bool() == Some(true) {
                "~"
            } else {
                ""
            },
            r["sources"].as_u64().unwrap_or(0)
        );
        println!(
            "{:<4} {:>8} {:>8} {:>11} {:>11}  {:<22} {}",
            text(&r["kind"]),
            r["connections"].as_u64().unwrap_or(0),
            sources,
            ago(&r["first_seen"]),
            ago(&r["last_seen"]),
            verdict,
            text(&r["fingerprint"])
        );
        if r["kind"] == "syn" {
            let label = r["label"].as_str().unwrap_or("?");
            println!("{:>71} {}  p0f: {label}", "", text(&r["key"]));
        } else {
            if let Some(ja4_r) = r["ja4_r"].as_str() {
                println!("{:>71} {ja4_r}", "");
            }
            let keys: Vec<String> = r["kernel_keys"]
                .as_array()
                .map(|k| k.iter().map(text).collect())
                .unwrap_or_default();
            if !keys.is_empty() {
                println!("{:>71} kernel keys: {}", "", keys.join(" "));
            }
        }
        if let Some(reason) = r["verdict"]["reason"].as_str().filter(|s| !s.is_empty()) {
            println!("{:>71} reason: {reason}", "");
        }
    }
}

/// `aqd explain` as text: the score, the features by contribution, related clusters, decisions.
pub fn explain(reply: &Value) {
    println!("{}", reply["target"].as_str().unwrap_or(""));
    if reply["dry_run"].as_bool() == Some(true) {
        println!("  (dry run: model decisions are logged, not enforced)");
    }
    let model = &reply["model"];
    if model.is_null() {
        println!("  the model holds no scores for it now");
    } else {
        println!(
            "  score {:.3} (bias {:.2}), tier {}, strikes {}",
            model["score"].as_f64().unwrap_or(0.0),
            model["bias"].as_f64().unwrap_or(0.0),
            model["tier"].as_str().unwrap_or("none"),
            model["strikes"].as_u64().unwrap_or(0)
        );
        if let Some(why) = model["why_not_blocked"].as_str() {
            println!("  not blocked: {why}");
        }
        println!("  features (value → contribution to the log-odds):");
        for f in model["features"].as_array().into_iter().flatten() {
            println!(
                "    {:<28} {:>10.3} → {:>+7.3}",
                f["feature"].as_str().unwrap_or("?"),
                f["value"].as_f64().unwrap_or(0.0),
                f["contribution"].as_f64().unwrap_or(0.0)
            );
        }
        for r in model["related"].as_array().into_iter().flatten() {
            println!("  related: {} score {:.3}", r[0], r[1].as_f64().unwrap_or(0.0));
        }
        for h in model["history"].as_array().into_iter().flatten() {
            println!("  history: {h}");
        }
    }
    for d in reply["decisions"].as_array().into_iter().flatten() {
        println!(
            "  decision: {} {} ttl {}s → {} ({})",
            d["decision"]["action"].as_str().unwrap_or("?"),
            d["decision"]["scope"]["value"],
            d["decision"]["ttl"]["secs"].as_u64().unwrap_or(0),
            d["outcome"].as_str().unwrap_or("?"),
            d["decision"]["reason"].as_str().unwrap_or("")
        );
    }
}
