//! Input formats and data shared by the fuzz targets and the seed generator (`examples/make_seeds.rs`): the
//! `client_hello` input format ([`Flow`]) and the small p0f database of `capture` and `p0f_db` ([`P0F_DB`]).
//!
//! `client_hello` input: the first client bytes of a TCP flow as segments with arbitrary sequence numbers.
//!
//! ```text
//! byte 0       flags: bit 0 = the SYN was seen (`StreamBuffer::set_isn(isn)` before the segments)
//! bytes 1..5   ISN, u32 big-endian
//! then up to MAX_SEGMENTS segments, until the input ends:
//!   4 bytes    sequence number, u32 big-endian (any value: before, inside or far past the stream)
//!   2 bytes    length, u16 big-endian; high bit clear: that many payload bytes follow (fewer if the input
//!              ends); high bit set: one byte follows, repeated `length & 0x7fff` times (so that a small
//!              input can still reach the 16 KiB bound)
//!   payload
//! ```

/// A small p0f database in `p0f.fp` format (written for the fuzz targets, not taken from p0f's): every field
/// form the parser knows, so that `capture` exercises the matcher and `p0f_db` starts from it.
pub const P0F_DB: &str = "\
; aqd fuzz database
classes = win,unix,other

[mtu]
label = Ethernet or modem
sig   = 1500

[tcp:request]
label = s:unix:Linux:3.11 and newer
sig   = *:64:0:*:mss*20,10:mss,sok,ts,nop,ws:df,id+:0
sig   = *:64:0:*:mss*20,7:mss,sok,ts,nop,ws:df,id+:0
label = g:unix:Linux:3.x
sig   = *:64:0:*:mss*10,*:mss,sok,ts,nop,ws:df,id+:0
label = s:unix:Mac OS X:10.x
sig   = *:64:0:*:65535,6:mss,nop,ws,nop,nop,ts,sok,eol+1:df,id+:0
sig   = 4:64+0:0:1460:65535,6:mss,nop,ws,nop,nop,ts,sok,eol+1:df,ecn:0
label = s:win:Windows:7 or 8
sig   = *:128:0:*:8192,8:mss,nop,ws,nop,nop,sok:df,id+:0
sig   = 4:128:0:1460:mtu*4,8:mss,nop,ws,nop,nop,sok:df,id+:0
label = g:win:Windows:NT kernel
sig   = *:128:0:*:%8192,*:mss,nop,nop,sok:df,id+:0
label = s:other:Printer:x
sig   = 6:255:0:1440:%1000,0:mss,?30,nop,ws::+
label = s:!:NMap:SYN scan
sys   = @unix,@win
sig   = *:64-:0:1460:1024,0:mss::0
sig   = 4:64-:0:265:%512,0:mss,sok,ts:ack+:0

[tcp:response]
label = s:unix:Linux:3.x
sig   = *:64:0:*:mss*10,0:mss:df:0
";

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Most segments taken from one input.
pub const MAX_SEGMENTS: usize = 64;

const FLAG_SYN: u8 = 1;
const FILL: u16 = 0x8000;

/// One TCP segment's payload and sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment<'a> {
    pub seq: u32,
    pub payload: Payload<'a>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload<'a> {
    Bytes(&'a [u8]),
    Fill { byte: u8, len: usize },
}

/// A decoded `client_hello` input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flow<'a> {
    /// The SYN's sequence number, when the SYN was seen.
    pub isn: Option<u32>,
    pub segments: Vec<Segment<'a>>,
}

impl<'a> Flow<'a> {
    /// Decodes any bytes (every input is valid; a short one gives fewer segments).
    pub fn decode(data: &'a [u8]) -> Self {
        let mut flow = Flow::default();
        let Some((header, mut rest)) = data.split_first_chunk::<5>() else {
            return flow;
        };
        if header[0] & FLAG_SYN != 0 {
            flow.isn = Some(u32::from_be_bytes([header[1], header[2], header[3], header[4]]));
        }
        while flow.segments.len() < MAX_SEGMENTS {
            let Some((seg, after)) = rest.split_first_chunk::<6>() else {
                break;
            };
            let seq = u32::from_be_bytes([seg[0], seg[1], seg[2], seg[3]]);
            let len = u16::from_be_bytes([seg[4], seg[5]]);
            let payload = if len & FILL != 0 {
                let Some((&byte, after)) = after.split_first() else {
                    break;
                };
                rest = after;
                Payload::Fill {
                    byte,
                    len: usize::from(len & !FILL),
                }
            } else {
                let (bytes, after) = after.split_at(after.len().min(usize::from(len)));
                rest = after;
                Payload::Bytes(bytes)
            };
            flow.segments.push(Segment { seq, payload });
        }
        flow
    }

