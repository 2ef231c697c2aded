//! The p0f v3 fingerprint database (`p0f.fp`, p0f 3.09b; format in its `docs/README` §5) — its
//! `[tcp:request]` section, i.e. client SYNs — and matching a [`SynSignature`] against it the way p0f's
//! `fp_tcp.c:tcp_find_match` does.
//!
//! Supported in `sig = ver:ittl:olen:mss:wsize,scale:olayout:quirks:pclass`:
//! - `ver`: `4`, `6` or `*`;
//! - `ittl`: `N`, `N+D` (initial TTL N + D), `N-` (randomised TTL: only "observed ≤ N" is checked);
//! - `mss`: number or `*`; `wsize`: number, `*`, `%N` (a multiple of N), `mss*N`, `mtu*N`; `scale`: number or `*`;
//! - `olayout`: `eol+N` (last), `nop`, `mss`, `ws`, `sok`, `sack`, `ts`, `?N`;
//! - `quirks`: all 17 of `detector_common::syn::quirk::ALL`, with p0f's IPv4/IPv6 validity checks;
//! - `pclass`: `0`, `+`, `*`;
//! - `label = s|g:class|!:name:flavor` (class from the `classes` line, `!` for userland tools, which need a
//!   `sys = ` line before their first `sig`).
//!
//! Matching, as p0f: the option layout, EOL padding and IP option length must be equal; MSS, scale, payload
//! class and window per their wildcards; TTL within [`MAX_DIST`] below the signature's. A non-generic exact
//! match wins at once; otherwise the first generic exact match, otherwise the first *fuzzy* match — quirks
//! that differ only by `df`/`id+` disappearing or `id-`/`ecn` appearing, or a TTL out of range — except that
//! userland-tool (`!`) signatures never match fuzzily. `*`-version signatures drop the quirks that do not
//! exist for the packet's IP version before comparing.
//!
//! Differences from p0f 3.09b: the signature's IP version is checked (p0f ignores it when matching, so a `4:`
//! signature can match an IPv6 SYN); option layouts are compared exactly instead of by a 32-bit hash; values
//! are trimmed of trailing whitespace; signatures that an earlier one already covers are accepted (p0f
//! refuses to start). Other sections (`[mtu]`, `[tcp:response]`, `[http:*]`) are skipped without validation,
//! apart from their section headers.

use std::path::Path;

use anyhow::Context as _;
use detector_common::syn::{SYN_MAX_OPTIONS, SynSignature, option_kind, quirk};

use super::syn::{MAX_DIST, estimated_header_len, options, window_multiple};

/// p0f's cap on the option layout of a signature.
const MAX_TCP_OPT: usize = 24;

/// A line of `p0f.fp` that was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct P0fParseError {
    pub line: usize,
    pub message: String,
}

/// The window-size field of a signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowSpec {
    Any,
    Exact(u16),
    /// `%N`: any multiple of N.
    Modulo(u16),
    /// `mss*N`.
    Mss(u16),
    /// `mtu*N`.
    Mtu(u16),
}

/// A signature label (`label = g:unix:Linux:3.x`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct P0fLabel {
    /// The label as written after `label = `.
    pub text: String,
    pub generic: bool,
    /// `None` for `!` (a userland tool rather than an OS).
    pub class: Option<String>,
    pub name: String,
    pub flavor: String,
    /// `sys = ` entries (for `!` labels).
    pub sys: Vec<String>,
}

/// One `[tcp:request]` signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct P0fSignature {
    /// 1-based line in the file.
    pub line: usize,
    /// Index into [`P0fDb::labels`].
    pub label: usize,
    /// The text after `sig = `.
    pub text: String,
    /// `None` for `*`.
    pub ip_version: Option<u8>,
    /// Initial TTL (with any `+D` added).
    pub ttl: u8,
    /// `N-`: the TTL is randomised.
    pub bad_ttl: bool,
    pub ip_opts_len: u8,
    pub mss: Option<u16>,
    pub window: WindowSpec,
    pub wscale: Option<u8>,
    pub layout: Vec<u8>,
    pub eol_pad: u8,
    pub quirks: u32,
    /// `None` for `*`, else whether the SYN carries payload.
    pub payload: Option<bool>,
}

/// The `[tcp:request]` part of a p0f database.
#[derive(Clone, Debug, Default)]
pub struct P0fDb {
    pub labels: Vec<P0fLabel>,
    pub signatures: Vec<P0fSignature>,
}

