//! The gateway on Linux: the firmware's tasks on embassy's std executor, over std TCP sockets
//! (tokio's, through `embedded-io-adapters`; a tokio runtime in the background drives their I/O).

use std::time::{SystemTime, UNIX_EPOCH};

use embassy_executor::Executor;
use embedded_io_adapters::tokio_1::FromTokio;
use rand_core::OsRng;
use static_cell::StaticCell;
use tether_core::relay::{Config, SessionInfo};
use tether_core::time::Duration;
use tether_embassy::backoff::BackoffConfig;
use tether_embassy::io::{ConnectError, Connection, Connector};
use tether_embassy::tunnel::{self, Buffers, SessionEnd, TunnelConfig};
use tether_embassy::url::ControlPlane;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use crate::budget::{self, GatewayState};
use crate::cli::Args;

/// Dials with tokio (name resolution included).
struct TokioConnector;

/// A tokio TCP stream seen through embedded-io-async.
struct TokioConnection(TcpStream);

impl Connection for TokioConnection {
    type Error = std::io::Error;
    type Reader<'a> = FromTokio<ReadHalf<'a>>;
    type Writer<'a> = FromTokio<WriteHalf<'a>>;

    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        let (r, w) = self.0.split();
        (FromTokio::new(r), FromTokio::new(w))
    }

    async fn close(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

impl Connector for TokioConnector {
    type Connection<'a> = TokioConnection;

    async fn connect(&mut self, host: &str, port: u16) -> Result<TokioConnection, ConnectError> {
        match TcpStream::connect((host, port)).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                Ok(TokioConnection(stream))
            }
            Err(e) => Err(ConnectError(match e.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused",
                std::io::ErrorKind::TimedOut => "connection timed out",
                std::io::ErrorKind::NotFound => "host not found",
                _ if e.to_string().contains("lookup") => "host not found",
                _ => "connect failed",
            })),
        }
    }
}

static GATEWAY: StaticCell<GatewayState> = StaticCell::new();
static EXECUTOR: StaticCell<Executor> = StaticCell::new();
static TUNNEL: StaticCell<TunnelConfig<'static>> = StaticCell::new();

#[embassy_executor::task]
async fn tunnel_task(gw: &'static GatewayState, config: &'static TunnelConfig<'static>) -> ! {
    let rx = Box::leak(vec![0u8; budget::RX_LEN].into_boxed_slice());
    let scratch = Box::leak(vec![0u8; budget::SCRATCH_LEN].into_boxed_slice());
    let tx = Box::leak(vec![0u8; budget::TX_LEN].into_boxed_slice());
    let tls_read = Box::leak(vec![0u8; tether_embassy::tls::TLS_READ_BUF].into_boxed_slice());
    let tls_write = Box::leak(vec![0u8; tether_embassy::tls::TLS_WRITE_BUF].into_boxed_slice());
    let bufs = Buffers {
        rx,
        scratch,
        tx,
        tls_read,
        tls_write,
    };
    tunnel::run(
        gw,
        &mut TokioConnector,
        config,
        bufs,
        &mut OsRng,
        |end, registered| {
            if let SessionEnd::Ws(tether_embassy::ws::WsError::Rejected(401 | 403)) = end {
                log::error!("the control plane refused the token");
            } else {
                log::info!("session ended: {end:?} (registered: {registered})");
            }
        },
    )
    .await
}

#[embassy_executor::task(pool_size = budget::STREAMS)]
async fn worker_task(gw: &'static GatewayState, index: usize) -> ! {
    tether_embassy::worker::run_worker(gw, index, &mut TokioConnector).await
}

/// Runs the gateway until the process is killed, on a thread with room to build the (large, static)
/// gateway state.
pub(crate) fn run(args: Args) -> ! {
    let thread = std::thread::Builder::new()
        .name("gateway".into())
        .stack_size(256 << 20)
        .spawn(move || run_on_this_thread(args));
    match thread.map(std::thread::JoinHandle::join) {
        Ok(_) => crate::cli::fail("the gateway thread ended"),
        Err(e) => crate::cli::fail(&format!("cannot start the gateway thread: {e}")),
    }
}

fn run_on_this_thread(args: Args) -> ! {
    let runtime = Box::leak(Box::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap_or_else(|e| crate::cli::fail(&format!("cannot start the I/O runtime: {e}"))),
    ));
    // Tokio sockets are created and polled from the embassy executor's thread: keep the runtime's
    // context entered on it for good.
    std::mem::forget(runtime.enter());

    let url: &'static str = Box::leak(args.control_plane.into_boxed_str());
    let control_plane =
        ControlPlane::parse(url).unwrap_or_else(|e| crate::cli::fail(&e.to_string()));
    if control_plane.tls && !args.insecure_skip_tls_verify {
        crate::cli::fail(
            "https:// control planes need --insecure-skip-tls-verify for now: this gateway does \
             not verify server certificates yet",
        );
    }
    let token: &'static str = Box::leak(args.token.into_boxed_str());
    let mut info = SessionInfo::new(&args.agent_id, &args.name, env!("CARGO_PKG_VERSION"));
    info.hostname = SessionInfo::set(&args.hostname);
    info.k8s_version = SessionInfo::set("none");

    let config = Config {
        ring_bytes: budget::RING_BYTES,
        max_message: budget::RX_LEN,
        global_bytes: budget::GLOBAL_BYTES,
        // A gateway carries TCP tunnels, never HTTP requests or upgrades.
        extensions: tether_core::wire::Extensions {
            raw_upgrade: false,
            response_credit: false,
            ..tether_core::wire::Extensions::ALL
        },
        ..Config::default()
    };
    let config = Config {
        dial_timeout: Duration::from_secs(args.dial_timeout_secs),
        ..config
    };
    let gw: &'static GatewayState = GATEWAY.init_with(|| GatewayState::new(config));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    gw.set_unix_time(tether_core::wire::UnixTime::new(
        now.as_secs(),
        now.subsec_nanos(),
    ));

    let tunnel_config = TUNNEL.init(TunnelConfig {
        control_plane,
        token,
        info,
        backoff: BackoffConfig {
            base: embassy_time::Duration::from_millis(args.backoff_base_ms),
            cap: embassy_time::Duration::from_millis(args.backoff_cap_ms),
        },
        tls_insecure: args.insecure_skip_tls_verify,
    });
    log::info!(
        "tether-gateway {}: control plane {}:{}, {} streams, {} B static",
        env!("CARGO_PKG_VERSION"),
        tunnel_config.control_plane.host,
        tunnel_config.control_plane.port,
        budget::STREAMS,
        budget::STATIC_RAM
    );

    let executor = EXECUTOR.init(Executor::new());
    executor.run(|spawner| {
        spawner.spawn(tunnel_task(gw, tunnel_config).unwrap());
        for index in 0..budget::STREAMS {
            spawner.spawn(worker_task(gw, index).unwrap());
        }
    })
}
