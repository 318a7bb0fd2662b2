//! One user's hundreds of long-lived requests never take the slots other users need: 300
//! concurrent `logs -f` of alice are admitted up to the per-user limit (the rest refused with
//! 429 naming it) while bob's `get pod` is answered at once.

use std::time::{Duration, Instant};

use tether_e2e::https;
use tether_e2e::tls::client_config;
use tether_e2e::{Cluster, POD};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const FOLLOWERS: usize = 300;
/// The control plane's default `--max-streams-per-user`.
const PER_USER: usize = 128;
const BOB_TOKEN: &str = "bob-token-for-limits";

/// Opens `GET .../log?follow=true` as the cluster's user and returns the status line and the
/// open connection (the stream stays live while it is held).
async fn follow(
    addr: std::net::SocketAddr,
    path: String,
    token: String,
    tls: tokio_rustls::TlsConnector,
) -> (u16, String, tokio_rustls::client::TlsStream<TcpStream>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut s = tls.connect(name, tcp).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: */*\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut byte))
            .await
            .expect("a response head")
            .unwrap();
        assert_eq!(n, 1, "closed before the head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = String::new();
    if status != 200 {
        let mut rest = vec![0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest)).await {
            body = String::from_utf8_lossy(&rest[..n]).into_owned();
        }
    }
    (status, body, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_follows_of_one_user_leave_room_for_another() {
    let user_arg = format!("bob={BOB_TOKEN}");
    let c = Cluster::builder()
        .control_plane_args(&["--user-token", &user_arg])
        .start();
    let addr = c.control_plane_addr();
    let base = c.server_url().to_string();
    let prefix = base.split_once(&addr.to_string()).unwrap().1.to_string();
    let path = format!("{prefix}/api/v1/namespaces/default/pods/{POD}/log?follow=true");
    let tls = tokio_rustls::TlsConnector::from(client_config(c.control_plane_ca_pem()));

    let opens: Vec<_> = (0..FOLLOWERS)
        .map(|_| {
            tokio::spawn(follow(
                addr,
                path.clone(),
                c.user_token().to_string(),
                tls.clone(),
            ))
        })
        .collect();
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for open in opens {
        let (status, body, s) = open.await.unwrap();
        match status {
            200 => held.push(s),
            429 => refused.push(body),
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert_eq!(held.len(), PER_USER, "admitted follows");
    assert_eq!(refused.len(), FOLLOWERS - PER_USER);
    assert!(
        refused[0].contains("per-user limit") && refused[0].contains("alice"),
        "{}",
        refused[0]
    );

    // bob, while alice's follows are all live: answered at once.
    let url = format!("{base}/api/v1/namespaces/default/pods/{POD}");
    let ca = c.control_plane_ca_pem().to_string();
    let t = Instant::now();
    let get = tokio::task::spawn_blocking(move || {
        https::get(&url, &ca, BOB_TOKEN, Duration::from_secs(10))
    })
    .await
    .unwrap()
    .expect("bob's get pod");
    let took = t.elapsed();
    eprintln!(
        "FIGURE {PER_USER} follows of alice live: bob's get pod in {:.0} ms",
        took.as_secs_f64() * 1000.0
    );
    assert_eq!(get.status, 200, "{}", get.text());
    assert!(took < Duration::from_secs(2), "bob waited {took:?}");

    // Alice's slots come back when her streams end.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, _s) =
            follow(addr, path.clone(), c.user_token().to_string(), tls.clone()).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice's slots were never released"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
