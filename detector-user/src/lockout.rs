//! The lockout guard: the one place that decides whether a change would cut off a management network, overlap
//! the allowlist, or cover too many addresses.
//!
//! Every origin asks it before writing policy: the CLI and the control socket, the offline CLI, imports and
//! list files (through [`crate::enforce::Enforcer`]), the config's `lists.deny` (at parse time) and `deny_files`
//! (when they are read), and the model. A decision a peer made (the fleet, later) is checked with
//! [`Guard::admit_remote`] before it is applied like any other.
//!
//! Comparisons are made in the kernel's key space, where every address is 128 bits and an IPv4 address
//! `a.b.c.d` is stored as `::ffff:a.b.c.d` (`AddrKey::from_v4`): `::ffff:198.19.11.1` *is* `198.19.11.1` to the
//! maps, and `::/8` covers `::ffff:0:0/96`, i.e. every IPv4 address. Comparing families separately let both
//! through.
//!
//! Management networks are absolute (`--force` never overrides them); the allowlist-overlap and minimum-prefix
//! guards yield to `--force`. Fingerprint verdicts are keyed by fingerprint, not address, so they cannot be
//! checked here: the kernel passes management sources ahead of every rule (the `MANAGEMENT` map, checked
//! first in the policy walk), so a verdict on the management host's own client never reaches it.

use std::{fmt, net::Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;

/// `::ffff:0:0/96`: where the kernel keeps every IPv4 address.
const V4_MAPPED: Ipv6Net = match Ipv6Net::new(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96) {
    Ok(net) => net,
    Err(_) => panic!("a valid prefix"),
};

/// What a change would do to the addresses it covers (named in refusals).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Block,
    Throttle,
    Monitor,
    Deny,
    /// Removing an allowlist entry.
    Disallow,
}

impl Verb {
    pub fn name(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Throttle => "throttle",
            Self::Monitor => "monitor",
            Self::Deny => "deny",
            Self::Disallow => "disallow",
        }
    }
}

impl From<detector_common::Action> for Verb {
    fn from(action: detector_common::Action) -> Self {
        match action {
            detector_common::Action::Block => Self::Block,
            detector_common::Action::Throttle => Self::Throttle,
            detector_common::Action::Monitor => Self::Monitor,
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A refusal: what was asked, and which rule refused it.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum LockoutError {
    #[error(
        "refusing to {verb} {target}: it {how} the management network {network} (protection.management){note}; \
         management networks are never blocked, denied, throttled or disallowed, --force or not"
    )]
    Management {
        verb: Verb,
        target: IpNet,
        network: IpNet,
        /// "covers", "is inside" or "is".
        how: &'static str,
        /// Why the families differ, when they do (IPv4-mapped IPv6), else empty.
        note: &'static str,
    },
    #[error(
        "refusing to {verb} {target}: it overlaps the allowlist entry {entry}; remove that first or use --force"
    )]
    Allowlisted { verb: Verb, target: IpNet, entry: IpNet },
    #[error(
        "refusing to {verb} {target}: prefixes shorter than /{min} ({family}) need --force (this one covers \
         {count} addresses)"
    )]
    TooBroad {
        verb: Verb,
        target: IpNet,
        min: u8,
        family: &'static str,
        count: String,
    },
}

/// The shortest prefixes that may be blocked or denied without `--force`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MinPrefix {
    pub v4: u8,
    pub v6: u8,
}

/// The 128-bit prefix the kernel keys `net` under: IPv4 `a.b.c.d/n` is `::ffff:a.b.c.d/(96+n)`; IPv6 as given.
/// Host bits are cleared.
pub fn kernel_net(net: IpNet) -> Ipv6Net {
    match net.trunc() {
        IpNet::V4(n) => Ipv6Net::new(n.addr().to_ipv6_mapped(), 96 + n.prefix_len())
            .expect("96 + an IPv4 prefix length is at most 128"),
        IpNet::V6(n) => n,
    }
}

/// The IPv4 network an IPv6 prefix inside `::ffff:0:0/96` stands for (the kernel's view of it).
fn as_v4(net: Ipv6Net) -> Option<Ipv4Net> {
    if !V4_MAPPED.contains(&net) {
        return None;
    }
    let addr = net.addr().to_ipv4_mapped()?;
    Ipv4Net::new(addr, net.prefix_len() - 96).ok()
}

