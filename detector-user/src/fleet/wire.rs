//! Typed fleet records and their two encodings: Redis stream fields (`dec:log`) and per-origin hash fields
//! (`dec:<scope>:<key>`).
//!
//! Every value is parsed exactly once, here, into a typed [`Record`]; nothing downstream looks at strings.
//! Invariants:
//! - a source key is an exact address, an IPv4 /24 or an IPv6 /64, always stored as its network address;
//! - host names are 1..=64 bytes of `[A-Za-z0-9._-]`, so `|` (the hash value separator) never occurs in one;
//! - a throttle carries a [`Rate`]; monitor and block never do;
//! - [`WIRE_VERSION`] is written in every stream entry and checked on decode.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use detector_common::Action;
use ipnet::IpNet;
use thiserror::Error;

/// Version of the stream and hash encodings; a reader rejects any other.
pub const WIRE_VERSION: u32 = 1;
/// Hash field of an operator unblock (the tombstone); the per-origin fields use [`FleetOrigin::field`].
pub const UNBLOCK_FIELD: &str = "unblock";

/// What went wrong decoding a fleet record: which field and which value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("missing field `{field}`")]
    Missing { field: &'static str },
    #[error("invalid value {value:?} for field `{field}`: {why}")]
    Invalid {
        field: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("unsupported wire version {found}, expected {WIRE_VERSION}")]
    Version { found: String },
    #[error("invalid source scope {net}: {why}")]
    Scope { net: IpNet, why: &'static str },
    #[error("invalid host name {name:?}: {why}")]
    Host { name: String, why: &'static str },
}

fn invalid(field: &'static str, value: &str, why: &'static str) -> WireError {
    WireError::Invalid {
        field,
        value: value.to_owned(),
        why,
    }
}

/// Which kernel fingerprint table a fingerprint key belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FingerprintKind {
    /// `SynSignature::key` (map `SYN_VERDICTS`).
    Syn,
    /// The kernel ClientHello key (`hello::HelloKeyParts::key`, map `HELLO_VERDICTS`).
    Hello,
}

/// What a fleet decision applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FleetKey {
    /// A source scope: an exact address, an IPv4 /24 or an IPv6 /64 (network address).
    Source(IpNet),
    /// A kernel fingerprint key.
    Fingerprint { kind: FingerprintKind, key: u64 },
}

impl FleetKey {
    /// A source scope, checked: exact, /24 (IPv4) or /64 (IPv6), and the network address of its prefix.
    pub fn source(net: IpNet) -> Result<Self, WireError> {
        let ok_len = match net {
            IpNet::V4(n) => n.prefix_len() == 32 || n.prefix_len() == 24,
            IpNet::V6(n) => n.prefix_len() == 128 || n.prefix_len() == 64,
        };
        if !ok_len {
            return Err(WireError::Scope {
                net,
                why: "only exact addresses, IPv4 /24 and IPv6 /64 are fleet scopes",
            });
        }
        if net.trunc() != net {
            return Err(WireError::Scope {
                net,
                why: "not the network address of its prefix",
            });
        }
        Ok(Self::Source(net))
    }

    /// An exact address.
    pub fn addr(ip: IpAddr) -> Self {
        Self::Source(IpNet::from(ip))
    }