/// The result of matching a SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct P0fMatch<'a> {
    pub label: &'a P0fLabel,
    pub signature: &'a P0fSignature,
    /// Quirks or TTL only roughly agree.
    pub fuzzy: bool,
    /// The estimated hop distance.
    pub distance: u8,
}

impl P0fMatch<'_> {
    /// The label as the offline output prints it: the label text, ` (fuzzy)` when fuzzy.
    pub fn display_label(&self) -> String {
        if self.fuzzy {
            format!("{} (fuzzy)", self.label.text)
        } else {
            self.label.text.clone()
        }
    }
}

const NAME_CHARS: &str = " ./-_!?()";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    TcpRequest,
    Other,
}

impl P0fDb {
    /// Reads and parses a `p0f.fp` file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Parses the text of a `p0f.fp` file. Refuses the first malformed line of `[tcp:request]`, naming it.
    pub fn parse(text: &str) -> Result<Self, P0fParseError> {
        let mut db = P0fDb::default();
        let mut classes: Vec<String> = Vec::new();
        let mut section = Section::None;
        // The label that `sig` lines attach to, and whether it still needs its `sys` line.
        let mut current: Option<usize> = None;
        let mut needs_sys = false;
        for (index, raw) in text.lines().enumerate() {
            let line_no = index + 1;
            let err = |message: String| P0fParseError {
                line: line_no,
                message,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[') {
                let name = name
                    .strip_suffix(']')
                    .ok_or_else(|| err("malformed section header".into()))?;
                section = match name {
                    "tcp:request" => Section::TcpRequest,
                    "mtu" | "tcp:response" | "http:request" | "http:response" => Section::Other,
                    other => return Err(err(format!("unknown section [{other}]"))),
                };
                current = None;
                needs_sys = false;
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| err("expected `name = value`".into()))?;
            let (key, value) = (key.trim(), value.trim());
            if key == "classes" {
                if section != Section::None {
                    return Err(err("`classes` after the first section".into()));
                }
                for class in value.split(',').map(str::trim) {
                    if class.is_empty() || !class.chars().all(|c| c.is_ascii_alphanumeric()) {
                        return Err(err(format!("malformed class `{class}`")));
                    }
                    classes.push(class.to_owned());
                }
                continue;
            }
            match section {
                Section::None => return Err(err(format!("`{key}` outside a section"))),
                Section::Other => continue,
                Section::TcpRequest => {}
            }
            match key {
                "label" => {
                    let label = parse_label(value, &classes).map_err(err)?;
                    needs_sys = label.class.is_none();
                    db.labels.push(label);
                    current = Some(db.labels.len() - 1);
                }
                "sys" => {
                    let Some(label) = current else {
                        return Err(err("`sys` before any `label`".into()));
                    };
                    if !needs_sys {
                        return Err(err(
                            "misplaced `sys` (only for `!` labels, before their signatures)".into(),
                        ));
                    }
                    let sys: Vec<String> = value
                        .split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect();
                    if sys.is_empty()
                        || sys.iter().any(|s| {
                            let name = s.strip_prefix('@').unwrap_or(s);
                            name.is_empty()
                                || !name
                                    .chars()
                                    .all(|c| c.is_ascii_alphanumeric() || NAME_CHARS.contains(c))
                                || (s.starts_with('@')
                                    && !classes.iter().any(|k| k.eq_ignore_ascii_case(name)))
                        })
                    {
                        return Err(err(format!("malformed sys entry `{value}`")));
                    }
                    db.labels[label].sys = sys;
                    needs_sys = false;
                }
                "sig" => {
                    let Some(label) = current else {
                        return Err(err("`sig` before any `label`".into()));
                    };
                    if needs_sys {
                        return Err(err("`sig` of a `!` label without a `sys` line".into()));
                    }
                    let mut sig = parse_signature(value).map_err(err)?;
                    sig.line = line_no;
                    sig.label = label;
                    db.signatures.push(sig);
                }
                other => return Err(err(format!("unknown field `{other}`"))),
            }
        }
        Ok(db)
    }

    /// Matches a client SYN's signature (see the module docs). `header_len`: IP + TCP header bytes if known.
    pub fn match_syn(&self, sig: &SynSignature, header_len: Option<u16>) -> Option<P0fMatch<'_>> {
        let layout = options(sig);
        let header_len = header_len.unwrap_or_else(|| estimated_header_len(sig));
        let win_multi = window_multiple(sig, header_len);
        let mut generic: Option<&P0fSignature> = None;
        let mut fuzzy_match: Option<&P0fSignature> = None;

        for refs in &self.signatures {
            if refs.layout != layout {
                continue;
            }
            if refs.ip_version.is_some_and(|v| v != sig.ip_version) {
                continue;
            }
            let mut fuzzy = false;
            let mut ref_quirks = refs.quirks;
            if refs.ip_version.is_none() {
                ref_quirks &= if sig.ip_version == 4 {
                    !quirk::FLOW
                } else {
                    !(quirk::DF | quirk::ID_PLUS | quirk::ID_MINUS)
                };
            }
            if ref_quirks != sig.quirks {
                let deleted = (ref_quirks ^ sig.quirks) & ref_quirks;
                let added = (ref_quirks ^ sig.quirks) & sig.quirks;
                if fuzzy_match.is_some()
                    || deleted & !(quirk::DF | quirk::ID_PLUS) != 0
                    || added & !(quirk::ID_MINUS | quirk::ECN) != 0
                {
                    continue;
                }
                fuzzy = true;
            }
            if refs.eol_pad != sig.eol_pad || refs.ip_opts_len != sig.ip_opts_len {
                continue;
            }
            if refs.bad_ttl {
                if refs.ttl < sig.ttl {
                    continue;
                }
            } else if refs.ttl < sig.ttl || refs.ttl - sig.ttl > MAX_DIST {
                fuzzy = true;
            }
            if refs.mss.is_some_and(|m| m != sig.mss)
                || refs.wscale.is_some_and(|w| w != sig.wscale)
                || refs.payload.is_some_and(|p| p != (sig.payload != 0))
            {
                continue;
            }
            let window_ok = match refs.window {
                WindowSpec::Any => true,
                WindowSpec::Exact(w) => w == sig.window,
                WindowSpec::Modulo(m) => sig.window.is_multiple_of(m),
                WindowSpec::Mss(n) => win_multi == Some((false, n)),
                WindowSpec::Mtu(n) => win_multi == Some((true, n)),
            };
            if !window_ok {
                continue;
            }
            let label = &self.labels[refs.label];
            if !fuzzy {
                if !label.generic {
                    return Some(self.result(refs, false, sig));
                }
                generic.get_or_insert(refs);
            } else {
                fuzzy_match.get_or_insert(refs);
            }
        }
        if let Some(refs) = generic {
            return Some(self.result(refs, false, sig));
        }
        // No fuzzy matching for userland tools.
        let refs = fuzzy_match.filter(|r| self.labels[r.label].class.is_some())?;
        Some(self.result(refs, true, sig))
    }