    /// The input that decodes to `isn` and `segments` (payloads of at most 0x7fff bytes each).
    pub fn encode(isn: Option<u32>, segments: &[(u32, &[u8])]) -> Vec<u8> {
        let mut out = vec![u8::from(isn.is_some())];
        out.extend_from_slice(&isn.unwrap_or(0).to_be_bytes());
        for (seq, payload) in segments.iter().take(MAX_SEGMENTS) {
            let len = payload.len().min(usize::from(!FILL));
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&(len as u16).to_be_bytes());
            out.extend_from_slice(&payload[..len]);
        }
        out
    }
}

/// `lockout` input: networks, one after another until the input ends (at most [`MAX_NETS`]). Each is a tag
/// byte, then:
///
/// ```text
/// tag % 3 == 0   IPv4: 4 address bytes, 1 byte prefix length (mod 33)
/// tag % 3 == 1   IPv6: 16 address bytes, 1 byte prefix length (mod 129)
/// tag % 3 == 2   IPv4-mapped IPv6 (`::ffff:a.b.c.d/96+n`): 4 address bytes, 1 byte n (mod 33)
/// ```
///
/// Host bits are kept as given (the guard must clear them itself).
pub fn decode_nets(mut data: &[u8]) -> Vec<IpNet> {
    let mut nets = Vec::new();
    while nets.len() < MAX_NETS {
        let Some((&tag, rest)) = data.split_first() else {
            break;
        };
        let net = match tag % 3 {
            1 => {
                let Some((addr, rest)) = rest.split_first_chunk::<17>() else {
                    break;
                };
                data = rest;
                let a: [u8; 16] = addr[..16].try_into().expect("16 bytes");
                Ipv6Net::new(Ipv6Addr::from(a), addr[16] % 129).map(IpNet::V6)
            }
            tag => {
                let Some((addr, rest)) = rest.split_first_chunk::<5>() else {
                    break;
                };
                data = rest;
                let a = Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]);
                let len = addr[4] % 33;
                if tag == 0 {
                    Ipv4Net::new(a, len).map(IpNet::V4)
                } else {
                    Ipv6Net::new(a.to_ipv6_mapped(), 96 + len).map(IpNet::V6)
                }
            }
        };
        nets.push(net.expect("prefix lengths are reduced to the family's range"));
    }
    nets
}

/// The input that decodes to `nets` (IPv4-mapped IPv6 networks of /96 or longer use the mapped tag).
pub fn encode_nets(nets: &[IpNet]) -> Vec<u8> {
    let mut out = Vec::new();
    for net in nets {
        match net {
            IpNet::V4(n) => {
                out.push(0);
                out.extend_from_slice(&n.addr().octets());
                out.push(n.prefix_len());
            }
            IpNet::V6(n) => match n.addr().to_ipv4_mapped() {
                Some(v4) if n.prefix_len() >= 96 => {
                    out.push(2);
                    out.extend_from_slice(&v4.octets());
                    out.push(n.prefix_len() - 96);
                }
                _ => {
                    out.push(1);
                    out.extend_from_slice(&n.addr().octets());
                    out.push(n.prefix_len());
                }
            },
        }
    }
    out
}

/// Most networks taken from one `lockout` input.
pub const MAX_NETS: usize = 24;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nets_encode_then_decode() {
        let nets: Vec<IpNet> = [
            "198.19.11.7/24",
            "::/8",
            "::ffff:198.19.11.1/128",
            "2001:db8::1/64",
            "0.0.0.0/0",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(decode_nets(&encode_nets(&nets)), nets);
        // A cut-off net ends the list.
        assert_eq!(
            decode_nets(&[0, 10, 0, 0, 1, 8, 1, 0]),
            vec!["10.0.0.1/8".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn encode_then_decode() {
        let a = [1u8, 2, 3];
        let b = [0x16u8; 40];
        let data = Flow::encode(Some(7), &[(8, &a), (u32::MAX, &b)]);
        let flow = Flow::decode(&data);
        assert_eq!(flow.isn, Some(7));
        assert_eq!(
            flow.segments,
            vec![
                Segment {
                    seq: 8,
                    payload: Payload::Bytes(&a)
                },
                Segment {
                    seq: u32::MAX,
                    payload: Payload::Bytes(&b)
                },
            ]
        );
        // A fill segment, then a truncated one.
        let data = [
            0, 0, 0, 0, 0, 0, 0, 0, 1, 0x80, 0x10, 0xaa, 0, 0, 0, 2, 0, 9, 1, 2,
        ];
        let flow = Flow::decode(&data);
        assert_eq!(flow.isn, None);
        assert_eq!(flow.segments[0].payload, Payload::Fill { byte: 0xaa, len: 16 });
        assert_eq!(flow.segments[1].payload, Payload::Bytes(&[1, 2]));
    }
}