    /// The scope tag (`sc` on the wire): `ip`, `p24`, `p64`, `syn` or `hello`.
    pub fn scope(&self) -> &'static str {
        match self {
            Self::Source(IpNet::V4(n)) if n.prefix_len() == 24 => "p24",
            Self::Source(IpNet::V6(n)) if n.prefix_len() == 64 => "p64",
            Self::Source(_) => "ip",
            Self::Fingerprint {
                kind: FingerprintKind::Syn,
                ..
            } => "syn",
            Self::Fingerprint {
                kind: FingerprintKind::Hello,
                ..
            } => "hello",
        }
    }

    /// The key within its scope (`k` on the wire): the address, the prefix's network address, or 16 hex digits.
    pub fn body(&self) -> String {
        match self {
            Self::Source(n) => n.addr().to_string(),
            Self::Fingerprint { key, .. } => format!("{key:016x}"),
        }
    }

    /// `<scope>:<key>`: the member in `dec:exp` and the suffix of the hash key.
    pub fn member(&self) -> String {
        format!("{}:{}", self.scope(), self.body())
    }

    /// Parses a scope tag and key body.
    pub fn parse(scope: &str, body: &str) -> Result<Self, WireError> {
        let fp = |kind| {
            if body.len() != 16 {
                return Err(invalid("k", body, "a fingerprint key is 16 hex digits"));
            }
            u64::from_str_radix(body, 16)
                .map(|key| Self::Fingerprint { kind, key })
                .map_err(|_| invalid("k", body, "a fingerprint key is 16 hex digits"))
        };
        match scope {
            "syn" => fp(FingerprintKind::Syn),
            "hello" => fp(FingerprintKind::Hello),
            "ip" => {
                let ip = IpAddr::from_str(body).map_err(|_| invalid("k", body, "not an IP address"))?;
                Ok(Self::addr(ip))
            }
            "p24" => {
                let ip = Ipv4Addr::from_str(body).map_err(|_| invalid("k", body, "not an IPv4 address"))?;
                Self::source(IpNet::new(IpAddr::V4(ip), 24).expect("24 is a valid IPv4 prefix length"))
            }
            "p64" => {
                let ip = Ipv6Addr::from_str(body).map_err(|_| invalid("k", body, "not an IPv6 address"))?;
                Self::source(IpNet::new(IpAddr::V6(ip), 64).expect("64 is a valid IPv6 prefix length"))
            }
            _ => Err(invalid("sc", scope, "expected ip, p24, p64, syn or hello")),
        }
    }

    /// Parses a `<scope>:<key>` member (the scope never contains `:`; an IPv6 key does).
    pub fn parse_member(member: &str) -> Result<Self, WireError> {
        let (scope, body) = member
            .split_once(':')
            .ok_or_else(|| invalid("member", member, "expected <scope>:<key>"))?;
        Self::parse(scope, body)
    }
}

impl fmt::Display for FleetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.member())
    }
}

/// Who made a decision, fleet-wide. Order = the order of the hash fields (no priority meaning).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FleetOrigin {
    /// An operator (CLI or control socket).
    Operator,
    /// The behavioural model.
    Model,
    /// The fingerprint stage.
    Fingerprint,
    /// An edit of the allow/deny list files.
    ListEdit,
    /// A fleet-level decision (taken once, by the owner of an aggregate key).
    Fleet,
}

impl FleetOrigin {
    pub const ALL: [Self; 5] = [
        Self::Operator,
        Self::Model,
        Self::Fingerprint,
        Self::ListEdit,
        Self::Fleet,
    ];

    /// Name on the wire and hash field name.
    pub const fn field(self) -> &'static str {
        match self {
            Self::Operator => "op",
            Self::Model => "model",
            Self::Fingerprint => "fp",
            Self::ListEdit => "list",
            Self::Fleet => "fleet",
        }
    }

    pub fn parse(s: &str) -> Result<Self, WireError> {
        Self::ALL
            .into_iter()
            .find(|o| o.field() == s)
            .ok_or_else(|| invalid("org", s, "expected op, model, fp, list or fleet"))
    }

    /// Operator-class origins (an operator or their list files) win over automated ones.
    pub const fn is_operator(self) -> bool {
        matches!(self, Self::Operator | Self::ListEdit)
    }
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Monitor => "monitor",
        Action::Throttle => "throttle",
        Action::Block => "block",
    }
}

fn parse_action(s: &str) -> Result<Action, WireError> {
    match s {
        "monitor" => Ok(Action::Monitor),
        "throttle" => Ok(Action::Throttle),
        "block" => Ok(Action::Block),
        _ => Err(invalid("act", s, "expected monitor, throttle or block")),
    }
}

