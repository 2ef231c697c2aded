//! The control protocol's wire types: typed requests (addresses and prefixes are [`IpNet`], actions the shared
//! [`Action`], kinds the model's [`Kind`]), the envelopes, the error kinds, and the pure [`decode_request`] the
//! server and the fuzz target use.
//!
//! One request per connection, one line each way:
//! ```text
//! → {"version":1,"cmd":"decide","target":"192.0.2.7/32","action":"block","ttl_secs":600,"reason":"scraper"}
//! ← {"version":1,"ok":true,"result":{...}}
//! ← {"version":1,"ok":false,"error":{"kind":"refused","message":"refusing to block ..."}}
//! ```
//! A value that does not parse (an address with host bits, an unknown action) is rejected while decoding, with
//! the field's own message: the handler only ever sees typed values.

use std::{fmt, net::IpAddr, str::FromStr};

use detector_common::Action;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::{enforce::EnforceError, fingerprint::live::FpAction, maps::List, model::Kind};

pub const PROTOCOL_VERSION: u32 = 1;
/// Largest request accepted (an import of ~500k entries fits).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// What the CLI asks the daemon.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Struct variants, even when empty: serde ignores unknown fields of unit variants.
    Status {},
    List {
        what: ListWhat,
    },
    /// block / throttle / monitor.
    Decide {
        #[serde(with = "net")]
        target: IpNet,
        action: Action,
        #[serde(default)]
        class: Option<String>,
        #[serde(default)]
        ttl_secs: Option<u64>,
        #[serde(default)]
        permanent: bool,
        #[serde(default)]
        reason: String,
        #[serde(default)]
        force: bool,
    },
    /// unblock.
    Remove {
        #[serde(with = "net")]
        target: IpNet,
    },
    ListAdd {
        list: List,
        #[serde(with = "net")]
        target: IpNet,
        #[serde(default)]
        ttl_secs: Option<u64>,
        #[serde(default)]
        force: bool,
    },
    ListRemove {
        list: List,
        #[serde(with = "net")]
        target: IpNet,
    },
    /// Bulk: every entry into the allowlist, the denylist, or block decisions.
    Import {
        into: ImportInto,
        #[serde(with = "nets")]
        entries: Vec<IpNet>,
        #[serde(default)]
        ttl_secs: Option<u64>,
        #[serde(default)]
        reason: String,
        #[serde(default)]
        force: bool,
    },
    Reload {},
    /// Fingerprints seen and verdicts by fingerprint.
    FpList {},
    /// The model's highest scores by kind of entity.
    ScoreTop {
        kind: Kind,
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Why an address, prefix or fingerprint has its score and tier: features, contributions, history.
    Explain {
        target: ExplainTarget,
    },
    /// A verdict by fingerprint: block / throttle / monitor / allow.
    FpSet {
        /// A JA4, a JA4_r, a p0f SYN signature text, `syn:0x<key>` or `hello:0x<key>` (resolved against the
        /// daemon's fingerprint table, so it stays text here).
        fp: String,
        action: FpAction,
        #[serde(default)]
        class: Option<String>,
        #[serde(default)]
        ttl_secs: Option<u64>,
        #[serde(default)]
        permanent: bool,
        #[serde(default)]
        reason: String,
    },
    /// Removes the verdict on a fingerprint.
    FpRemove {
        fp: String,
    },
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ListWhat {
    All,
    Allow,
    Deny,
    Decisions,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ImportInto {
    Allow,
    Deny,
    Block,
}

impl ImportInto {
    /// The list an import goes into; None for block decisions.
    pub fn list(self) -> Option<List> {
        match self {
            Self::Allow => Some(List::Allow),
            Self::Deny => Some(List::Deny),
            Self::Block => None,
        }
    }
}

/// What `aqd explain` asks about: an address, a prefix, or a fingerprint (JA4 text, `syn:0x<key>`; matched
/// against the model's fingerprint clusters). On the wire it is the text the operator typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExplainTarget {
    Source(IpAddr),
    Prefix(IpNet),
    Fingerprint(String),
}

impl FromStr for ExplainTarget {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if let Ok(addr) = s.parse::<IpAddr>() {
            Self::Source(addr)
        } else if let Ok(net) = s.parse::<IpNet>() {
            Self::Prefix(net)
        } else {
            Self::Fingerprint(s.to_string())
        })
    }
}

