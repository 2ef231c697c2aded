//! Kernel events → model observations.
//!
//! The kernel reports a connection's SYN (with its signature key), its first client bytes (the ClientHello),
//! one event per request (a burst of client payload after an idle gap) and the flow's end. The model wants
//! per-connection observations keyed by a fingerprint (JA4 + SYN signature). This stage keeps a small record
//! per live flow — source, SYN key, JA4 once the fingerprint stage has it, whether it is TLS — and turns
//! events into [`Observation`]s. The TLS handshake's own bursts (the ClientHello and the client's Finished)
//! are not requests and are left out.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::IpAddr,
    sync::Arc,
};

use crate::{
    events::{Event, Flow, FlowActivity},
    model::{FingerprintId, FpKey, Model, Observation},
};

/// Flows remembered at most (the kernel's `FLOWS` map holds as many); beyond, the oldest are forgotten.
pub const DEFAULT_MAX_FLOWS: usize = detector_common::capacity::FLOWS as usize;
/// Client bursts of a TLS connection that are handshake, not requests: the ClientHello and the Finished.
const TLS_HANDSHAKE_BURSTS: u32 = 2;
/// The client's second flight in TLS 1.3 (ChangeCipherSpec + Finished, ~80 bytes; more with a client
/// certificate) is often sent together with the first request: a second burst larger than this carries one,
/// and counts as a request of its size less this much.
const TLS_CLIENT_FINISHED_MAX: u64 = 160;

#[derive(Clone, Debug)]
struct FlowRecord {
    src: IpAddr,
    syn_key: u64,
    ja4: Option<Arc<str>>,
    fp: FpKey,
    tls: bool,
    last_ns: u64,
}

/// Counters for `aqd status` and metrics.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct FeedStats {
    pub observations: u64,
    /// Requests or flow ends for flows whose SYN was never seen (started before the daemon, or forgotten).
    pub unknown_flows: u64,
    pub handshake_bursts_skipped: u64,
    pub flows_forgotten: u64,
}

/// The events → observations stage.
pub struct ObservationFeed {
    flows: HashMap<u64, FlowRecord>,
    max_flows: usize,
    stats: FeedStats,
}

/// The flow's identity as the model sees it: a hash of its addresses and ports.
pub fn flow_id(flow: &Flow) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    flow.src.hash(&mut h);
    flow.dst.hash(&mut h);
    flow.src_port.hash(&mut h);
    flow.dst_port.hash(&mut h);
    h.finish()
}

impl Default for ObservationFeed {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FLOWS)
    }
}

impl ObservationFeed {
    pub fn new(max_flows: usize) -> Self {
        Self {
            flows: HashMap::new(),
            max_flows: max_flows.max(1),
            stats: FeedStats::default(),
        }
    }

    pub fn stats(&self) -> FeedStats {
        self.stats
    }

    pub fn tracked_flows(&self) -> usize {
        self.flows.len()
    }

    /// The fingerprint stage computed the JA4 of `flow`'s ClientHello: later observations carry it.
    pub fn set_ja4(&mut self, model: &mut Model, flow: &Flow, ja4: Arc<str>) {
        if let Some(record) = self.flows.get_mut(&flow_id(flow)) {
            record.fp = model.intern(FingerprintId {
                ja4: Some(ja4.clone()),
                syn_key: record.syn_key,
            });
            record.ja4 = Some(ja4);
            record.tls = true;
        }
    }