/// A throttle's rate: the class index the deciding host used and its sustained packets per second (so every
/// host can order throttles without sharing rate-class tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rate {
    pub class: u8,
    pub packets_per_sec: u32,
}

/// A host's name in the fleet (validated; see the module invariants).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostName(String);

impl HostName {
    pub fn new(name: &str) -> Result<Self, WireError> {
        let bad = |why| WireError::Host {
            name: name.to_owned(),
            why,
        };
        if name.is_empty() || name.len() > 64 {
            return Err(bad("must be 1 to 64 bytes"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(bad("only letters, digits, '.', '-' and '_' are allowed"));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a put asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    pub action: Action,
    /// Some exactly when `action` is throttle.
    pub rate: Option<Rate>,
    /// Absolute wall-clock expiry in Unix ms; `None` = permanent.
    pub expires_ms: Option<u64>,
}

impl Entry {
    /// Checks the throttle ⇔ rate invariant.
    pub fn new(action: Action, rate: Option<Rate>, expires_ms: Option<u64>) -> Result<Self, WireError> {
        match (action, rate) {
            (Action::Throttle, None) => Err(WireError::Missing { field: "rate" }),
            (Action::Monitor | Action::Block, Some(_)) => {
                Err(invalid("rate", "set", "only a throttle carries a rate"))
            }
            _ => Ok(Self {
                action,
                rate,
                expires_ms,
            }),
        }
    }

    /// Active at wall time `now_ms` (server-aligned).
    pub fn active(&self, now_ms: u64) -> bool {
        self.expires_ms.is_none_or(|e| e > now_ms)
    }
}

/// A change to one origin's slot of one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Put(Entry),
    /// From the operator: an unblock (tombstone) that clears every older slot and keeps automated origins off
    /// the key until `hold_until_ms`. From any other origin: withdraws that origin's own entry.
    Del {
        hold_until_ms: Option<u64>,
    },
}

/// One fleet record: a stream entry, or one hash field read back.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Record {
    pub key: FleetKey,
    pub origin: FleetOrigin,
    pub host: HostName,
    /// Wall-clock Unix ms when the deciding host made it; strictly increasing per host, so (ts, host) is unique.
    pub ts_ms: u64,
    pub op: Op,
}

impl Record {
    /// The hash field this record writes (`unblock` for an operator del).
    pub fn field(&self) -> &'static str {
        match (self.origin, self.op) {
            (FleetOrigin::Operator, Op::Del { .. }) => UNBLOCK_FIELD,
            (o, _) => o.field(),
        }
    }

    /// The latest expiry this record can be relevant to (`None` = forever): its entry's expiry for a put, the
    /// hold for an unblock, and the time itself for a withdraw.
    pub fn relevant_until_ms(&self) -> Option<u64> {
        match self.op {
            Op::Put(e) => e.expires_ms,
            Op::Del { hold_until_ms } => Some(hold_until_ms.unwrap_or(self.ts_ms).max(self.ts_ms)),
        }
    }

    /// Stream fields of `dec:log`, in order.
    pub fn to_stream_fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("v", WIRE_VERSION.to_string()),
            ("sc", self.key.scope().to_owned()),
            ("k", self.key.body()),
            ("org", self.origin.field().to_owned()),
            ("h", self.host.0.clone()),
            ("ts", self.ts_ms.to_string()),
        ];
        match self.op {
            Op::Put(e) => {
                f.push(("op", "put".to_owned()));
                f.push(("act", action_name(e.action).to_owned()));
                if let Some(r) = e.rate {
                    f.push(("rc", r.class.to_string()));
                    f.push(("pps", r.packets_per_sec.to_string()));
                }
                f.push(("exp", opt_ms(e.expires_ms)));
            }
            Op::Del { hold_until_ms } => {
                f.push(("op", "del".to_owned()));
                f.push(("hold", opt_ms(hold_until_ms)));
            }
        }
        f
    }

    /// Decodes a `dec:log` entry's fields.
    pub fn from_stream_fields(map: &HashMap<String, String>) -> Result<Self, WireError> {
        let get = |field: &'static str| {
            map.get(field)
                .map(String::as_str)
                .ok_or(WireError::Missing { field })
        };
        let v = get("v")?;
        if v != WIRE_VERSION.to_string() {
            return Err(WireError::Version { found: v.to_owned() });
        }
        let key = FleetKey::parse(get("sc")?, get("k")?)?;
        let origin = FleetOrigin::parse(get("org")?)?;
        let host = HostName::new(get("h")?)?;
        let ts_ms = parse_u64("ts", get("ts")?)?;
        let op = match get("op")? {
            "put" => {
                let action = parse_action(get("act")?)?;
                let rate = match (map.get("rc"), map.get("pps")) {
                    (Some(c), Some(p)) => Some(parse_rate(c, p)?),
                    (None, None) => None,
                    (Some(_), None) => return Err(WireError::Missing { field: "pps" }),
                    (None, Some(_)) => return Err(WireError::Missing { field: "rc" }),
                };
                Op::Put(Entry::new(action, rate, parse_opt_ms("exp", get("exp")?)?)?)
            }
            "del" => Op::Del {
                hold_until_ms: parse_opt_ms("hold", get("hold")?)?,
            },
            other => return Err(invalid("op", other, "expected put or del")),
        };
        Ok(Self {
            key,
            origin,
            host,
            ts_ms,
            op,
        })
    }

    /// The hash value this record stores under [`Record::field`]:
    /// put `p|act|rc|pps|exp|ts|host`, withdraw `d|ts|host`, unblock `u|ts|hold|host` (`-` = none).
    pub fn to_hash_value(&self) -> String {
        match (self.origin, self.op) {
            (_, Op::Put(e)) => {
                let (rc, pps) = match e.rate {
                    Some(r) => (r.class.to_string(), r.packets_per_sec.to_string()),
                    None => ("-".to_owned(), "-".to_owned()),
                };
                format!(
                    "p|{}|{rc}|{pps}|{}|{}|{}",
                    action_name(e.action),
                    opt_ms(e.expires_ms),
                    self.ts_ms,
                    self.host
                )
            }
            (FleetOrigin::Operator, Op::Del { hold_until_ms }) => {
                format!("u|{}|{}|{}", self.ts_ms, opt_ms(hold_until_ms), self.host)
            }
            (_, Op::Del { .. }) => format!("d|{}|{}", self.ts_ms, self.host),
        }
    }

    /// Decodes one field of the hash of `key`.
    pub fn from_hash_field(key: FleetKey, field: &str, value: &str) -> Result<Self, WireError> {
        let parts: Vec<&str> = value.split('|').collect();
        let origin = if field == UNBLOCK_FIELD {
            FleetOrigin::Operator
        } else {
            FleetOrigin::parse(field)?
        };
        let shape = |n: usize, why| {
            if parts.len() == n {
                Ok(())
            } else {
                Err(invalid("hash value", value, why))
            }
        };
        let (ts, host, op) = match (parts[0], field == UNBLOCK_FIELD) {
            ("u", true) => {
                shape(4, "an unblock is u|ts|hold|host")?;
                let hold = parse_opt_ms("hold", parts[2])?;
                (parts[1], parts[3], Op::Del { hold_until_ms: hold })
            }
            ("p", false) => {
                shape(7, "a put is p|act|rc|pps|exp|ts|host")?;
                let action = parse_action(parts[1])?;
                let rate = match (parts[2], parts[3]) {
                    ("-", "-") => None,
                    (c, p) => Some(parse_rate(c, p)?),
                };
                let e = Entry::new(action, rate, parse_opt_ms("exp", parts[4])?)?;
                (parts[5], parts[6], Op::Put(e))
            }
            ("d", false) if origin != FleetOrigin::Operator => {
                shape(3, "a withdraw is d|ts|host")?;
                (parts[1], parts[2], Op::Del { hold_until_ms: None })
            }
            _ => return Err(invalid("hash value", value, "kind does not match the field")),
        };
        Ok(Self {
            key,
            origin,
            host: HostName::new(host)?,
            ts_ms: parse_u64("ts", ts)?,
            op,
        })
    }
}

