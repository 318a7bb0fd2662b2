//! TCP through the cluster agent: the control plane's `--forward` to a service on the agent's
//! side, allowed by the agent's `--allow-tcp`; a target not on the list is refused by the agent
//! and never dialled.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tether_e2e::cluster::free_addr;
use tether_e2e::data::{Prng, sha256};
use tether_e2e::{CLUSTER, Cluster};

/// An echo server; counts the connections it accepted.
fn echo_server() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut conn, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, accepted)
}

fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("connect {addr}: {e}"),
        }
    }
}

#[test]
fn forward_reaches_an_allowed_service_through_the_cluster_agent_and_nothing_else() {
    let (allowed_port, allowed_seen) = echo_server();
    let (other_port, other_seen) = echo_server();
    let (l1, l2) = (free_addr(), free_addr());
    let forward_allowed = format!("{l1}={CLUSTER}:127.0.0.1:{allowed_port}");
    let forward_other = format!("{l2}={CLUSTER}:127.0.0.1:{other_port}");
    let allow = format!("127.0.0.1:{allowed_port}");
    let mut c = Cluster::builder()
        .control_plane_args(&["--forward", &forward_allowed, "--forward", &forward_other])
        .agent_args(&["--allow-tcp", &allow])
        .start();

    // Allowed: 4 MiB each way, byte for byte. (A tunnel has no half-close: the client's EOF
    // ends both directions, so it reads the echo before it ends.)
    let data = Prng::new(4).bytes(4 << 20);
    let mut conn = connect(l1);
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = conn.try_clone().unwrap();
    let sent = data.clone();
    let upload = std::thread::spawn(move || writer.write_all(&sent).unwrap());
    let mut back = vec![0u8; data.len()];
    conn.read_exact(&mut back).expect("echo through the agent");
    upload.join().unwrap();
    conn.shutdown(std::net::Shutdown::Both).unwrap();
    assert_eq!(back.len(), data.len());
    assert_eq!(sha256(&back), sha256(&data));
    assert_eq!(allowed_seen.load(Ordering::SeqCst), 1);

    // Not allowed: the connection is closed without a byte and the service never sees it.
    let mut refused = connect(l2);
    refused
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let _ = refused.write_all(b"hello?");
    let mut buf = [0u8; 64];
    let n = refused.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "a refused tunnel carried data");
    assert_eq!(
        other_seen.load(Ordering::SeqCst),
        0,
        "the agent dialled a target not allowed"
    );
    let log = c.agent().expect("agent").log();
    assert!(
        log.contains(&format!(
            "TCP to 127.0.0.1:{other_port} is not allowed on this agent"
        )),
        "the refusal is not in the agent log"
    );
}