    /// Feeds one kernel event to the model (events that say nothing about requests are ignored).
    pub fn on_event(&mut self, model: &mut Model, event: &Event) {
        match event {
            // A SYN proves nothing about its source (anyone can forge one): connections count from their
            // verified handshake on. SYN statistics stay in the fingerprint stage.
            Event::Conn { .. } => {}
            Event::Established(FlowActivity {
                time_ns,
                flow,
                syn_key,
                ..
            }) => {
                self.make_room(*time_ns);
                let fp = model.intern(FingerprintId {
                    ja4: None,
                    syn_key: *syn_key,
                });
                let id = flow_id(flow);
                self.flows.insert(
                    id,
                    FlowRecord {
                        src: flow.src,
                        syn_key: *syn_key,
                        ja4: None,
                        fp,
                        tls: false,
                        last_ns: *time_ns,
                    },
                );
                self.emit(
                    model,
                    Observation::ConnOpen {
                        time_ns: *time_ns,
                        src: flow.src,
                        flow: id,
                        fp,
                    },
                );
            }
            Event::Payload {
                flow,
                stream_offset,
                data,
                ..
            } => {
                // A TLS record (handshake, TLS 1.x) at the start of the stream.
                if *stream_offset == 0
                    && data.len() >= 2
                    && data[0] == 0x16
                    && data[1] == 0x03
                    && let Some(record) = self.flows.get_mut(&flow_id(flow))
                {
                    record.tls = true;
                }
            }
            Event::Request(activity) => self.on_request(model, activity),
            Event::FlowEnd(activity) => {
                let id = flow_id(&activity.flow);
                let Some(record) = self.flows.remove(&id) else {
                    self.stats.unknown_flows += 1;
                    return;
                };
                let handshake = if record.tls { TLS_HANDSHAKE_BURSTS } else { 0 };
                self.emit(
                    model,
                    Observation::ConnClose {
                        time_ns: activity.end_ns.max(activity.time_ns),
                        src: record.src,
                        flow: id,
                        fp: record.fp,
                        requests: activity.requests.saturating_sub(handshake),
                        client_bytes: activity.bytes,
                        server_bytes_est: activity.response_bytes,
                    },
                );
            }
            Event::Drop { .. } => {}
        }
    }

    fn on_request(&mut self, model: &mut Model, activity: &FlowActivity) {
        let id = flow_id(&activity.flow);
        let Some(record) = self.flows.get_mut(&id) else {
            self.stats.unknown_flows += 1;
            return;
        };
        record.last_ns = activity.end_ns;
        let mut bytes = activity.bytes;
        if record.tls && activity.requests <= TLS_HANDSHAKE_BURSTS {
            // The ClientHello never is a request; the second flight is one only when it carries more than the
            // handshake's end (a client sending its request right after Finished, as curl does).
            if activity.requests < TLS_HANDSHAKE_BURSTS || bytes <= TLS_CLIENT_FINISHED_MAX {
                self.stats.handshake_bursts_skipped += 1;
                return;
            }
            bytes -= TLS_CLIENT_FINISHED_MAX / 2;
        }
        let observation = Observation::Request {
            time_ns: activity.start_ns,
            src: record.src,
            flow: id,
            fp: record.fp,
            bytes: bytes.min(u32::MAX as u64) as u32,
            packets: activity.packets.min(u16::MAX as u32) as u16,
        };
        self.emit(model, observation);
    }

    fn emit(&mut self, model: &mut Model, observation: Observation) {
        self.stats.observations += 1;
        model.observe(&observation);
    }