impl fmt::Display for ExplainTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Source(a) => write!(f, "{a}"),
            Self::Prefix(n) => write!(f, "{n}"),
            Self::Fingerprint(s) => f.write_str(s),
        }
    }
}

impl Serialize for ExplainTarget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ExplainTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(text
            .parse()
            .unwrap_or_else(|never: std::convert::Infallible| match never {}))
    }
}

/// An address or prefix as the operator writes it (`192.0.2.7`, `198.51.100.0/24`), checked by
/// [`crate::config::parse_cidr`] (no host bits); sent as the prefix's text.
mod net {
    use super::*;

    pub fn serialize<S: serde::Serializer>(net: &IpNet, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(net)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        crate::config::parse_cidr(&text).map_err(serde::de::Error::custom)
    }
}

/// A list of [`net`] values; a bad entry is named by its position.
mod nets {
    use super::*;

    pub fn serialize<S: serde::Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(nets.iter().map(|n| n.to_string()))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        let texts = Vec::<String>::deserialize(d)?;
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                crate::config::parse_cidr(t)
                    .map_err(|e| serde::de::Error::custom(format!("entry {}: {e}; nothing imported", i + 1)))
            })
            .collect()
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RequestEnvelope {
    pub version: u32,
    #[serde(flatten)]
    pub request: Request,
}

/// Failure classes, also the CLI's exit codes.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request could not be understood (malformed, oversized, unknown, wrong version, bad value).
    BadRequest,
    /// Understood but refused (lockout guard).
    Refused,
    /// Nothing to do (e.g. no such decision).
    NotFound,
    /// Applying it failed.
    Failed,
    /// It needs the running daemon (the CLI answered offline).
    NotRunning,
}

impl ErrorKind {
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Failed => 1,
            Self::BadRequest | Self::Refused => 2,
            Self::NotFound => 3,
            Self::NotRunning => 4,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Error)]
#[error("{message}")]
pub struct ControlError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ControlError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    /// A failure of the machinery (maps, files), with its cause's message.
    pub fn failed(e: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Failed, e.to_string())
    }
}