/// Whether two networks share any address in the kernel's key space (one contains the other).
pub fn overlaps(a: IpNet, b: IpNet) -> bool {
    let (a, b) = (kernel_net(a), kernel_net(b));
    a.contains(&b) || b.contains(&a)
}

/// Whether two networks are the same kernel entry (`198.19.11.0/24` and `::ffff:198.19.11.0/120` are).
pub fn same_slot(a: IpNet, b: IpNet) -> bool {
    kernel_net(a) == kernel_net(b)
}

/// The guard, holding the management networks it protects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Guard {
    management: Vec<IpNet>,
}

impl Guard {
    /// A guard for these management networks (duplicates, also across families, are kept once).
    pub fn new(management: impl IntoIterator<Item = IpNet>) -> Self {
        let mut kept: Vec<IpNet> = Vec::new();
        for net in management {
            // Kept in the form the model and views compare sources with: `::ffff:198.19.11.0/120` is the IPv4
            // network 198.19.11.0/24 (IPv4 sources arrive as IPv4).
            let net = match net.trunc() {
                IpNet::V6(v6) => as_v4(v6).map_or(IpNet::V6(v6), IpNet::V4),
                v4 => v4,
            };
            if !kept.iter().any(|k| same_slot(*k, net)) {
                kept.push(net);
            }
        }
        Self { management: kept }
    }

    /// The protected networks (IPv4-mapped ones as IPv4).
    pub fn management(&self) -> &[IpNet] {
        &self.management
    }

    /// Whether `addr` is in a management network (the kernel's view: `::ffff:a.b.c.d` is `a.b.c.d`).
    pub fn is_management(&self, addr: std::net::IpAddr) -> bool {
        self.management_hit(IpNet::from(addr)).is_some()
    }

    /// The first management network `target` shares an address with.
    pub fn management_hit(&self, target: IpNet) -> Option<IpNet> {
        self.management.iter().copied().find(|m| overlaps(*m, target))
    }

    /// Refuses any change that touches a management network; nothing overrides this.
    pub fn check_management(&self, verb: Verb, target: IpNet) -> Result<(), LockoutError> {
        let Some(network) = self.management_hit(target) else {
            return Ok(());
        };
        let (t, m) = (kernel_net(target), kernel_net(network));
        let how = if t == m {
            "is"
        } else if t.contains(&m) {
            "covers"
        } else {
            "is inside"
        };
        let note = match (target, network) {
            (IpNet::V6(_), IpNet::V4(_)) if t.contains(&V4_MAPPED) => {
                " (it covers ::ffff:0:0/96, where the kernel keeps every IPv4 address)"
            }
            (IpNet::V6(_), IpNet::V4(_)) => {
                " (an IPv4-mapped IPv6 address is the IPv4 address to the kernel)"
            }
            (IpNet::V4(_), IpNet::V6(_)) => {
                " (the management network is written as IPv4-mapped IPv6, which the kernel keys as IPv4)"
            }
            _ => "",
        };
        Err(LockoutError::Management {
            verb,
            target,
            network,
            how,
            note,
        })
    }

    /// The guard for a block, throttle, monitor or deny: management (absolute), then — unless `force` — the
    /// allowlist and the minimum prefix. A prefix inside `::ffff:0:0/96` is held to the IPv4 minimum (it is
    /// an IPv4 prefix to the kernel).
    pub fn check(
        &self,
        verb: Verb,
        target: IpNet,
        force: bool,
        allowlist: &[IpNet],
        min: MinPrefix,
    ) -> Result<(), LockoutError> {
        self.check_management(verb, target)?;
        if force {
            return Ok(());
        }
        if let Some(entry) = allowlist.iter().copied().find(|e| overlaps(*e, target)) {
            return Err(LockoutError::Allowlisted { verb, target, entry });
        }
        let kernel = kernel_net(target);
        let (len, min, bits, family) = match as_v4(kernel) {
            Some(v4) => (v4.prefix_len(), min.v4, 32, "IPv4"),
            None => (kernel.prefix_len(), min.v6, 128, "IPv6"),
        };
        if len < min {
            let count = match bits - len {
                s if s >= 64 => format!("2^{s}"),
                s => (1u64 << s).to_string(),
            };
            return Err(LockoutError::TooBroad {
                verb,
                target,
                min,
                family,
                count,
            });
        }
        Ok(())
    }

