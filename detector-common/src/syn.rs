//! The TCP SYN signature (p0f v3 model): what the kernel extracts from a client's SYN, what the offline pcap
//! reader extracts the same way, and the compact key verdicts by signature are stored under.
//!
//! p0f writes a signature as `ver:ittl:olen:mss:wsize,scale:olayout:quirks:pclass` (p0f README §5). The kernel
//! records the raw observations (the TTL as seen, option kinds in order); userspace derives the initial TTL and
//! the text form. The key deliberately excludes the observed TTL (it changes with the path) and uses the
//! initial-TTL guess instead, so one client stack keeps one key from any network position.

/// Most TCP option kinds recorded per SYN (the options area is at most 40 bytes).
pub const SYN_MAX_OPTIONS: usize = 16;
/// Options a SYN parser walks at most (the kernel's loop bound); a longer run of options is the `bad` quirk.
/// Real stacks send 4–10 options; only NOP padding gets near this.
pub const SYN_MAX_OPTIONS_WALKED: usize = 20;

/// TCP option kinds with a meaning in p0f's option layout.
pub mod option_kind {
    pub const EOL: u8 = 0;
    pub const NOP: u8 = 1;
    pub const MSS: u8 = 2;
    pub const WS: u8 = 3;
    pub const SACK_PERMITTED: u8 = 4;
    pub const SACK: u8 = 5;
    pub const TIMESTAMP: u8 = 8;
}

/// p0f quirks, one bit each in [`SynSignature::quirks`].
pub mod quirk {
    /// IPv4 "don't fragment" set.
    pub const DF: u32 = 1 << 0;
    /// DF set but IP ID non-zero.
    pub const ID_PLUS: u32 = 1 << 1;
    /// DF not set but IP ID zero.
    pub const ID_MINUS: u32 = 1 << 2;
    /// Explicit congestion notification: ECN bits in IP, or ECE/CWR in TCP.
    pub const ECN: u32 = 1 << 3;
    /// IPv4 reserved ("must be zero") flag set.
    pub const ZERO_PLUS: u32 = 1 << 4;
    /// IPv6 flow label non-zero.
    pub const FLOW: u32 = 1 << 5;
    /// Sequence number zero.
    pub const SEQ_MINUS: u32 = 1 << 6;
    /// ACK number non-zero while the ACK flag is off.
    pub const ACK_PLUS: u32 = 1 << 7;
    /// ACK flag set but ACK number zero.
    pub const ACK_MINUS: u32 = 1 << 8;
    /// Urgent pointer non-zero while the URG flag is off.
    pub const UPTR_PLUS: u32 = 1 << 9;
    /// URG flag set.
    pub const URGF_PLUS: u32 = 1 << 10;
    /// PUSH flag set.
    pub const PUSHF_PLUS: u32 = 1 << 11;
    /// Own timestamp zero.
    pub const TS1_MINUS: u32 = 1 << 12;
    /// Peer timestamp non-zero (on a SYN, where it must be zero).
    pub const TS2_PLUS: u32 = 1 << 13;
    /// Non-zero data in the options area after EOL.
    pub const OPT_PLUS: u32 = 1 << 14;
    /// Window scale above 14.
    pub const EXWS: u32 = 1 << 15;
    /// Malformed options (a length running past the options area, or below 2).
    pub const BAD: u32 = 1 << 16;

    /// In p0f's text order.
    pub const ALL: [(u32, &str); 17] = [
        (DF, "df"),
        (ID_PLUS, "id+"),
        (ID_MINUS, "id-"),
        (ECN, "ecn"),
        (ZERO_PLUS, "0+"),
        (FLOW, "flow"),
        (SEQ_MINUS, "seq-"),
        (ACK_PLUS, "ack+"),
        (ACK_MINUS, "ack-"),
        (UPTR_PLUS, "uptr+"),
        (URGF_PLUS, "urgf+"),
        (PUSHF_PLUS, "pushf+"),
        (TS1_MINUS, "ts1-"),
        (TS2_PLUS, "ts2+"),
        (OPT_PLUS, "opt+"),
        (EXWS, "exws"),
        (BAD, "bad"),
    ];
}

/// What a SYN reveals about the client's TCP/IP stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SynSignature {
    /// 4 or 6.
    pub ip_version: u8,
    /// TTL / hop limit as observed.
    pub ttl: u8,
    /// IPv4 options length in bytes (0 for IPv6).
    pub ip_opts_len: u8,
    /// Entries used in `options`.
    pub option_count: u8,
    /// MSS option value, 0 if absent.
    pub mss: u16,
    /// TCP window size.
    pub window: u16,
    /// Window scale option value, 0 if absent.
    pub wscale: u8,
    /// Bytes after an EOL option (p0f's `eol+N`).
    pub eol_pad: u8,
    /// 1 if the SYN carries payload (p0f's pclass `+`).
    pub payload: u8,
    pub _pad: u8,
    /// `quirk::*` bits.
    pub quirks: u32,
    /// Option kinds in wire order (EOL included, as the last one when present).
    pub options: [u8; SYN_MAX_OPTIONS],
}