    fn result<'a>(&'a self, refs: &'a P0fSignature, fuzzy: bool, sig: &SynSignature) -> P0fMatch<'a> {
        let in_range = refs.ttl >= sig.ttl && (refs.bad_ttl || refs.ttl - sig.ttl <= MAX_DIST);
        let distance = if in_range {
            refs.ttl - sig.ttl
        } else {
            detector_common::syn::initial_ttl(sig.ttl) - sig.ttl
        };
        P0fMatch {
            label: &self.labels[refs.label],
            signature: refs,
            fuzzy,
            distance,
        }
    }
}

fn parse_label(value: &str, classes: &[String]) -> Result<P0fLabel, String> {
    let mut parts = value.splitn(4, ':');
    let kind = parts.next().unwrap_or("");
    let class = parts
        .next()
        .ok_or("malformed label: expected `s|g:class:name:flavor`")?;
    let name = parts.next().ok_or("malformed label: missing name")?;
    let flavor = parts
        .next()
        .ok_or("malformed label: missing `:` after the name")?;
    let generic = match kind {
        "g" => true,
        "s" => false,
        _ => {
            return Err(format!(
                "malformed label class entry `{kind}` (expected `s` or `g`)"
            ));
        }
    };
    let class = if class == "!" {
        None
    } else if !class.is_empty() && class.chars().all(|c| c.is_ascii_alphanumeric()) {
        match classes.iter().find(|k| k.eq_ignore_ascii_case(class)) {
            Some(k) => Some(k.clone()),
            None => return Err(format!("unknown class `{class}`")),
        }
    } else {
        return Err(format!("malformed class `{class}`"));
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || NAME_CHARS.contains(c))
    {
        return Err(format!("malformed name `{name}`"));
    }
    Ok(P0fLabel {
        text: value.to_owned(),
        generic,
        class,
        name: name.to_owned(),
        flavor: flavor.to_owned(),
        sys: Vec::new(),
    })
}