    /// The guard for removing an allowlist entry. Management networks live in the kernel's own map, which
    /// `disallow` never touches, so removing other allowlist entries cannot lock anyone out; removing the
    /// management network itself (in any spelling) is refused, so the operator learns it is not removable this
    /// way (edit `protection.management` and reload instead).
    pub fn check_disallow(&self, target: IpNet) -> Result<(), LockoutError> {
        match self.management.iter().copied().find(|m| same_slot(*m, target)) {
            Some(_) => self.check_management(Verb::Disallow, target),
            None => Ok(()),
        }
    }

    /// The hook for decisions made elsewhere (the fleet's peers): a remote decision touching one of this
    /// host's management networks is refused here, whatever the peer's own guard said.
    pub fn admit_remote(&self, action: detector_common::Action, target: IpNet) -> Result<(), LockoutError> {
        self.check_management(Verb::from(action), target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse::<IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
            .unwrap_or_else(|_| panic!("bad test net {s}"))
    }

    const MIN: MinPrefix = MinPrefix { v4: 16, v6: 48 };

    fn guard() -> Guard {
        Guard::new([n("198.19.11.0/24"), n("2001:db8:11::/48")])
    }

    #[test]
    fn kernel_key_space() {
        assert_eq!(
            kernel_net(n("198.19.11.0/24")),
            "::ffff:198.19.11.0/120".parse().unwrap()
        );
        assert_eq!(kernel_net(n("0.0.0.0/0")), V4_MAPPED);
        assert_eq!(kernel_net(n("2001:db8::/32")), "2001:db8::/32".parse().unwrap());
        assert!(overlaps(n("::ffff:10.0.0.0/104"), n("10.0.0.0/8")));
        assert!(overlaps(n("10.1.2.3/32"), n("10.0.0.0/8")));
        assert!(!overlaps(n("10.0.0.0/8"), n("11.0.0.0/8")));
        assert!(!overlaps(n("2001:db8::/32"), n("10.0.0.0/8")));
        assert!(same_slot(n("198.19.11.0/24"), n("::ffff:198.19.11.0/120")));
        assert_eq!(
            as_v4(kernel_net(n("::ffff:10.0.0.0/104"))),
            Some("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(as_v4(kernel_net(n("::/8"))), None);
    }

    /// Every attempt of the issue and its relatives: `(target, forced, refused by management?)`.
    #[test]
    fn management_is_absolute_in_every_spelling() {
        let g = guard();
        let table: &[(&str, bool)] = &[
            // Exact and prefix, IPv4.
            ("198.19.11.0/24", true),
            ("198.19.11.1", true),
            ("198.19.11.128/25", true),
            ("198.19.0.0/16", true),
            ("0.0.0.0/0", true),
            ("198.19.12.0/24", false),
            ("198.19.10.255", false),
            // IPv4-mapped IPv6: the same kernel keys.
            ("::ffff:198.19.11.1", true),
            ("::ffff:198.19.11.0/120", true),
            ("::ffff:198.19.0.0/112", true),
            ("::ffff:0:0/96", true),
            ("::ffff:0:0/95", true),
            ("::/8", true),
            ("::/1", true),
            ("::/0", true),
            ("::ffff:198.19.12.1", false),
            // IPv4-compatible (deprecated) and NAT64 addresses are other kernel keys.
            ("::198.19.11.1", false),
            ("64:ff9b::198.19.11.1", false),
            // IPv6 management network.
            ("2001:db8:11::1", true),
            ("2001:db8:11:5::/64", true),
            ("2001:db8::/32", true),
            ("2000::/3", true),
            ("2001:db8:12::/48", false),
            ("fe80::/10", false),
        ];
        for &(target, refused) in table {
            for force in [false, true] {
                for verb in [Verb::Block, Verb::Throttle, Verb::Monitor, Verb::Deny] {
                    let r = g.check(verb, n(target), force, &[], MinPrefix { v4: 0, v6: 0 });
                    assert_eq!(
                        matches!(r, Err(LockoutError::Management { .. })),
                        refused,
                        "{verb} {target} force={force}: {r:?}"
                    );
                    if !refused {
                        assert_eq!(r, Ok(()), "{verb} {target} force={force}");
                    }
                }
            }
            assert_eq!(
                g.admit_remote(detector_common::Action::Block, n(target)).is_err(),
                refused,
                "{target}"
            );
        }
    }

    #[test]
    fn refusals_say_what_and_why() {
        let g = guard();
        let e = g
            .check(Verb::Block, n("::ffff:198.19.11.1"), true, &[], MIN)
            .unwrap_err()
            .to_string();
        assert!(e.contains("refusing to block ::ffff:198.19.11.1/128"), "{e}");
        assert!(
            e.contains("management network 198.19.11.0/24") && e.contains("IPv4-mapped"),
            "{e}"
        );
        let e = g
            .check(Verb::Deny, n("::/8"), true, &[], MIN)
            .unwrap_err()
            .to_string();
        assert!(e.contains("covers the management network 198.19.11.0/24"), "{e}");
        assert!(e.contains("::ffff:0:0/96"), "{e}");
        let e = g
            .check(Verb::Throttle, n("198.19.11.7"), false, &[], MIN)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is inside the management network"), "{e}");
        let e = g.check_disallow(n("198.19.11.0/24")).unwrap_err().to_string();
        assert!(
            e.contains("refusing to disallow 198.19.11.0/24: it is the management network"),
            "{e}"
        );
    }

    #[test]
    fn disallow_refuses_the_management_entry_in_any_spelling_only() {
        let g = guard();
        for t in ["198.19.11.0/24", "::ffff:198.19.11.0/120", "2001:db8:11::/48"] {
            assert!(g.check_disallow(n(t)).is_err(), "{t}");
        }
        // Other allowlist entries are removable: the management map holds regardless.
        for t in ["198.19.11.7", "198.19.0.0/16", "::/0", "10.0.0.0/8"] {
            assert_eq!(g.check_disallow(n(t)), Ok(()), "{t}");
        }
    }

    #[test]
    fn allowlist_and_min_prefix_yield_to_force() {
        let g = Guard::new([]);
        let allow = [n("203.0.113.0/24")];
        for target in ["203.0.113.9", "::ffff:203.0.113.9", "203.0.0.0/16", "::/0"] {
            let r = g.check(Verb::Block, n(target), false, &allow, MinPrefix { v4: 0, v6: 0 });
            assert!(
                matches!(r, Err(LockoutError::Allowlisted { .. })),
                "{target}: {r:?}"
            );
            assert_eq!(g.check(Verb::Block, n(target), true, &allow, MIN), Ok(()));
        }
        for (target, refused) in [
            ("10.0.0.0/8", true),
            ("10.0.0.0/16", false),
            // An IPv4 /8 spelled as IPv6 is held to the IPv4 minimum.
            ("::ffff:10.0.0.0/104", true),
            ("::ffff:10.0.0.0/112", false),
            ("::/8", true),
            ("2001:db8::/32", true),
            ("2001:db8::/48", false),
        ] {
            let r = g.check(Verb::Deny, n(target), false, &[], MIN);
            assert_eq!(
                matches!(r, Err(LockoutError::TooBroad { .. })),
                refused,
                "{target}: {r:?}"
            );
            assert_eq!(g.check(Verb::Deny, n(target), true, &[], MIN), Ok(()));
        }
        let e = g
            .check(Verb::Deny, n("::ffff:10.0.0.0/104"), false, &[], MIN)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/16 (IPv4)") && e.contains("16777216"), "{e}");
    }

    #[test]
    fn management_spelled_as_mapped_ipv6_protects_the_ipv4_keys() {
        let g = Guard::new([n("::ffff:198.19.11.0/120")]);
        assert!(g.is_management("198.19.11.4".parse().unwrap()));
        let e = g
            .check(Verb::Block, n("198.19.11.4"), true, &[], MIN)
            .unwrap_err()
            .to_string();
        // Kept (and named in refusals) as the IPv4 network the kernel keys it as, which the model compares with.
        assert!(e.contains("198.19.11.0/24"), "{e}");
        assert_eq!(g.management(), &[n("198.19.11.0/24")]);
        // One entry per kernel slot.
        assert_eq!(
            Guard::new([n("198.19.11.0/24"), n("::ffff:198.19.11.0/120")])
                .management()
                .len(),
            1
        );
    }
}
