//! `aqd run` ages idle flows out of the kernel's `FLOWS` table and keeps live ones: two verified TCP
//! connections to the protected port, one idle, one sending every 200 ms; with `flow_idle_timeout = 2` the
//! idle one is aged out within seconds and `aqd status` counts it, the live one stays tracked.
//!
//! Needs root (namespaces, XDP).

use std::{
    io::Write as _,
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use aqd_tests::netns::{self, Family, SERVICE_PORT};

#[test]
fn an_idle_flow_ages_out_and_a_live_one_stays() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    let config = std::fs::read_to_string(lab.config())?;
    std::fs::write(
        lab.config(),
        format!("{config}\n[protection]\nflow_idle_timeout = 2\nflow_fin_timeout = \"1s\"\n"),
    )?;
    lab.start_daemon()?;
    let to = SocketAddr::new(lab.server_addr(Family::V4), SERVICE_PORT);
    let listener: TcpListener = lab.server.run(move || TcpListener::bind(to))?;
    let connect = || -> anyhow::Result<TcpStream> {
        Ok(lab
            .client
            .run(move || TcpStream::connect_timeout(&to, Duration::from_secs(2)))?)
    };
    let mut idle = connect()?;
    let (_idle_server, _) = listener.accept()?;
    let mut live = connect()?;
    let (_live_server, _) = listener.accept()?;
    idle.write_all(b"GET / HTTP/1.1\r\n\r\n")?;
    live.write_all(b"GET / HTTP/1.1\r\n\r\n")?;

    let flows = |lab: &netns::Lab| -> anyhow::Result<serde_json::Value> {
        let status = lab.aqd(&["status", "--json"])?.ok()?.json()?;
        Ok(status["flow_table"]["flows"].clone())
    };
    let start = Instant::now();
    let mut last = flows(&lab)?;
    ensure!(
        last["entries"].as_u64() == Some(2),
        "two verified flows expected: {last}"
    );
    while start.elapsed() < Duration::from_secs(10) {
        live.write_all(b"x").context("the live connection")?;
        thread::sleep(Duration::from_millis(200));
        last = flows(&lab)?;
        if last["aged_idle"].as_u64() == Some(1) {
            break;
        }
    }
    eprintln!("after {:?}: {last}", start.elapsed());
    ensure!(
        last["aged_idle"].as_u64() == Some(1),
        "the idle flow was not aged out: {last}"
    );
    // The live one keeps going for a few more seconds (past the timeout again) and stays.
    for _ in 0..15 {
        live.write_all(b"x")?;
        thread::sleep(Duration::from_millis(200));
    }
    let last = flows(&lab)?;
    ensure!(
        last["entries"].as_u64() == Some(1) && last["aged_idle"].as_u64() == Some(1),
        "the live flow must stay tracked: {last}"
    );
    ensure!(last["evicted"].as_u64() == Some(0), "nothing was evicted: {last}");
    drop(idle);
    Ok(())
}