    /// Keeps the table bounded: when full, forgets flows idle for a minute, else the oldest half.
    fn make_room(&mut self, now_ns: u64) {
        if self.flows.len() < self.max_flows {
            return;
        }
        let before = self.flows.len();
        let idle_cut = now_ns.saturating_sub(60_000_000_000);
        self.flows.retain(|_, r| r.last_ns >= idle_cut);
        if self.flows.len() >= self.max_flows {
            let mut times: Vec<u64> = self.flows.values().map(|r| r.last_ns).collect();
            let mid = times.len() / 2;
            let (_, median, _) = times.select_nth_unstable(mid);
            let median = *median;
            self.flows.retain(|_, r| r.last_ns > median);
        }
        self.stats.flows_forgotten += (before - self.flows.len()) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use detector_common::SynSignature;

    fn flow(src: &str, port: u16) -> Flow {
        Flow {
            src: src.parse().unwrap(),
            dst: "192.0.2.1".parse().unwrap(),
            src_port: port,
            dst_port: 443,
            proto: 6,
        }
    }

    /// A verified connection (its handshake completed).
    fn conn(f: Flow, t: u64) -> Event {
        Event::Established(activity(f, t, 0))
    }

    #[test]
    fn an_unverified_syn_is_no_connection() {
        let mut model = Model::new(ModelConfig::default());
        let mut feed = ObservationFeed::new(16);
        let f = flow("198.51.100.9", 1000);
        feed.on_event(
            &mut model,
            &Event::Conn {
                time_ns: 1_000,
                ifindex: 1,
                flow: f,
                syn: SynSignature::default(),
                syn_key: 7,
                action: 0,
                dropped: false,
                isn: 1,
            },
        );
        // Requests of a flow whose handshake was never seen are unknown, never observations.
        feed.on_event(&mut model, &Event::Request(activity(f, 2_000, 3)));
        assert_eq!(feed.stats.unknown_flows, 1);
    }

    fn activity(f: Flow, t: u64, n: u32) -> FlowActivity {
        FlowActivity {
            time_ns: t,
            flow: f,
            syn_key: 7,
            hello_key: 0,
            start_ns: t,
            end_ns: t + 1_000_000,
            bytes: 900,
            response_bytes: 4000,
            packets: 2,
            requests: n,
        }
    }

    #[test]
    fn tls_handshake_bursts_are_not_requests() {
        let mut model = Model::new(ModelConfig::default());
        let mut feed = ObservationFeed::new(16);
        let f = flow("198.51.100.7", 40000);
        feed.on_event(&mut model, &conn(f, 1_000));
        feed.on_event(
            &mut model,
            &Event::Payload {
                time_ns: 2_000,
                flow: f,
                stream_offset: 0,
                segment_len: 3,
                hello_key: 0,
                hello_status: 0,
                action: 0,
                data: vec![0x16, 0x03, 0x01],
            },
        );
        for n in 1..=5 {
            // The second burst is a bare Finished here (small): not a request.
            let mut a = activity(f, 10_000 * n as u64, n);
            if n == 2 {
                a.bytes = 80;
            }
            feed.on_event(&mut model, &Event::Request(a));
        }
        feed.on_event(&mut model, &Event::FlowEnd(activity(f, 90_000, 5)));
        let stats = feed.stats();
        // ConnOpen + 3 requests + ConnClose.
        assert_eq!(stats.observations, 5);
        assert_eq!(stats.handshake_bursts_skipped, 2);
        assert_eq!(feed.tracked_flows(), 0);
    }

    #[test]
    fn a_request_sent_with_the_finished_counts() {
        let mut model = Model::new(ModelConfig::default());
        let mut feed = ObservationFeed::new(16);
        let f = flow("198.51.100.7", 40001);
        feed.on_event(&mut model, &conn(f, 1_000));
        let hello = Event::Payload {
            time_ns: 2_000,
            flow: f,
            stream_offset: 0,
            segment_len: 3,
            hello_key: 0,
            hello_status: 0,
            action: 0,
            data: vec![0x16, 0x03, 0x01],
        };
        feed.on_event(&mut model, &hello);
        feed.on_event(&mut model, &Event::Request(activity(f, 10_000, 1)));
        // Finished + a 900-byte request in one flight.
        feed.on_event(&mut model, &Event::Request(activity(f, 20_000, 2)));
        assert_eq!(feed.stats().handshake_bursts_skipped, 1);
        assert_eq!(feed.stats().observations, 2);
    }

    #[test]
    fn unknown_flows_are_counted_and_the_table_stays_bounded() {
        let mut model = Model::new(ModelConfig::default());
        let mut feed = ObservationFeed::new(8);
        feed.on_event(
            &mut model,
            &Event::Request(activity(flow("198.51.100.9", 1), 5, 3)),
        );
        assert_eq!(feed.stats().unknown_flows, 1);
        for i in 0..100u16 {
            feed.on_event(
                &mut model,
                &conn(flow("198.51.100.8", 1000 + i), 1_000 + i as u64),
            );
        }
        assert!(feed.tracked_flows() <= 8);
        assert!(feed.stats().flows_forgotten > 0);
    }
}
