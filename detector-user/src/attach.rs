//! Attaching the XDP program to interfaces, over rtnetlink (`IFLA_XDP`).
//!
//! Why netlink and not a pinned `bpf_link`: an XDP attachment made over netlink belongs to the interface, so it
//! outlives the daemon without any pin, and replacing the program is atomic (`XDP_FLAGS_REPLACE` with the fd of
//! the program expected to be there, so a concurrent change by another tool is detected instead of clobbered).
//! Pinning XDP links is also refused (EPERM) by some kernels, including the one this was built on.
//!
//! The mode is always explicit (native or skb) and never falls back silently.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::programs::{
    ProgramInfo, SchedClassifier, loaded_programs,
    tc::{self, NlOptions, TcAttachOptions, TcAttachType},
};
use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use thiserror::Error;

use detector_common::{EGRESS_PROGRAM_NAME, PROGRAM_NAME};

const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const XDP_FLAGS_REPLACE: u32 = 1 << 4;

#[derive(Debug, Error)]
pub enum AttachError {
    #[error("interface {iface} does not exist (in this network namespace)")]
    NoSuchInterface { iface: String },
    #[error(
        "{iface} already runs aqd in {existing} mode; detach it first (`aqd detach --iface {iface}`) to switch \
         to {requested} mode"
    )]
    ModeMismatch {
        iface: String,
        existing: AttachMode,
        requested: AttachMode,
    },
    #[error(
        "{iface} already has another XDP program attached ({name}, id {id}); aqd does not replace programs it \
         did not load. Detach it first (e.g. `ip link set dev {iface} xdp off`)"
    )]
    Foreign { iface: String, name: String, id: u32 },
    #[error("{iface} has XDP programs attached in several modes; detach them first")]
    Multiple { iface: String },
    #[error("attaching to {iface} in {mode} mode failed: {source}{}", hint(*mode, source))]
    Netlink {
        iface: String,
        mode: AttachMode,
        #[source]
        source: io::Error,
    },
    #[error("reading the XDP state of {iface}: {source}")]
    Query {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "attaching the TC egress program to {iface} failed: {source} (aqd needs it to verify TCP handshakes; \
         without it no connection is observed)"
    )]
    Egress {
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("detaching the TC egress program from {iface} failed: {source}")]
    EgressDetach {
        iface: String,
        #[source]
        source: tc::TcError,
    },
    #[error("the program attached to {iface} (id {id}) cannot be opened: {source}")]
    Program {
        iface: String,
        id: u32,
        #[source]
        source: aya::programs::ProgramError,
    },
}

fn hint(mode: AttachMode, e: &io::Error) -> &'static str {
    match (mode, e.raw_os_error()) {
        (AttachMode::Native, Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
            " (the driver may not support native XDP; `--xdp-mode skb` runs generic XDP, which is slower)"
        }
        (_, Some(libc::EBUSY | libc::EEXIST)) => " (another XDP program is attached in another mode)",
        _ => "",
    }
}

/// How the program runs on an interface. Native is the default; generic (skb) only when asked — never a silent
/// fallback (generic mode is far slower and easy to end up in by mistake).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// In the driver (XDP_FLAGS_DRV_MODE).
    Native,
    /// Generic XDP in the networking stack (XDP_FLAGS_SKB_MODE).
    Skb,
}

impl AttachMode {
    const fn flags(self) -> u32 {
        match self {
            Self::Native => XDP_FLAGS_DRV_MODE,
            Self::Skb => XDP_FLAGS_SKB_MODE,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Skb => "skb",
        }
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an interface runs, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpState {
    pub mode: Option<AttachMode>,
    pub program_id: Option<u32>,
    /// Programs are attached in more than one mode (or offloaded).
    pub other: bool,
}

/// What [`attach`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// Nothing was attached; the program now is.
    New,
    /// An aqd program was attached; it was atomically replaced (no gap).
    Replaced { old_program_id: u32 },
}

/// One interface running aqd.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub iface: String,
    pub ifindex: u32,
    pub mode: AttachMode,
    pub program_id: u32,
}

