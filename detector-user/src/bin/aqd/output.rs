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