fn number<T: TryFrom<u64>>(s: &str, what: &str, min: u64, max: u64) -> Result<T, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 6 {
        return Err(format!("malformed {what} `{s}`"));
    }
    let v: u64 = s.parse().map_err(|_| format!("malformed {what} `{s}`"))?;
    if v < min || v > max {
        return Err(format!("bogus {what} `{s}`"));
    }
    T::try_from(v).map_err(|_| format!("bogus {what} `{s}`"))
}

/// Parses the value of a `[tcp:request]` `sig = ` line.
pub fn parse_signature(value: &str) -> Result<P0fSignature, String> {
    let fields: Vec<&str> = value.split(':').collect();
    if fields.len() != 8 {
        return Err(format!(
            "signature needs 8 `:`-separated fields, found {}",
            fields.len()
        ));
    }
    let ip_version = match fields[0] {
        "4" => Some(4),
        "6" => Some(6),
        "*" => None,
        other => return Err(format!("unrecognized IP version `{other}`")),
    };

    let ttl_field = fields[1];
    let (ttl, bad_ttl) = if let Some(base) = ttl_field.strip_suffix('-') {
        (number::<u8>(base, "initial TTL", 1, 255)?, true)
    } else if let Some((base, add)) = ttl_field.split_once('+') {
        // `observed+distance` as `signature_text` prints it: an observed TTL of 0 is possible (`0+32`), the
        // sum is the initial TTL.
        let base: u16 = number(base, "initial TTL", 0, 255)?;
        let add: u16 = number(add, "TTL distance", 0, 255)?;
        if base + add == 0 || base + add > 255 {
            return Err(format!("bogus initial TTL `{ttl_field}`"));
        }
        ((base + add) as u8, false)
    } else {
        (number::<u8>(ttl_field, "initial TTL", 1, 255)?, false)
    };

    let ip_opts_len: u8 = number(fields[2], "IP option length", 0, 255)?;
    let mss = match fields[3] {
        "*" => None,
        s => Some(number::<u16>(s, "MSS", 0, 65535)?),
    };

    let (win, scale) = fields[4]
        .split_once(',')
        .ok_or_else(|| format!("malformed window `{}`: no `,scale`", fields[4]))?;
    let window = if win == "*" {
        WindowSpec::Any
    } else if let Some(m) = win.strip_prefix('%') {
        WindowSpec::Modulo(number(m, "`%` value", 2, 65535)?)
    } else if let Some(n) = win.strip_prefix("mss*") {
        WindowSpec::Mss(number(n, "MSS multiplier", 1, 1000)?)
    } else if let Some(n) = win.strip_prefix("mtu*") {
        WindowSpec::Mtu(number(n, "MTU multiplier", 1, 1000)?)
    } else {
        WindowSpec::Exact(number(win, "window size", 0, 65535)?)
    };
    let wscale = match scale {
        "*" => None,
        s => Some(number::<u8>(s, "window scale", 0, 255)?),
    };

    let mut layout = Vec::new();
    let mut eol_pad = 0u8;
    if !fields[5].is_empty() {
        let tokens: Vec<&str> = fields[5].split(',').collect();
        for (i, token) in tokens.iter().enumerate() {
            if layout.len() >= MAX_TCP_OPT.min(SYN_MAX_OPTIONS) {
                return Err(format!(
                    "more than {} TCP options",
                    MAX_TCP_OPT.min(SYN_MAX_OPTIONS)
                ));
            }
            let kind = match *token {
                "nop" => option_kind::NOP,
                "mss" => option_kind::MSS,
                "ws" => option_kind::WS,
                "sok" => option_kind::SACK_PERMITTED,
                "sack" => option_kind::SACK,
                "ts" => option_kind::TIMESTAMP,
                t if t.starts_with("eol") => {
                    let pad = t
                        .strip_prefix("eol+")
                        .ok_or_else(|| format!("malformed EOL option `{t}`"))?;
                    eol_pad = number(pad, "EOL padding", 0, 255)?;
                    if i + 1 != tokens.len() {
                        return Err("EOL must be the last option".into());
                    }
                    option_kind::EOL
                }
                t if t.starts_with('?') => number(&t[1..], "`?` option", 0, 255)?,
                t => return Err(format!("unrecognized TCP option `{t}`")),
            };
            layout.push(kind);
        }
    }

    let mut quirks = 0u32;
    if !fields[6].is_empty() {
        for token in fields[6].split(',') {
            let Some(&(bit, name)) = quirk::ALL.iter().find(|(_, name)| *name == token) else {
                return Err(format!("unrecognized quirk `{token}`"));
            };
            let v4_only = matches!(
                bit,
                quirk::DF | quirk::ID_PLUS | quirk::ID_MINUS | quirk::ZERO_PLUS
            );
            if v4_only && ip_version == Some(6) {
                return Err(format!("`{name}` is not valid for IPv6"));
            }
            if bit == quirk::FLOW && ip_version == Some(4) {
                return Err("`flow` is not valid for IPv4".into());
            }
            quirks |= bit;
        }
    }

    let payload = match fields[7] {
        "*" => None,
        "0" => Some(false),
        "+" => Some(true),
        other => return Err(format!("malformed payload class `{other}`")),
    };

    Ok(P0fSignature {
        line: 0,
        label: 0,
        text: value.to_owned(),
        ip_version,
        ttl,
        bad_ttl,
        ip_opts_len,
        mss,
        window,
        wscale,
        layout,
        eol_pad,
        quirks,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "classes = win,unix,other\n[tcp:request]\n";

    fn db(body: &str) -> Result<P0fDb, P0fParseError> {
        P0fDb::parse(&format!("{HEADER}{body}"))
    }

    fn syn(ttl: u8, window: u16, wscale: u8, mss: u16, layout: &[u8], quirks: u32) -> SynSignature {
        let mut options = [0u8; SYN_MAX_OPTIONS];
        options[..layout.len()].copy_from_slice(layout);
        SynSignature {
            ip_version: 4,
            ttl,
            mss,
            window,
            wscale,
            quirks,
            option_count: layout.len() as u8,
            options,
            ..Default::default()
        }
    }

    const LINUX: &[u8] = &[2, 4, 8, 1, 3];

    #[test]
    fn parses_every_field_form() {
        let s = parse_signature("*:64+2:0:*:mss*20,10:mss,sok,ts,nop,ws,?30,eol+3:df,id+,ecn:*").unwrap();
        assert_eq!(s.ttl, 66);
        assert_eq!(s.window, WindowSpec::Mss(20));
        assert_eq!(s.layout, vec![2, 4, 8, 1, 3, 30, 0]);
        assert_eq!(s.eol_pad, 3);
        assert_eq!(s.quirks, quirk::DF | quirk::ID_PLUS | quirk::ECN);
        assert_eq!(s.payload, None);
        let s = parse_signature("4:64-:0:1460:%8192,*::ack+:+").unwrap();
        assert!(s.bad_ttl);
        assert_eq!(s.window, WindowSpec::Modulo(8192));
        assert_eq!(s.wscale, None);
        assert!(s.layout.is_empty());
        assert_eq!(s.payload, Some(true));
        // A SYN seen with TTL 0 prints as `0+32` (found by the `syn` fuzz target); `0+0` is no TTL.
        assert_eq!(parse_signature("6:0+32:0:0:0,0::flow:+").unwrap().ttl, 32);
        assert!(parse_signature("6:0+0:0:0:0,0::flow:+").is_err());
        assert_eq!(
            parse_signature("4:128:0:1460:mtu*2,0:mss,nop,ws::0")
                .unwrap()
                .window,
            WindowSpec::Mtu(2)
        );
    }

    #[test]
    fn rejects_malformed_lines_with_their_numbers() {
        let cases = [
            (
                "label = s:unix:Linux:3.x\nsig = 5:64:0:*:*,*:mss::0\n",
                4,
                "IP version",
            ),
            (
                "label = s:unix:Linux:3.x\nsig = *:64:0:*:*,*:mss,eol+1,nop::0\n",
                4,
                "EOL must be the last",
            ),
            (
                "label = s:unix:Linux:3.x\nsig = *:64:0:*:*,*:mss:frob:0\n",
                4,
                "quirk",
            ),
            (
                "label = s:unix:Linux:3.x\nsig = 6:64:0:*:*,*:mss:df:0\n",
                4,
                "IPv6",
            ),
            (
                "label = s:unix:Linux:3.x\nsig = *:64:0:*:*,*:mss:0\n",
                4,
                "fields",
            ),
            ("label = s:unix:Linux:3.x\nsig = *:64:0:*:*:mss::0\n", 4, "window"),
            ("label = s:unix:Linux:3.x\nsig = *:0:0:*:*,*:mss::0\n", 4, "TTL"),
            ("label = s:unix:Linux:3.x\nsig = *:64:0:*:%1,*:mss::0\n", 4, "`%`"),
            ("label = x:unix:Linux:3.x\n", 3, "class entry"),
            ("label = s:mainframe:Linux:3.x\n", 3, "unknown class"),
            ("sig = *:64:0:*:*,*:mss::0\n", 3, "before any `label`"),
            (
                "label = s:!:nmap:scan\nsig = *:64-:0:1460:1024,0:mss::0\n",
                4,
                "sys",
            ),
            (
                "label = s:unix:Linux:3.x\nsig = *:64:0:*:*,*:mss::0\nfrob = 1\n",
                5,
                "unknown field",
            ),
        ];
        for (body, line, needle) in cases {
            let e = db(body).unwrap_err();
            assert_eq!(e.line, line, "{body}: {e}");
            assert!(e.message.contains(needle), "{body}: {e}");
        }
    }

    #[test]
    fn exact_beats_generic_beats_fuzzy() {
        let d = db("label = g:unix:Linux:3.x\n\
                    sig = *:64:0:*:mss*10,*:mss,sok,ts,nop,ws:df,id+:0\n\
                    label = s:unix:Linux:3.11 and newer\n\
                    sig = *:64:0:*:mss*20,7:mss,sok,ts,nop,ws:df,id+:0\n")
        .unwrap();
        // 29200 = 20 × 1460: the specific signature, although the generic one comes first.
        let m = d
            .match_syn(&syn(57, 29200, 7, 1460, LINUX, quirk::DF | quirk::ID_PLUS), None)
            .unwrap();
        assert_eq!(m.label.text, "s:unix:Linux:3.11 and newer");
        assert!(!m.fuzzy);
        assert_eq!(m.distance, 7);
        // 14600 = 10 × 1460: only the generic one.
        let m = d
            .match_syn(&syn(64, 14600, 7, 1460, LINUX, quirk::DF | quirk::ID_PLUS), None)
            .unwrap();
        assert_eq!(m.label.text, "g:unix:Linux:3.x");
        // id+ gone and ecn added: fuzzy.
        let m = d
            .match_syn(&syn(64, 29200, 7, 1460, LINUX, quirk::DF | quirk::ECN), None)
            .unwrap();
        assert!(m.fuzzy);
        // An extra quirk that is not allowed to appear: no match.
        assert!(
            d.match_syn(
                &syn(
                    64,
                    29200,
                    7,
                    1460,
                    LINUX,
                    quirk::DF | quirk::ID_PLUS | quirk::SEQ_MINUS
                ),
                None
            )
            .is_none()
        );
        // TTL far below the initial TTL: fuzzy, distance guessed.
        let m = d
            .match_syn(&syn(20, 29200, 7, 1460, LINUX, quirk::DF | quirk::ID_PLUS), None)
            .unwrap();
        assert!(m.fuzzy);
        assert_eq!(m.distance, 12);
        // Another layout: nothing.
        assert!(
            d.match_syn(&syn(64, 29200, 7, 1460, &[2, 4, 8], quirk::DF), None)
                .is_none()
        );
    }

    #[test]
    fn version_window_forms_and_tools() {
        let d = db("label = s:unix:A:v6\nsig = 6:64:0:*:%1000,*:mss::0\n\
                    label = s:!:tool:scan\nsys = @unix,@win\nsig = *:64-:0:1460:1024,0:mss::0\n")
        .unwrap();
        let v4 = syn(64, 3000, 0, 1460, &[2], 0);
        assert!(
            d.match_syn(&v4, None).is_none(),
            "a 6: signature never matches IPv4"
        );
        let v6 = SynSignature { ip_version: 6, ..v4 };
        assert_eq!(d.match_syn(&v6, None).unwrap().label.name, "A");
        // Random-TTL tool signature: any TTL up to 64 matches exactly; no fuzzy match for tools.
        let scan = syn(41, 1024, 0, 1460, &[2], 0);
        let m = d.match_syn(&scan, None).unwrap();
        assert_eq!(m.label.class, None);
        assert!(!m.fuzzy);
        let fuzzy_scan = syn(41, 1024, 0, 1460, &[2], quirk::ECN);
        assert_eq!(d.match_syn(&fuzzy_scan, None), None);
        assert_eq!(d.labels[1].sys, vec!["@unix", "@win"]);
    }
}
