//! One 16-byte address key for both families, so every per-source map serves IPv4 and IPv6 alike.
//!
//! IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`, RFC 4291 §2.5.5.2). In the prefix tries an IPv4
//! prefix of length L is stored with length `96 + L`.

/// A source address (or a masked prefix) as a map key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    pub addr: [u8; 16],
}

/// Bits in front of an IPv4-mapped address.
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

impl AddrKey {
    /// The IPv4-mapped key for an IPv4 address given as its 4 network-order bytes.
    #[inline(always)]
    pub const fn from_v4(octets: [u8; 4]) -> Self {
        Self {
            addr: [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
            ],
        }
    }

    #[inline(always)]
    pub const fn from_v6(octets: [u8; 16]) -> Self {
        Self { addr: octets }
    }

    /// Whether this key holds an IPv4-mapped address.
    #[inline(always)]
    pub const fn is_v4(&self) -> bool {
        let a = &self.addr;
        a[0] == 0
            && a[1] == 0
            && a[2] == 0
            && a[3] == 0
            && a[4] == 0
            && a[5] == 0
            && a[6] == 0
            && a[7] == 0
            && a[8] == 0
            && a[9] == 0
            && a[10] == 0xff
            && a[11] == 0xff
    }

    /// The key of the prefix-scope decision covering this address: its /24 (IPv4) or /64 (IPv6).
    #[inline(always)]
    pub const fn prefix_scope(&self) -> Self {
        let mut out = *self;
        if self.is_v4() {
            out.addr[15] = 0;
        } else {
            out.addr[8] = 0;
            out.addr[9] = 0;
            out.addr[10] = 0;
            out.addr[11] = 0;
            out.addr[12] = 0;
            out.addr[13] = 0;
            out.addr[14] = 0;
            out.addr[15] = 0;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapping_and_prefix_scope() {
        let k = AddrKey::from_v4([192, 0, 2, 77]);
        assert!(k.is_v4());
        assert_eq!(k.prefix_scope(), AddrKey::from_v4([192, 0, 2, 0]));
        let mut v6 = [0u8; 16];
        v6[0] = 0x20;
        v6[1] = 0x01;
        v6[15] = 9;
        v6[8] = 1;
        let k6 = AddrKey::from_v6(v6);
        assert!(!k6.is_v4());
        let p = k6.prefix_scope();
        assert_eq!(&p.addr[..8], &v6[..8]);
        assert_eq!(&p.addr[8..], &[0u8; 8]);
    }
}
