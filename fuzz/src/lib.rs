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

#[cfg(test)]
mod tests {
    use super::*;

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
