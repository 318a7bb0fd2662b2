//! The adapter's WebSocket client against a tokio-tungstenite server over loopback TCP (through
//! `embedded-io-adapters`): upgrade with the bearer token, masked text frames both ways, a
//! fragmented message joined, ping answered by the caller, close.

use embedded_io_adapters::tokio_1::FromTokio;
use futures_util::{SinkExt as _, StreamExt as _};
use tether_embassy::ws::{self, HEADER_ROOM, Incoming, WsError};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

struct Rng(u64);
impl rand_core::RngCore for Rng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        self.0 >> 11
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        rand_core::impls::fill_bytes_via_next(self, dest);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

#[allow(clippy::result_large_err)]
fn check_token(req: &Request, resp: Response) -> Result<Response, ErrorResponse> {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if auth == Some("Bearer s3cret") && req.uri().path() == "/api/v1/clusters/agent/ws" {
        Ok(resp)
    } else {
        let mut e = ErrorResponse::new(None);
        *e.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
        Err(e)
    }
}

#[tokio::test]
async fn client_interoperates_with_tungstenite() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_hdr_async(tcp, check_token)
            .await
            .unwrap();
        // Echo one text message.
        let m = ws.next().await.unwrap().unwrap();
        assert_eq!(m, Message::Text("{\"type\":\"register\"}".into()));
        ws.send(m).await.unwrap();
        // A fragmented binary message: the client must join it.
        let first = Frame::message(&b"hello "[..], OpCode::Data(Data::Binary), false);
        let last = Frame::message(&b"world"[..], OpCode::Data(Data::Continue), true);
        ws.send(Message::Frame(first)).await.unwrap();
        ws.send(Message::Frame(last)).await.unwrap();
        ws.send(Message::Ping(b"p1".to_vec().into())).await.unwrap();
        // The client answers with a pong carrying the ping's payload.
        let pong = ws.next().await.unwrap().unwrap();
        assert_eq!(pong, Message::Pong(b"p1".to_vec().into()));
        ws.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        }))
        .await
        .unwrap();
    });

    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let (r, w) = tcp.split();
    let (mut r, mut w) = (FromTokio::new(r), FromTokio::new(w));
    let mut rng = Rng(7);
    let mut buf = vec![0u8; 4096];
    let host = addr.to_string();
    let up = ws::handshake(
        &mut r,
        &mut w,
        &host,
        "/api/v1/clusters/agent/ws",
        "s3cret",
        &mut rng,
        &mut buf,
    )
    .await
    .unwrap();
    // tungstenite sends no Date header.
    assert_eq!(up.date, None);

    let text = b"{\"type\":\"register\"}";
    let mut tx = vec![0u8; HEADER_ROOM + text.len()];
    tx[HEADER_ROOM..].copy_from_slice(text);
    ws::write_frame(
        &mut w,
        edge_ws::FrameType::Text(false),
        &mut tx,
        text.len(),
        &mut rng,
    )
    .await
    .unwrap();
    assert_eq!(
        ws::read_message(&mut r, &mut buf).await.unwrap(),
        Incoming::Message(text)
    );
    assert_eq!(
        ws::read_message(&mut r, &mut buf).await.unwrap(),
        Incoming::Message(b"hello world")
    );
    let Incoming::Ping(payload) = ws::read_message(&mut r, &mut buf).await.unwrap() else {
        panic!("expected a ping");
    };
    ws::write_control(&mut w, edge_ws::FrameType::Pong, &payload, &mut rng)
        .await
        .unwrap();
    assert_eq!(
        ws::read_message(&mut r, &mut buf).await.unwrap(),
        Incoming::Close(Some(1001))
    );
    server.await.unwrap();
}

#[tokio::test]
async fn a_bad_token_is_a_rejected_upgrade_with_its_status() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = tokio_tungstenite::accept_hdr_async(tcp, check_token).await;
    });
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let (r, w) = tcp.split();
    let (mut r, mut w) = (FromTokio::new(r), FromTokio::new(w));
    let mut buf = vec![0u8; 4096];
    let got = ws::handshake(
        &mut r,
        &mut w,
        "cp",
        "/api/v1/clusters/agent/ws",
        "wrong",
        &mut Rng(1),
        &mut buf,
    )
    .await;
    assert_eq!(got, Err(WsError::Rejected(401)));
}

#[tokio::test]
async fn a_message_larger_than_the_buffer_is_skipped_whole() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_hdr_async(tcp, check_token)
            .await
            .unwrap();
        ws.send(Message::Binary(vec![7u8; 10_000].into()))
            .await
            .unwrap();
        ws.send(Message::Text("next".into())).await.unwrap();
        let _ = ws.next().await;
    });
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let (r, w) = tcp.split();
    let (mut r, mut w) = (FromTokio::new(r), FromTokio::new(w));
    let mut buf = vec![0u8; 1024];
    ws::handshake(
        &mut r,
        &mut w,
        "cp",
        "/api/v1/clusters/agent/ws",
        "s3cret",
        &mut Rng(2),
        &mut buf,
    )
    .await
    .unwrap();
    assert_eq!(
        ws::read_message(&mut r, &mut buf).await.unwrap(),
        Incoming::Oversize(10_000)
    );
    assert_eq!(
        ws::read_message(&mut r, &mut buf).await.unwrap(),
        Incoming::Message(b"next")
    );
}
