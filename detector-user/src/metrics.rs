//! Prometheus endpoint (`GET /metrics`, OpenMetrics text via prometheus-client).
//!
//! The numbers live in the kernel maps, so each scrape builds a fresh registry from one snapshot instead of
//! keeping counters in step. The HTTP side is a minimal responder for one route: a web framework would be most
//! of the daemon's dependency tree for a single GET.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use detector_common::{Reason, event::EventKind};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::daemon::DaemonState;

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Renders the current state as OpenMetrics text.
pub fn render(state: &DaemonState) -> Result<String, String> {
    let maps = &state.enforcer.maps;
    let counters = maps.counters().map_err(|e| e.to_string())?;
    let mut registry = Registry::with_prefix("aqd");

    let packets = Family::<Labels, Counter>::default();
    for reason in Reason::ALL {
        let verdict = match reason.verdict() {
            detector_common::Verdict::Pass => "pass",
            detector_common::Verdict::Drop => "drop",
        };
        packets
            .get_or_create(&labels(&[("reason", reason.name()), ("verdict", verdict)]))
            .inc_by(counters.by_reason[reason as usize]);
    }
    registry.register(
        "packets",
        "Packets seen by the XDP program, by verdict and reason",
        packets,
    );

    let events_sent = Family::<Labels, Counter>::default();
    let events_lost = Family::<Labels, Counter>::default();
    let events_read = Family::<Labels, Counter>::default();
    for kind in [EventKind::Conn, EventKind::Drop] {
        let l = labels(&[("kind", kind.name())]);
        events_sent
            .get_or_create(&l)
            .inc_by(counters.events_sent[kind as usize]);
        events_lost
            .get_or_create(&l)
            .inc_by(counters.events_lost[kind as usize]);
        events_read
            .get_or_create(&l)
            .inc_by(state.events.read[kind as usize].load(Ordering::Relaxed));
    }
    registry.register(
        "ringbuf_events_sent",
        "Events the kernel wrote to the ring buffer",
        events_sent,
    );
    registry.register(
        "ringbuf_events_lost",
        "Events lost because the ring buffer was full",
        events_lost,
    );
    registry.register(
        "events_read",
        "Events the daemon read from the ring buffer",
        events_read,
    );

    let map_entries = Family::<Labels, Gauge>::default();
    let map_capacity = Family::<Labels, Gauge>::default();
    for (name, used, capacity) in maps.fill_levels() {
        map_entries
            .get_or_create(&labels(&[("map", name)]))
            .set(used as i64);
        map_capacity
            .get_or_create(&labels(&[("map", name)]))
            .set(capacity as i64);
    }
    registry.register("map_entries", "Entries in each kernel map", map_entries);
    registry.register("map_capacity", "Capacity of each kernel map", map_capacity);

    let decisions = Family::<Labels, Gauge>::default();
    let mut by_kind: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for d in maps.decisions().map_err(|e| e.to_string())? {
        if d.remaining_secs != Some(0) {
            *by_kind.entry((d.action, d.origin)).or_default() += 1;
        }
    }
    for ((action, origin), n) in by_kind {
        decisions
            .get_or_create(&labels(&[("action", action), ("origin", origin)]))
            .set(n);
    }
    registry.register("decisions", "Live decisions by action and origin", decisions);

    let reloads = Family::<Labels, Counter>::default();
    reloads
        .get_or_create(&labels(&[("result", "ok")]))
        .inc_by(state.reloads.ok.load(Ordering::Relaxed));
    reloads
        .get_or_create(&labels(&[("result", "failed")]))
        .inc_by(state.reloads.failed.load(Ordering::Relaxed));
    registry.register("config_reloads", "Config reloads by result", reloads);

    let mut out = String::new();
    encode(&mut out, &registry).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Serves `GET /metrics` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<Mutex<DaemonState>>) -> std::io::Result<()> {
    loop {
        let (mut stream, _) = listener.accept().await?;
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let mut head = vec![0u8; 4096];
            let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request_line = String::from_utf8_lossy(&head[..n]);
            let (status, content_type, body) = if request_line.starts_with("GET /metrics ") {
                let rendered = tokio::task::spawn_blocking(move || {
                    render(&state.lock().unwrap_or_else(|p| p.into_inner()))
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                match rendered {
                    Ok(body) => (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        body,
                    ),
                    Err(e) => ("500 Internal Server Error", "text/plain", e),
                }
            } else {
                ("404 Not Found", "text/plain", "try GET /metrics\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}
