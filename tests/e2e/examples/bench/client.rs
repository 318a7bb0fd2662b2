//! The kubectl-free client: `v5.channel.k8s.io` execs and attaches over TLS WebSockets, either
//! through the control plane (a tunnel mode) or straight to kubesim (the direct path).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

pub(crate) type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// `cat` with stdin, stdout and stderr: everything written comes back on stdout.
pub(crate) const EXEC_CAT: &str =
    "/api/v1/namespaces/default/pods/demo/exec?command=cat&stdin=true&stdout=true&stderr=true";
/// An attach to the pod's main process (an idle `sh`), stdout only: no process per stream in
/// kubesim, so 10 000 of them fit in its file descriptors (an exec of `cat` takes 4 each).
pub(crate) const ATTACH_IDLE: &str = "/api/v1/namespaces/default/pods/demo/attach?stdout=true";

/// How long opening one stream may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);

/// Where to open streams: `https://HOST:PORT[/prefix]`, TLS trust, bearer token.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) name: &'static str,
    base: String,
    authority: String,
    tls: TlsConnector,
    token: String,
}

impl Target {
    pub(crate) fn new(name: &'static str, base: &str, ca_pem: &str, token: &str) -> Self {
        let authority = base
            .split_once("://")
            .map_or(base, |(_, r)| r)
            .split('/')
            .next()
            .expect("authority")
            .to_string();
        Self {
            name,
            base: base.replacen("https://", "wss://", 1),
            authority,
            tls: TlsConnector::from(tether_e2e::tls::client_config(ca_pem)),
            token: token.to_string(),
        }
    }

    /// Opens `path` (an exec or attach) and checks the subprotocol.
    pub(crate) async fn open(&self, path: &str) -> Result<Ws, String> {
        tokio::time::timeout(OPEN_TIMEOUT, self.open_inner(path))
            .await
            .map_err(|_| format!("{}: opening a stream timed out", self.name))?
    }

    async fn open_inner(&self, path: &str) -> Result<Ws, String> {
        let url = format!("{}{path}", self.base);
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let h = req.headers_mut();
        h.insert(
            "Authorization",
            format!("Bearer {}", self.token).parse().expect("header"),
        );
        h.insert(
            "Sec-WebSocket-Protocol",
            "v5.channel.k8s.io".parse().expect("header"),
        );
        let tcp = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| format!("{}: connect: {e}", self.name))?;
        tcp.set_nodelay(true).expect("nodelay");
        let name = ServerName::try_from("127.0.0.1").expect("server name");
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{}: TLS: {e}", self.name))?;
        let (ws, resp) = tokio_tungstenite::client_async(req, tls)
            .await
            .map_err(|e| format!("{}: upgrade failed: {e}", self.name))?;
        let proto = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok());
        if proto != Some("v5.channel.k8s.io") {
            return Err(format!("{}: subprotocol {proto:?}", self.name));
        }
        Ok(ws)
    }
}

/// A stdin message (channel 0).
pub(crate) fn stdin_msg(data: &[u8]) -> Message {
    let mut m = Vec::with_capacity(data.len() + 1);
    m.push(0);
    m.extend_from_slice(data);
    Message::binary(m)
}

/// The v5 stdin EOF.
pub(crate) fn stdin_eof() -> Message {
    Message::binary(vec![0xFF, 0])
}

/// What one received message means for a reader of stdout.
pub(crate) enum Got<'a> {
    Stdout(&'a [u8]),
    Other,
}

/// Classifies a received message: stdout data, or something to ignore; stderr, an early status,
/// a close or an error is an `Err`.
pub(crate) fn classify<'a>(
    name: &str,
    m: &'a Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Result<Got<'a>, String> {
    match m {
        Some(Ok(Message::Binary(b))) => match b.first() {
            Some(1) => Ok(Got::Stdout(&b[1..])),
            Some(2) => Err(format!(
                "{name}: stderr: {:?}",
                String::from_utf8_lossy(&b[1..])
            )),
            Some(3) => Err(format!(
                "{name}: early status: {:?}",
                String::from_utf8_lossy(&b[1..])
            )),
            _ => Ok(Got::Other),
        },
        Some(Ok(Message::Close(c))) => Err(format!("{name}: closed early: {c:?}")),
        Some(Ok(_)) => Ok(Got::Other),
        Some(Err(e)) => Err(format!("{name}: read error: {e}")),
        None => Err(format!("{name}: stream ended early")),
    }
}

/// Reads until the exec's status (channel 3) or the close, ignoring the rest, then closes.
pub(crate) async fn drain(ws: &mut Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Binary(b) if b.first() == Some(&3) => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
}

/// Opens `n` streams of `path`, at most `parallel` handshakes at a time; stops opening after the
/// first failure. Returns the streams opened and the first error.
pub(crate) async fn open_many(
    t: &Target,
    path: &'static str,
    n: usize,
    parallel: usize,
    wait_first_message: bool,
) -> (Vec<Ws>, Option<String>) {
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel));
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let t = t.clone();
        let sem = sem.clone();
        let failed = failed.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore");
            if failed.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(None);
            }
            let r = async {
                let mut ws = t.open(path).await?;
                if wait_first_message {
                    // kubesim's initial empty message on the lowest writable channel.
                    let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
                        .await
                        .map_err(|_| format!("{}: no first message within 30 s", t.name))?;
                    match m {
                        Some(Ok(Message::Binary(_))) => {}
                        other => return Err(format!("{}: first message {other:?}", t.name)),
                    }
                }
                Ok(ws)
            }
            .await;
            if r.is_err() {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            r.map_err(Some)
        }));
    }
    let mut streams = Vec::with_capacity(n);
    let mut first_err = None;
    for task in tasks {
        match task.await.expect("open task") {
            Ok(ws) => streams.push(ws),
            Err(Some(e)) => {
                first_err.get_or_insert(e);
            }
            Err(None) => {}
        }
    }
    (streams, first_err)
}

/// Sends a message (helper for writers that own a sink half).
pub(crate) async fn send<S>(tx: &mut S, m: Message, name: &str) -> Result<(), String>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    tx.send(m)
        .await
        .map_err(|e| format!("{name}: send failed: {e}"))
}