/// Refusals (lockout guard, bad values) are `refused`; the rest `failed`.
impl From<EnforceError> for ControlError {
    fn from(e: EnforceError) -> Self {
        let kind = if e.is_refusal() {
            ErrorKind::Refused
        } else {
            ErrorKind::Failed
        };
        Self::new(kind, e.to_string())
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ResponseEnvelope {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ControlError>,
}

/// Parses one request line (pure; fuzzable).
pub fn decode_request(line: &[u8]) -> Result<Request, ControlError> {
    let mut value: Value = serde_json::from_slice(line)
        .map_err(|e| ControlError::bad_request(format!("malformed JSON: {e}")))?;
    let version = value
        .as_object_mut()
        .and_then(|o| o.remove("version"))
        .and_then(|v| v.as_u64());
    if version != Some(PROTOCOL_VERSION as u64) {
        return Err(ControlError::bad_request(format!(
            "unsupported protocol version {}; this daemon speaks {PROTOCOL_VERSION} (is the CLI from another aqd release?)",
            version.map(|v| v.to_string()).unwrap_or_else(|| "(none)".into())
        )));
    }
    // Deserialized without the envelope so unknown fields are rejected (serde's flatten would accept them).
    serde_json::from_value(value).map_err(|e| ControlError::bad_request(format!("invalid request: {e}")))
}

/// The line the client sends for a request (without its newline).
pub fn encode_request(request: &Request) -> Vec<u8> {
    serde_json::to_vec(&RequestEnvelope {
        version: PROTOCOL_VERSION,
        request: request.clone(),
    })
    .expect("requests serialize")
}

/// The reply line for an answer (with its newline).
pub(crate) fn encode_response(response: Result<Value, ControlError>) -> Vec<u8> {
    let envelope = match response {
        Ok(result) => ResponseEnvelope {
            version: PROTOCOL_VERSION,
            ok: true,
            result: Some(result),
            error: None,
        },
        Err(error) => ResponseEnvelope {
            version: PROTOCOL_VERSION,
            ok: false,
            result: None,
            error: Some(error),
        },
    };
    let mut out = serde_json::to_vec(&envelope).expect("responses serialize");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_versioned_request_into_typed_values() {
        let r =
            decode_request(br#"{"version":1,"cmd":"decide","target":"192.0.2.1","action":"block"}"#).unwrap();
        assert!(
            matches!(r, Request::Decide { target, action: Action::Block, .. } if target == "192.0.2.1/32".parse::<IpNet>().unwrap()),
            "{r:?}"
        );
        let r =
            decode_request(br#"{"version":1,"cmd":"fp_set","fp":"syn:0x1","action":"allow","ttl_secs":60}"#)
                .unwrap();
        assert!(
            matches!(r, Request::FpSet { ref fp, action: FpAction::Allow, ttl_secs: Some(60), .. } if fp == "syn:0x1")
        );
        assert_eq!(
            decode_request(br#"{"version":1,"cmd":"score_top","kind":"prefix"}"#).unwrap(),
            Request::ScoreTop {
                kind: Kind::Prefix,
                limit: None
            }
        );
        assert_eq!(
            decode_request(br#"{"version":1,"cmd":"explain","target":"2001:db8::/64"}"#).unwrap(),
            Request::Explain {
                target: ExplainTarget::Prefix("2001:db8::/64".parse().unwrap())
            }
        );
        assert_eq!(
            decode_request(br#"{"version":1,"cmd":"fp_list"}"#).unwrap(),
            Request::FpList {}
        );
    }

    /// What the client sends decodes to the same request (the fuzz target checks this for any input).
    #[test]
    fn an_encoded_request_decodes_to_itself() {
        for request in [
            Request::Decide {
                target: "::ffff:198.19.11.1/128".parse().unwrap(),
                action: Action::Throttle,
                class: Some("strict".into()),
                ttl_secs: Some(60),
                permanent: false,
                reason: "r".into(),
                force: true,
            },
            Request::Import {
                into: ImportInto::Deny,
                entries: vec!["10.0.0.0/8".parse().unwrap(), "2001:db8::1/128".parse().unwrap()],
                ttl_secs: None,
                reason: String::new(),
                force: false,
            },
            Request::Explain {
                target: ExplainTarget::Fingerprint("t13d1516h2_8daaf6152771_e5627efa2ab1".into()),
            },
            Request::Explain {
                target: ExplainTarget::Source("192.0.2.9".parse().unwrap()),
            },
        ] {
            assert_eq!(decode_request(&encode_request(&request)).unwrap(), request);
        }
    }

    #[test]
    fn rejects_bad_requests_with_a_reason() {
        for (line, needle) in [
            (&b"{not json"[..], "malformed JSON"),
            (br#"{"cmd":"status"}"#, "protocol version (none)"),
            (br#"{"version":7,"cmd":"status"}"#, "version 7"),
            (br#"{"version":1,"cmd":"format_disk"}"#, "invalid request"),
            (br#"{"version":1,"cmd":"remove"}"#, "target"),
            (br#"{"version":1,"cmd":"status","extra":1}"#, "invalid request"),
            (br#"{"version":1,"cmd":"fp_set","fp":"x"}"#, "action"),
            (br#"{"version":1,"cmd":"fp_remove"}"#, "fp"),
            (
                br#"{"version":1,"cmd":"remove","target":"192.0.2.1/24"}"#,
                "host bits",
            ),
            (
                br#"{"version":1,"cmd":"remove","target":"nope"}"#,
                "not an IP address",
            ),
            (
                br#"{"version":1,"cmd":"decide","target":"192.0.2.1","action":"nuke"}"#,
                "unknown action 'nuke'",
            ),
            (br#"{"version":1,"cmd":"score_top","kind":"planets"}"#, "planets"),
            (
                br#"{"version":1,"cmd":"import","into":"block","entries":["192.0.2.1","x"]}"#,
                "entry 2",
            ),
        ] {
            let e = decode_request(line).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert!(e.message.contains(needle), "{needle}: {}", e.message);
        }
    }
}