/// An interface's ifindex, if it exists in this network namespace.
pub fn interface_index(iface: &str) -> Option<u32> {
    let name = CString::new(iface).ok()?;
    // SAFETY: `name` is NUL-terminated.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Attaches `program` to `iface` in `mode`, or atomically replaces the aqd program already there.
pub fn attach(program: BorrowedFd<'_>, iface: &str, mode: AttachMode) -> Result<Attached, AttachError> {
    let (ifindex, state) = interface_state(iface)?;
    if state.other {
        return Err(AttachError::Multiple { iface: iface.into() });
    }
    let netlink_err = |source| AttachError::Netlink {
        iface: iface.into(),
        mode,
        source,
    };
    match (state.mode, state.program_id) {
        (Some(existing), Some(id)) => {
            let info = program_info(id).map_err(|source| AttachError::Program {
                iface: iface.into(),
                id,
                source,
            })?;
            let name = info.name_as_str().unwrap_or("?").to_string();
            if name != PROGRAM_NAME {
                return Err(AttachError::Foreign {
                    iface: iface.into(),
                    name,
                    id,
                });
            }
            if existing != mode {
                return Err(AttachError::ModeMismatch {
                    iface: iface.into(),
                    existing,
                    requested: mode,
                });
            }
            let old = info.fd().map_err(|source| AttachError::Program {
                iface: iface.into(),
                id,
                source,
            })?;
            set_xdp(
                ifindex,
                program.as_raw_fd(),
                mode.flags() | XDP_FLAGS_REPLACE,
                Some(old.as_fd().as_raw_fd()),
            )
            .map_err(netlink_err)?;
            Ok(Attached::Replaced { old_program_id: id })
        }
        _ => {
            set_xdp(ifindex, program.as_raw_fd(), mode.flags(), None).map_err(netlink_err)?;
            Ok(Attached::New)
        }
    }
}

/// Attaches the TC egress program (server ISNs from SYN-ACKs) to `iface`, replacing aqd's previous one.
///
/// A netlink filter on the clsact qdisc, like the XDP attachment it belongs to the interface and outlives the
/// daemon. The old filter is removed just before the new one is added: a SYN-ACK leaving in those
/// microseconds is not learned, and that one handshake stays unverified (its packets still pass and are
/// enforced by address and fingerprint).
pub fn attach_egress(program: &mut SchedClassifier, iface: &str) -> Result<(), AttachError> {
    // Fails when the qdisc exists already, which is fine; a real problem shows in the attach below.
    let _ = tc::qdisc_add_clsact(iface);
    detach_egress(iface)?;
    let link = program
        .attach_with_options(
            iface,
            TcAttachType::Egress,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
        .map_err(|source| AttachError::Egress {
            iface: iface.into(),
            source,
        })?;
    // Owned by the interface from now on: dropping the link would remove the filter.
    let link = program.take_link(link).map_err(|source| AttachError::Egress {
        iface: iface.into(),
        source,
    })?;
    std::mem::forget(link);
    Ok(())
}

/// Removes aqd's TC egress filter from `iface`; `Ok(false)` when there was none.
pub fn detach_egress(iface: &str) -> Result<bool, AttachError> {
    match tc::qdisc_detach_program(iface, TcAttachType::Egress, EGRESS_PROGRAM_NAME) {
        Ok(()) => Ok(true),
        Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        // No clsact qdisc at all: nothing of ours is there.
        Err(tc::TcError::NetlinkError(_)) if interface_index(iface).is_some() => Ok(false),
        Err(source) => Err(AttachError::EgressDetach {
            iface: iface.into(),
            source,
        }),
    }
}

/// Detaches aqd from `iface`. `Ok(false)` when aqd was not attached there; never touches a foreign program.
pub fn detach(iface: &str) -> Result<bool, AttachError> {
    detach_egress(iface)?;
    let Some(attachment) = attachment(iface)? else {
        return Ok(false);
    };
    set_xdp(attachment.ifindex, -1, attachment.mode.flags(), None).map_err(|source| {
        AttachError::Netlink {
            iface: iface.into(),
            mode: attachment.mode,
            source,
        }
    })?;
    Ok(true)
}

/// The ifindex of `iface` and what XDP runs there.
fn interface_state(iface: &str) -> Result<(u32, XdpState), AttachError> {
    let ifindex =
        interface_index(iface).ok_or_else(|| AttachError::NoSuchInterface { iface: iface.into() })?;
    let state = query(ifindex).map_err(|source| AttachError::Query {
        iface: iface.into(),
        source,
    })?;
    Ok((ifindex, state))
}

/// The aqd attachment of one interface, if any.
pub fn attachment(iface: &str) -> Result<Option<Attachment>, AttachError> {
    let (ifindex, state) = interface_state(iface)?;
    let (Some(mode), Some(program_id)) = (state.mode, state.program_id) else {
        return Ok(None);
    };
    let is_aqd = program_info(program_id)
        .ok()
        .and_then(|i| i.name_as_str().map(|n| n == PROGRAM_NAME));
    Ok((is_aqd == Some(true)).then(|| Attachment {
        iface: iface.into(),
        ifindex,
        mode,
        program_id,
    }))
}

/// Every interface in this network namespace that runs aqd.
pub fn attachments() -> Vec<Attachment> {
    interface_names()
        .iter()
        .filter_map(|name| attachment(name).ok().flatten())
        .collect()
}

fn interface_names() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut entry = list;
        while (*entry).if_index != 0 {
            names.push(
                std::ffi::CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    names
}

fn program_info(id: u32) -> Result<ProgramInfo, aya::programs::ProgramError> {
    loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .ok_or(aya::programs::ProgramError::SyscallError(
            aya::sys::SyscallError {
                call: "BPF_PROG_GET_NEXT_ID",
                io_error: io::Error::from_raw_os_error(libc::ENOENT),
            },
        ))
}

/// The XDP state of an interface (RTM_GETLINK).
pub fn query(ifindex: u32) -> io::Result<XdpState> {
    let mut request = LinkMessage::default();
    request.header.index = ifindex;
    let replies = transact(RouteNetlinkMessage::GetLink(request), NLM_F_REQUEST)?;
    let mut state = XdpState {
        mode: None,
        program_id: None,
        other: false,
    };
    for reply in replies {
        let RouteNetlinkMessage::NewLink(link) = reply else {
            continue;
        };
        for attr in link.attributes {
            let LinkAttribute::Xdp(xdp) = attr else { continue };
            for x in xdp {
                match x {
                    LinkXdp::Attached(XdpAttached::Driver) => state.mode = Some(AttachMode::Native),
                    LinkXdp::Attached(XdpAttached::SocketBuffer) => state.mode = Some(AttachMode::Skb),
                    LinkXdp::Attached(XdpAttached::None) => {}
                    LinkXdp::Attached(_) => state.other = true,
                    LinkXdp::ProgId(id) => state.program_id = Some(id),
                    _ => {}
                }
            }
        }
    }
    Ok(state)
}

/// RTM_SETLINK with IFLA_XDP: `fd` -1 detaches.
fn set_xdp(ifindex: u32, fd: i32, flags: u32, expected_fd: Option<i32>) -> io::Result<()> {
    let mut request = LinkMessage::default();
    request.header.index = ifindex;
    let mut xdp = vec![LinkXdp::Fd(fd), LinkXdp::Flags(flags)];
    if let Some(expected) = expected_fd {
        xdp.push(LinkXdp::ExpectedFd(expected as u32));
    }
    request.attributes.push(LinkAttribute::Xdp(xdp));
    transact(RouteNetlinkMessage::SetLink(request), NLM_F_REQUEST | NLM_F_ACK).map(|_| ())
}

/// Sends one request and collects the replies until the ACK, error or end of the answer.
fn transact(message: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut replies = Vec::new();
    let mut receive = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut receive[..], 0)?;
        let mut offset = 0;
        while offset < n {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&receive[offset..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        None => Ok(replies),
                    };
                }
                NetlinkPayload::Done(_) => return Ok(replies),
                NetlinkPayload::InnerMessage(inner) => {
                    replies.push(inner);
                    // A plain GET (no dump) answers with one message and no ACK.
                    if flags & NLM_F_ACK == 0 {
                        return Ok(replies);
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}