fn opt_ms(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn parse_u64(field: &'static str, s: &str) -> Result<u64, WireError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(field, s, "expected a decimal integer"));
    }
    s.parse().map_err(|_| invalid(field, s, "out of range"))
}

fn parse_opt_ms(field: &'static str, s: &str) -> Result<Option<u64>, WireError> {
    if s == "-" {
        Ok(None)
    } else {
        parse_u64(field, s).map(Some)
    }
}

fn parse_rate(class: &str, pps: &str) -> Result<Rate, WireError> {
    let class = parse_u64("rc", class)?;
    let class =
        u8::try_from(class).map_err(|_| invalid("rc", &class.to_string(), "rate class is 0..=255"))?;
    let p = parse_u64("pps", pps)?;
    let packets_per_sec = u32::try_from(p).map_err(|_| invalid("pps", pps, "out of range"))?;
    Ok(Rate {
        class,
        packets_per_sec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostName {
        HostName::new("lb-1.example").unwrap()
    }

    fn samples() -> Vec<Record> {
        let keys = [
            FleetKey::addr("203.0.113.7".parse().unwrap()),
            FleetKey::source("198.51.100.0/24".parse().unwrap()).unwrap(),
            FleetKey::source("2001:db8:1:2::/64".parse().unwrap()).unwrap(),
            FleetKey::addr("2001:db8::1".parse().unwrap()),
            FleetKey::Fingerprint {
                kind: FingerprintKind::Syn,
                key: 0xdead_beef_0000_0001,
            },
            FleetKey::Fingerprint {
                kind: FingerprintKind::Hello,
                key: 7,
            },
        ];
        let ops = [
            Op::Put(Entry::new(Action::Block, None, Some(1_800_000_000_000)).unwrap()),
            Op::Put(
                Entry::new(
                    Action::Throttle,
                    Some(Rate {
                        class: 3,
                        packets_per_sec: 50,
                    }),
                    None,
                )
                .unwrap(),
            ),
            Op::Put(Entry::new(Action::Monitor, None, None).unwrap()),
            Op::Del {
                hold_until_ms: Some(1_800_000_600_000),
            },
            Op::Del { hold_until_ms: None },
        ];
        let mut out = Vec::new();
        for key in keys {
            for origin in FleetOrigin::ALL {
                for op in ops {
                    out.push(Record {
                        key,
                        origin,
                        host: host(),
                        ts_ms: 1_799_999_999_123,
                        op,
                    });
                }
            }
        }
        out
    }

    fn stream_map(r: &Record) -> HashMap<String, String> {
        r.to_stream_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    #[test]
    fn stream_round_trip() {
        for r in samples() {
            assert_eq!(Record::from_stream_fields(&stream_map(&r)).unwrap(), r);
        }
    }

    #[test]
    fn hash_round_trip() {
        for r in samples() {
            let back = Record::from_hash_field(r.key, r.field(), &r.to_hash_value()).unwrap();
            // A withdraw keeps no hold (only the operator's tombstone does).
            let expect = match (r.origin, r.op) {
                (o, Op::Del { .. }) if o != FleetOrigin::Operator => Record {
                    op: Op::Del { hold_until_ms: None },
                    ..r.clone()
                },
                _ => r.clone(),
            };
            assert_eq!(back, expect, "{}", r.to_hash_value());
        }
    }

    #[test]
    fn member_round_trip() {
        for r in samples() {
            assert_eq!(FleetKey::parse_member(&r.key.member()).unwrap(), r.key);
        }
        assert_eq!(
            FleetKey::source("2001:db8:1:2::/64".parse().unwrap())
                .unwrap()
                .member(),
            "p64:2001:db8:1:2::"
        );
    }

    #[test]
    fn scopes_are_checked() {
        assert!(matches!(
            FleetKey::source("10.0.0.0/16".parse().unwrap()),
            Err(WireError::Scope { .. })
        ));
        assert!(matches!(
            FleetKey::source("10.0.0.5/24".parse().unwrap()),
            Err(WireError::Scope { .. })
        ));
        assert!(FleetKey::parse("p24", "10.0.0.5").is_err());
        assert!(FleetKey::parse("p64", "10.0.0.0").is_err());
        assert!(FleetKey::parse("syn", "abc").is_err());
        assert!(FleetKey::parse("syn", "zzzzzzzzzzzzzzzz").is_err());
        assert!(FleetKey::parse("ja5", "x").is_err());
    }

    #[test]
    fn malformed_stream_fields_are_rejected_with_the_field_named() {
        let good = stream_map(&samples()[0]);
        let with = |k: &str, v: Option<&str>| {
            let mut m = good.clone();
            match v {
                Some(v) => m.insert(k.to_owned(), v.to_owned()),
                None => m.remove(k),
            };
            Record::from_stream_fields(&m).unwrap_err()
        };
        assert_eq!(with("v", Some("2")), WireError::Version { found: "2".into() });
        assert_eq!(with("ts", None), WireError::Missing { field: "ts" });
        assert!(with("ts", Some("-5")).to_string().contains("`ts`"));
        assert!(
            with("ts", Some("99999999999999999999999"))
                .to_string()
                .contains("out of range")
        );
        assert!(with("act", Some("drop")).to_string().contains("`act`"));
        assert!(with("org", Some("root")).to_string().contains("`org`"));
        assert!(with("op", Some("upsert")).to_string().contains("`op`"));
        assert!(with("exp", Some("soon")).to_string().contains("`exp`"));
        assert!(matches!(with("h", Some("a|b")), WireError::Host { .. }));
        assert!(matches!(with("h", Some("")), WireError::Host { .. }));
        assert!(matches!(
            with("k", Some("300.1.1.1")),
            WireError::Invalid { field: "k", .. }
        ));
        // A block with a rate, a throttle without one.
        assert!(with("rc", Some("1")).to_string().contains("pps"));
        let mut t = stream_map(&samples()[1]);
        assert_eq!(t["act"], "throttle");
        t.remove("pps");
        t.remove("rc");
        assert_eq!(
            Record::from_stream_fields(&t).unwrap_err(),
            WireError::Missing { field: "rate" }
        );
        t.insert("rc".into(), "256".into());
        t.insert("pps".into(), "1".into());
        assert!(
            Record::from_stream_fields(&t)
                .unwrap_err()
                .to_string()
                .contains("`rc`")
        );
    }

    #[test]
    fn malformed_hash_values_are_rejected() {
        let k = FleetKey::addr("192.0.2.1".parse().unwrap());
        for (field, value) in [
            ("op", "p|block|-|-|-|12"),
            ("op", "x|1|h"),
            ("op", "d|1|h"),
            ("model", "u|1|-|h"),
            ("unblock", "p|block|-|-|-|1|h"),
            ("unblock", "u|1|-"),
            ("model", "p|block|-|-|later|1|h"),
            ("model", "p|throttle|-|-|-|1|h"),
            ("model", "p|block|1|10|-|1|h"),
            ("nobody", "d|1|h"),
            ("model", "d|1|bad host"),
        ] {
            assert!(
                Record::from_hash_field(k, field, value).is_err(),
                "{field} = {value}"
            );
        }
    }
}
