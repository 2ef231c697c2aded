//! Crafted test frames. IP and transport headers (with correct lengths and checksums) come from etherparse;
//! Ethernet and VLAN tags are prepended here so any tag stack can be built.

use std::net::IpAddr;

use etherparse::PacketBuilder;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
pub const ETH_P_ARP: u16 = 0x0806;

/// Transport of a test frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP SYN (no ACK): a new connection.
    TcpSyn,
    /// TCP ACK (established-flow data).
    TcpAck,
    Udp,
    /// ICMP echo request (ICMPv6 for IPv6): no ports.
    Icmp,
}

/// A frame to build. Source and destination must be of the same family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub transport: Transport,
    /// VLAN tags, outermost first: (TPID, VLAN id). Use `ETH_P_8021AD` outer + `ETH_P_8021Q` inner for QinQ.
    pub vlans: Vec<(u16, u16)>,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(src: &str, dst: &str, transport: Transport, dst_port: u16) -> Self {
        Self {
            src: src.parse().expect("valid source address"),
            dst: dst.parse().expect("valid destination address"),
            src_port: 40000,
            dst_port,
            transport,
            vlans: Vec::new(),
            payload: Vec::new(),
        }
    }

    pub fn tcp_syn(src: &str, dst: &str, dst_port: u16) -> Self {
        Self::new(src, dst, Transport::TcpSyn, dst_port)
    }

    pub fn tcp_ack(src: &str, dst: &str, dst_port: u16) -> Self {
        Self::new(src, dst, Transport::TcpAck, dst_port)
    }

    pub fn udp(src: &str, dst: &str, dst_port: u16) -> Self {
        Self::new(src, dst, Transport::Udp, dst_port)
    }

    pub fn with_vlans(mut self, vlans: &[(u16, u16)]) -> Self {
        self.vlans = vlans.to_vec();
        self
    }

    pub fn with_payload(mut self, len: usize) -> Self {
        self.payload = vec![0xab; len];
        self
    }

    /// The IP packet (IP header + transport + payload), without the link layer.
    pub fn ip_packet(&self) -> Vec<u8> {
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
            _ => panic!("source and destination must be of the same family"),
        };
        let mut out = Vec::new();
        let result = match self.transport {
            Transport::TcpSyn => ip
                .tcp(self.src_port, self.dst_port, 1000, 64240)
                .syn()
                .write(&mut out, &self.payload),
            Transport::TcpAck => ip
                .tcp(self.src_port, self.dst_port, 1000, 64240)
                .ack(1)
                .write(&mut out, &self.payload),
            Transport::Udp => ip
                .udp(self.src_port, self.dst_port)
                .write(&mut out, &self.payload),
            Transport::Icmp => match self.src {
                IpAddr::V4(_) => ip.icmpv4_echo_request(1, 1).write(&mut out, &self.payload),
                IpAddr::V6(_) => ip.icmpv6_echo_request(1, 1).write(&mut out, &self.payload),
            },
        };
        result.expect("etherparse builds the packet");
        out
    }

    /// The whole Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        let ether_type = if self.src.is_ipv4() {
            ETH_P_IPV4
        } else {
            ETH_P_IPV6
        };
        ethernet(&self.vlans, ether_type, &self.ip_packet())
    }
}

/// Ethernet header (fixed test MACs) + VLAN tags + `payload`.
pub fn ethernet(vlans: &[(u16, u16)], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + 4 * vlans.len() + payload.len());
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // destination
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // source
    for (tpid, vid) in vlans {
        out.extend_from_slice(&tpid.to_be_bytes());
        out.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    out.extend_from_slice(&ether_type.to_be_bytes());
    out.extend_from_slice(payload);
    out
}
