//! Issue 9 item 9: a bounded random-source SYN flood while keep-alive clients keep producing request events.
//! Three verified keep-alive connections to the protected port send a request every 100 ms; 300,000+ spoofed
//! SYNs from random sources (more than `HALF_OPEN` holds), written as raw frames on the client's veth, hit the
//! same port. Afterwards the three flows are still in `FLOWS` (nothing evicted), their request events keep
//! arriving, and the flood's half-open entries were counted.
//!
//! Needs root (namespaces, XDP, AF_PACKET).

use std::{
    io::Write as _,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use aqd_tests::{
    netns::{self, CLIENT_IF, Family, SERVICE_PORT},
    packet::Segment,
};
use serde_json::Value;

const FLOOD: u32 = detector_common::capacity::HALF_OPEN + 40_000;

/// Writes `n` SYN frames from random sources to `dst:port` on `ifname` (AF_PACKET, inside the current netns).
fn flood(ifname: &str, dst: &str, port: u16, n: u32) -> std::io::Result<u32> {
    // SAFETY: plain socket calls with valid arguments; the fd is closed at the end.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let name = std::ffi::CString::new(ifname).unwrap();
        let ifindex = libc::if_nametoindex(name.as_ptr());
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        let mut sent = 0;
        let mut x: u32 = 0x9e37_79b9;
        for i in 0..n {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let src = format!(
                "{}.{}.{}.{}",
                100 + (x >> 24) % 100,
                (x >> 16) & 0xff,
                (x >> 8) & 0xff,
                1 + x % 250
            );
            let frame = Segment::syn(&src, dst, port)
                .with_src_port(1024 + (i % 60000) as u16)
                .build();
            loop {
                let rc = libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                if rc >= 0 {
                    sent += 1;
                    break;
                }
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ENOBUFS) && e.raw_os_error() != Some(libc::EAGAIN) {
                    libc::close(fd);
                    return Err(e);
                }
                thread::yield_now();
            }
        }
        libc::close(fd);
        Ok(sent)
    }
}

fn status(lab: &netns::Lab) -> anyhow::Result<Value> {
    lab.aqd(&["status", "--json"])?.ok()?.json()
}

fn requests_read(s: &Value) -> u64 {
    s["daemon"]["events_read"]["request"].as_u64().unwrap_or(0)
}

#[test]
fn keep_alive_flows_stay_tracked_through_a_random_source_syn_flood() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    let started = Instant::now();
    lab.start_daemon()?;
    let to = SocketAddr::new(lab.server_addr(Family::V4), SERVICE_PORT);
    let listener: TcpListener = lab.server.run(move || TcpListener::bind(to))?;
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..3 {
        clients.push(
            lab.client
                .run(move || TcpStream::connect_timeout(&to, Duration::from_secs(2)))?,
        );
        servers.push(listener.accept()?.0);
    }
    // The keep-alive clients: a request every 100 ms (the request gap is 50 ms), until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || -> std::io::Result<()> {
            while !stop.load(Ordering::Relaxed) {
                for c in &mut clients {
                    c.write_all(b"GET /v1/models HTTP/1.1\r\nHost: api\r\n\r\n")?;
                }
                thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        })
    };
    thread::sleep(Duration::from_millis(800));
    let before = status(&lab)?;
    ensure!(
        before["flow_table"]["flows"]["entries"].as_u64() == Some(3),
        "three verified flows expected: {}",
        before["flow_table"]
    );

    let dst = lab.server_addr(Family::V4).to_string();
    let t = Instant::now();
    let sent = lab
        .client
        .run(move || flood(CLIENT_IF, &dst, SERVICE_PORT, FLOOD))?;
    eprintln!("flood: {sent} SYNs in {:?}", t.elapsed());
    ensure!(sent == FLOOD, "sent {sent} of {FLOOD}");
    thread::sleep(Duration::from_millis(1500));
    let mid = status(&lab)?;
    thread::sleep(Duration::from_millis(1500));
    let after = status(&lab)?;
    stop.store(true, Ordering::Relaxed);
    writer
        .join()
        .expect("writer thread")
        .context("keep-alive clients")?;
    let ft = &after["flow_table"];
    eprintln!("flow table after the flood: {ft}");
    eprintln!(
        "requests read: before {} mid {} after {}",
        requests_read(&before),
        requests_read(&mid),
        requests_read(&after)
    );
    let created = ft["half_open"]["created"].as_u64().unwrap_or(0);
    ensure!(
        created >= u64::from(detector_common::capacity::HALF_OPEN),
        "the flood's half-open entries were not counted (more than the table holds expected): {ft}"
    );
    ensure!(
        ft["flows"]["entries"].as_u64() == Some(3) && ft["flows"]["evicted"].as_u64() == Some(0),
        "the keep-alive flows must stay tracked: {ft}"
    );
    ensure!(
        requests_read(&after) > requests_read(&mid),
        "request events stopped after the flood: mid {} after {}",
        requests_read(&mid),
        requests_read(&after)
    );
    eprintln!("wall time {:?}", started.elapsed());
    drop(servers);
    Ok(())
}
