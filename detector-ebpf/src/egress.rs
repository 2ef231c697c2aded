//! `aqd_egress`: a TC egress program that learns the server's ISN from its SYN-ACK.
//!
//! A handshake is verified when the client's ACK acknowledges the server's ISN, which a client forging its
//! source address never sees. The SYN-ACK leaves before the ACK can arrive, so the ISN is always known in
//! time, whatever the NIC's batching. The SYN-ACK is the server's own word on both ISNs (see
//! `detector_common::HalfOpen`); this program records them and never drops (`TC_ACT_OK` always).
//!
//! Reads go through `bpf_skb_load_bytes` (`TcContext::load`): an outgoing skb's headers need not be linear.
//! A VLAN tag on egress is normally in the skb's metadata, not the data; one in-band tag is skipped.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use detector_common::{AddrKey, FlowTuple, HalfOpen, flow::half_open_flag, flow_counter};

use crate::{
    account::count_flow,
    clock::Clock,
    maps::{CONFIG, DEFAULT_CONFIG, HALF_OPEN, PROTECTED_PORTS},
};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[classifier]
pub fn aqd_egress(ctx: TcContext) -> i32 {
    learn_server_isn(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn learn_server_isn(ctx: &TcContext) -> Option<()> {
    let mut l3 = 14usize;
    let mut ether_type = u16::from_be(ctx.load::<u16>(12).ok()?);
    if ether_type == ETH_P_8021Q {
        ether_type = u16::from_be(ctx.load::<u16>(16).ok()?);
        l3 += 4;
    }
    // The SYN-ACK's addresses, and where its TCP header starts.
    let (server, client, l4) = match ether_type {
        ETH_P_IPV4 => {
            let ip = ctx.load::<[u8; 20]>(l3).ok()?;
            let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
            if ip[0] >> 4 != 4 || ip[9] != IPPROTO_TCP || fragment != 0 {
                return None;
            }
            let l4 = l3 + (ip[0] & 0x0f) as usize * 4;
            (
                AddrKey::from_v4([ip[12], ip[13], ip[14], ip[15]]),
                AddrKey::from_v4([ip[16], ip[17], ip[18], ip[19]]),
                l4,
            )
        }
        ETH_P_IPV6 => {
            // A server's SYN-ACK carries no extension headers.
            let next = ctx.load::<u8>(l3 + 6).ok()?;
            if next != IPPROTO_TCP {
                return None;
            }
            (
                AddrKey::from_v6(ctx.load::<[u8; 16]>(l3 + 8).ok()?),
                AddrKey::from_v6(ctx.load::<[u8; 16]>(l3 + 24).ok()?),
                l3 + 40,
            )
        }
        _ => return None,
    };
    if l4 > 128 {
        return None;
    }
    let tcp = ctx.load::<[u8; 14]>(l4).ok()?;
    if tcp[13] & (TCP_SYN | TCP_ACK) != TCP_SYN | TCP_ACK {
        return None;
    }
    let server_port = u16::from_be_bytes([tcp[0], tcp[1]]);
    if !matches!(PROTECTED_PORTS.get(server_port as u32), Some(p) if *p != 0) {
        return None;
    }
    let tuple = FlowTuple {
        src: client,
        dst: server,
        src_port: u16::from_be_bytes([tcp[2], tcp[3]]),
        dst_port: server_port,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    // The server answers the SYN it accepted: its acknowledgement names that SYN's ISN, whatever other SYNs
    // of the tuple passed before or after.
    match HALF_OPEN.get_ptr_mut(&tuple) {
        Some(entry) => {
            // SAFETY: map memory from a successful lookup.
            let entry = unsafe { &mut *entry };
            entry.client_isn = ack.wrapping_sub(1);
            entry.server_isn = seq;
            entry.flags |= half_open_flag::SERVER_ISN;
        }
        None => {
            // Evicted (a SYN flood churns this map) or made before aqd ran: the SYN-ACK alone is enough to
            // verify the handshake; the SYN's signature key stays unknown (0).
            let config = CONFIG.get(0).unwrap_or(&DEFAULT_CONFIG);
            let entry = HalfOpen {
                first_seen_ns: Clock::new(config).coarse(),
                client_isn: ack.wrapping_sub(1),
                server_isn: seq,
                flags: half_open_flag::SERVER_ISN,
                ..HalfOpen::default()
            };
            let _ = HALF_OPEN.insert(&tuple, &entry, 0);
        }
    }
    count_flow(flow_counter::SERVER_ISN);
    Some(())
}
