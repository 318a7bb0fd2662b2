//! TLS on the tunnel (feature `tls`): embedded-tls 1.3 through [`tls::Duplex`] against a rustls
//! server, then the WebSocket upgrade and messages both ways over the split TLS halves (the
//! session's shape: one task reads while another writes).

use std::cell::RefCell;
use std::sync::Arc;

use embedded_io_adapters::tokio_1::FromTokio;
use futures_util::{SinkExt as _, StreamExt as _};
use tether_embassy::tls::{self, TLS_READ_BUF, TLS_WRITE_BUF};
use tether_embassy::ws::{self, HEADER_ROOM, Incoming};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

/// The OS RNG as rand_core 0.6 (crypto-grade for the TLS handshake).
struct OsRng;
impl rand_core::RngCore for OsRng {
    fn next_u32(&mut self) -> u32 {
        rand_core::impls::next_u32_via_fill(self)
    }
    fn next_u64(&mut self) -> u64 {
        rand_core::impls::next_u64_via_fill(self)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        use std::io::Read as _;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(dest))
            .expect("/dev/urandom");
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl rand_core::CryptoRng for OsRng {}

fn server_config() -> Arc<rustls::ServerConfig> {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = key.cert.der().clone();
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], der)
    .unwrap();
    Arc::new(config)
}

#[tokio::test]
async fn websocket_over_embedded_tls_against_rustls() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config());
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tls).await.unwrap();
        // Echo three messages, the last one large enough to span TLS records.
        for _ in 0..3 {
            let m = ws.next().await.unwrap().unwrap();
            ws.send(m).await.unwrap();
        }
        ws.close(None).await.unwrap();
    });

    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let (r, w) = tcp.split();
    let (r, w) = (
        RefCell::new(FromTokio::new(r)),
        RefCell::new(FromTokio::new(w)),
    );
    let mut rng = OsRng;
    let (mut read_buf, mut write_buf) = (vec![0u8; TLS_READ_BUF], vec![0u8; TLS_WRITE_BUF]);
    let mut conn = tls::open(&r, &w, "localhost", &mut rng, &mut read_buf, &mut write_buf)
        .await
        .expect("TLS handshake");
    let (mut reader, mut writer) = conn.split();
    let mut buf = vec![0u8; 64 * 1024];
    ws::handshake(
        &mut reader,
        &mut writer,
        "localhost",
        "/api/v1/clusters/agent/ws",
        "t",
        &mut rng,
        &mut buf,
    )
    .await
    .expect("upgrade over TLS");

    let big: Vec<u8> = (0..40_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let messages: [&[u8]; 3] = [b"one", b"two", &big];
    // Write all, then read all: the halves are independent.
    let mut tx = vec![0u8; HEADER_ROOM + big.len()];
    for m in messages {
        tx[HEADER_ROOM..HEADER_ROOM + m.len()].copy_from_slice(m);
        ws::write_frame(
            &mut writer,
            edge_ws::FrameType::Text(false),
            &mut tx,
            m.len(),
            &mut rng,
        )
        .await
        .unwrap();
    }
    for m in messages {
        match ws::read_message(&mut reader, &mut buf).await.unwrap() {
            Incoming::Message(got) => assert_eq!(got, m),
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(
        ws::read_message(&mut reader, &mut buf).await.unwrap(),
        Incoming::Close(_)
    ));
    server.await.unwrap();
}