/// The p0f quirks of an IPv4 header (its first 20 bytes): df, id+, id-, 0+, ecn. One definition for the kernel
/// and the offline parser.
#[inline(always)]
pub const fn ipv4_quirks(h: &[u8; 20]) -> u32 {
    let frag = u16::from_be_bytes([h[6], h[7]]);
    let id = u16::from_be_bytes([h[4], h[5]]);
    let mut q = 0;
    if frag & 0x4000 != 0 {
        q |= quirk::DF;
        if id != 0 {
            q |= quirk::ID_PLUS;
        }
    } else if id == 0 {
        q |= quirk::ID_MINUS;
    }
    if frag & 0x8000 != 0 {
        q |= quirk::ZERO_PLUS;
    }
    if h[1] & 0x03 != 0 {
        q |= quirk::ECN;
    }
    q
}

/// The p0f quirks of an IPv6 header (its first 8 bytes): ecn, flow.
#[inline(always)]
pub const fn ipv6_quirks(h: &[u8; 8]) -> u32 {
    let mut q = 0;
    if ((h[0] << 4) | (h[1] >> 4)) & 0x03 != 0 {
        q |= quirk::ECN;
    }
    if (h[1] & 0x0f) != 0 || h[2] != 0 || h[3] != 0 {
        q |= quirk::FLOW;
    }
    q
}

/// The p0f quirks of a TCP header's fixed 20 bytes: seq-, ack+, ack-, urgf+, uptr+, pushf+, ecn (ECE/CWR).
#[inline(always)]
pub const fn tcp_quirks(t: &[u8; 20]) -> u32 {
    const ACK: u8 = 0x10;
    const URG: u8 = 0x20;
    const PSH: u8 = 0x08;
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
    let flags = t[13];
    let urgent = u16::from_be_bytes([t[18], t[19]]);
    let mut q = 0;
    if seq == 0 {
        q |= quirk::SEQ_MINUS;
    }
    if flags & ACK == 0 && ack != 0 {
        q |= quirk::ACK_PLUS;
    }
    if flags & ACK != 0 && ack == 0 {
        q |= quirk::ACK_MINUS;
    }
    if flags & URG != 0 {
        q |= quirk::URGF_PLUS;
    } else if urgent != 0 {
        q |= quirk::UPTR_PLUS;
    }
    if flags & PSH != 0 {
        q |= quirk::PUSHF_PLUS;
    }
    if flags & 0xc0 != 0 {
        q |= quirk::ECN;
    }
    q
}

/// p0f's initial-TTL guess: the next common starting value at or above the observed TTL.
pub const fn initial_ttl(ttl: u8) -> u8 {
    match ttl {
        0..=32 => 32,
        33..=64 => 64,
        65..=128 => 128,
        _ => 255,
    }
}

impl SynSignature {
    /// The compact key of the signature for the kernel verdict map: FNV-1a over every field except the
    /// observed TTL (replaced by its initial-TTL guess). Written without loops over slices of runtime length
    /// so the XDP program can compute it too.
    #[inline(always)]
    pub fn key(&self) -> u64 {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut mix = |b: u8| {
            h ^= b as u64;
            h = h.wrapping_mul(PRIME);
        };
        mix(self.ip_version);
        mix(initial_ttl(self.ttl));
        mix(self.ip_opts_len);
        mix(self.option_count);
        mix(self.mss as u8);
        mix((self.mss >> 8) as u8);
        mix(self.window as u8);
        mix((self.window >> 8) as u8);
        mix(self.wscale);
        mix(self.eol_pad);
        mix(self.payload);
        mix(self.quirks as u8);
        mix((self.quirks >> 8) as u8);
        mix((self.quirks >> 16) as u8);
        mix((self.quirks >> 24) as u8);
        let mut i = 0;
        while i < SYN_MAX_OPTIONS {
            mix(self.options[i]);
            i += 1;
        }
        h
    }
}

const _: () = assert!(core::mem::size_of::<SynSignature>() == 32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ignores_hops_but_not_the_stack() {
        let a = SynSignature {
            ip_version: 4,
            ttl: 57,
            mss: 1460,
            window: 64240,
            ..Default::default()
        };
        let b = SynSignature { ttl: 61, ..a };
        let c = SynSignature { window: 65535, ..a };
        let d = SynSignature { ttl: 120, ..a };
        assert_eq!(a.key(), b.key());
        assert_ne!(a.key(), c.key());
        assert_ne!(a.key(), d.key());
    }
}
