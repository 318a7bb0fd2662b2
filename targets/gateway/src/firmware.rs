//! The firmware: an STM32F746ZG (Nucleo-F746ZG) with RMII Ethernet, DHCP, embassy-net TCP, defmt
//! over RTT. The control plane URL and token are baked in at build time
//! (`TETHER_CONTROL_PLANE`, `TETHER_TOKEN`); a product would read them from flash. With feature
//! `tls` an `https://` control plane works when `TETHER_INSECURE_SKIP_TLS_VERIFY` is set at build
//! time (the server certificate is not verified yet); its record buffers add 20.7 KiB of RAM.

use core::net::Ipv4Addr;

use defmt_rtt as _;
use embassy_executor::Spawner;
use embassy_net::dns::DnsQueryType;
use embassy_net::tcp::{ConnectError as TcpConnectError, TcpReader, TcpSocket, TcpWriter};
use embassy_net::{IpAddress, Stack, StackResources};
use embassy_stm32::bind_interrupts;
use embassy_stm32::eth::{self, Ethernet, GenericPhy, PacketQueue, Sma};
use embassy_stm32::peripherals::{ETH, ETH_SMA, RNG};
use embassy_stm32::rcc;
use embassy_stm32::rng::{self, Rng};
use panic_probe as _;
use static_cell::{ConstStaticCell, StaticCell};
use tether_core::relay::{Config, SessionInfo};
use tether_core::time::Duration;
use tether_core::wire::Extensions;
use tether_embassy::backoff::BackoffConfig;
use tether_embassy::io::{ConnectError, Connection, Connector};
use tether_embassy::tunnel::{self, Buffers, TunnelConfig};
use tether_embassy::url::ControlPlane;

use crate::budget::{self, GatewayState};

bind_interrupts!(struct Irqs {
    ETH => eth::InterruptHandler;
    RNG => rng::InterruptHandler<RNG>;
});

type Device = Ethernet<'static, ETH, GenericPhy<Sma<'static, ETH_SMA>>>;

const CONTROL_PLANE: &str = match option_env!("TETHER_CONTROL_PLANE") {
    Some(url) => url,
    None => "http://192.168.1.10:8080",
};
const TOKEN: &str = match option_env!("TETHER_TOKEN") {
    Some(token) => token,
    None => "change-me",
};
/// TLS without server certificate verification allowed (the only TLS mode so far).
const TLS_INSECURE: bool = option_env!("TETHER_INSECURE_SKIP_TLS_VERIFY").is_some();
/// Locally administered MAC address.
const MAC: [u8; 6] = [0x02, 0x74, 0x65, 0x74, 0x68, 0x01];

/// TCP sockets: the tunnel, one per stream, plus DHCP and DNS.
const SOCKETS: usize = budget::STREAMS + 3;

/// Dials with embassy-net (DNS for names), one socket with its own buffers.
struct NetConnector {
    stack: Stack<'static>,
    rx: &'static mut [u8],
    tx: &'static mut [u8],
}

struct NetConnection<'a>(TcpSocket<'a>);

impl Connection for NetConnection<'_> {
    type Error = embassy_net::tcp::Error;
    type Reader<'b>
        = TcpReader<'b>
    where
        Self: 'b;
    type Writer<'b>
        = TcpWriter<'b>
    where
        Self: 'b;

    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        self.0.split()
    }

    async fn close(&mut self) {
        self.0.close();
        let _ = embedded_io_async::Write::flush(&mut self.0).await;
        self.0.abort();
    }
}

impl Connector for NetConnector {
    type Connection<'a> = NetConnection<'a>;

    async fn connect(&mut self, host: &str, port: u16) -> Result<NetConnection<'_>, ConnectError> {
        let address = match host.parse::<Ipv4Addr>() {
            Ok(ip) => IpAddress::Ipv4(ip),
            Err(_) => *self
                .stack
                .dns_query(host, DnsQueryType::A)
                .await
                .map_err(|_| ConnectError("host not found"))?
                .first()
                .ok_or(ConnectError("host not found"))?,
        };
        let mut socket = TcpSocket::new(self.stack, &mut *self.rx, &mut *self.tx);
        socket.set_timeout(Some(embassy_time::Duration::from_secs(90)));
        socket.set_keep_alive(Some(embassy_time::Duration::from_secs(30)));
        socket.connect((address, port)).await.map_err(|e| {
            ConnectError(match e {
                TcpConnectError::ConnectionReset => "connection refused",
                TcpConnectError::TimedOut => "connection timed out",
                TcpConnectError::NoRoute => "no route to host",
                TcpConnectError::InvalidState => "connect failed",
            })
        })?;
        Ok(NetConnection(socket))
    }
}

#[embassy_executor::task]
async fn net_task(mut runner: embassy_net::Runner<'static, Device>) -> ! {
    runner.run().await
}

/// What a gateway offers: it carries TCP tunnels, never HTTP requests or upgrades.
const GATEWAY_EXTENSIONS: Extensions = Extensions {
    raw_upgrade: false,
    response_credit: false,
    ..Extensions::ALL
};

/// The relay's configuration: rings that can fill their slots, tunnel messages up to the rx buffer.
const RELAY_CONFIG: Config = Config {
    ring_bytes: budget::RING_BYTES,
    max_message: budget::RX_LEN,
    dial_timeout: Duration::from_secs(30),
    close_timeout: Duration::from_secs(10),
    heartbeat_interval: Duration::from_secs(30),
    ping_interval: Duration::from_secs(10),
    read_deadline: Duration::from_secs(60),
    pause_limit: Duration::from_secs(30),
    extensions: GATEWAY_EXTENSIONS,
    global_bytes: budget::GLOBAL_BYTES,
};

// Everything big is const-initialised in place: nothing of it is ever built on the stack.
static GATEWAY: GatewayState = GatewayState::new(RELAY_CONFIG);
static TUNNEL_CONFIG: StaticCell<TunnelConfig<'static>> = StaticCell::new();
static TUNNEL_BUFS: ConstStaticCell<TunnelBufs> = ConstStaticCell::new(TunnelBufs {
    rx: [0; budget::RX_LEN],
    scratch: [0; budget::SCRATCH_LEN],
    tx: [0; budget::TX_LEN],
    socket: [0; 2 * budget::TUNNEL_SOCKET_BUF],
});
#[cfg(feature = "tls")]
static TLS_BUFS: ConstStaticCell<(
    [u8; tether_embassy::tls::TLS_READ_BUF],
    [u8; tether_embassy::tls::TLS_WRITE_BUF],
)> = ConstStaticCell::new((
    [0; tether_embassy::tls::TLS_READ_BUF],
    [0; tether_embassy::tls::TLS_WRITE_BUF],
));
static WORKER_BUFS: ConstStaticCell<[[u8; 2 * budget::STREAM_SOCKET_BUF]; budget::STREAMS]> =
    ConstStaticCell::new([[0; 2 * budget::STREAM_SOCKET_BUF]; budget::STREAMS]);
static PACKETS: ConstStaticCell<PacketQueue<4, 4>> = ConstStaticCell::new(PacketQueue::new());
static RESOURCES: ConstStaticCell<StackResources<SOCKETS>> =
    ConstStaticCell::new(StackResources::new());

struct TunnelBufs {
    rx: [u8; budget::RX_LEN],
    scratch: [u8; budget::SCRATCH_LEN],
    tx: [u8; budget::TX_LEN],
    socket: [u8; 2 * budget::TUNNEL_SOCKET_BUF],
}

#[embassy_executor::task]
async fn tunnel_task(
    gw: &'static GatewayState,
    stack: Stack<'static>,
    config: &'static TunnelConfig<'static>,
    mut rng: Rng<'static, RNG>,
) -> ! {
    let bufs = TUNNEL_BUFS.take();
    let (rx_sock, tx_sock) = bufs.socket.split_at_mut(budget::TUNNEL_SOCKET_BUF);
    #[cfg(feature = "tls")]
    let (tls_read, tls_write) = {
        let tls = TLS_BUFS.take();
        (&mut tls.0[..], &mut tls.1[..])
    };
    #[cfg(not(feature = "tls"))]
    let (tls_read, tls_write): (&mut [u8], &mut [u8]) = (&mut [], &mut []);
    let mut connector = NetConnector {
        stack,
        rx: rx_sock,
        tx: tx_sock,
    };
    let buffers = Buffers {
        rx: &mut bufs.rx,
        scratch: &mut bufs.scratch,
        tx: &mut bufs.tx,
        tls_read,
        tls_write,
    };
    tunnel::run(gw, &mut connector, config, buffers, &mut rng, |_, _| {}).await
}

#[embassy_executor::task(pool_size = budget::STREAMS)]
async fn worker_task(
    gw: &'static GatewayState,
    stack: Stack<'static>,
    index: usize,
    buf: &'static mut [u8; 2 * budget::STREAM_SOCKET_BUF],
) -> ! {
    let (rx, tx) = buf.split_at_mut(budget::STREAM_SOCKET_BUF);
    let mut connector = NetConnector { stack, rx, tx };
    tether_embassy::worker::run_worker(gw, index, &mut connector).await
}

fn clocks() -> embassy_stm32::Config {
    // HSI 16 MHz / 8 * 216 = 432 MHz VCO: 216 MHz system clock (P / 2), 48 MHz for the RNG (Q / 9).
    let mut config = embassy_stm32::Config::default();
    config.rcc.pll_src = rcc::PllSource::HSI;
    config.rcc.pll = Some(rcc::Pll {
        prediv: rcc::PllPreDiv::DIV8,
        mul: rcc::PllMul::MUL216,
        divp: Some(rcc::PllPDiv::DIV2),
        divq: Some(rcc::PllQDiv::DIV9),
        divr: None,
    });
    config.rcc.sys = rcc::Sysclk::PLL1_P;
    config.rcc.ahb_pre = rcc::AHBPrescaler::DIV1;
    config.rcc.apb1_pre = rcc::APBPrescaler::DIV4;
    config.rcc.apb2_pre = rcc::APBPrescaler::DIV2;
    config
}

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    let p = embassy_stm32::init(clocks());
    defmt::info!(
        "tether-gateway {}: {} streams, {} B static",
        env!("CARGO_PKG_VERSION"),
        budget::STREAMS,
        budget::STATIC_RAM
    );
    let mut rng = Rng::new(p.RNG, Irqs);
    let seed = rng.next_u64();

    let device = Ethernet::new(
        PACKETS.take(),
        p.ETH,
        Irqs,
        p.PA1,
        p.PA7,
        p.PC4,
        p.PC5,
        p.PG13,
        p.PB13,
        p.PG11,
        MAC,
        p.ETH_SMA,
        p.PA2,
        p.PC1,
    );
    let net = embassy_net::Config::dhcpv4(Default::default());
    let (stack, runner) = embassy_net::new(device, net, RESOURCES.take(), seed);
    spawner.spawn(net_task(runner).unwrap());
    stack.wait_config_up().await;
    defmt::info!("network up");

    let control_plane = match ControlPlane::parse(CONTROL_PLANE) {
        Ok(cp) if !cp.tls || (cfg!(feature = "tls") && TLS_INSECURE) => cp,
        _ => defmt::panic!(
            "TETHER_CONTROL_PLANE must be http:// or ws:// (https:// needs feature `tls` and \
             TETHER_INSECURE_SKIP_TLS_VERIFY)"
        ),
    };
    let gw: &'static GatewayState = &GATEWAY;
    let tunnel_config = TUNNEL_CONFIG.init(TunnelConfig {
        control_plane,
        token: TOKEN,
        info: SessionInfo::new("tether-gateway", "gateway", env!("CARGO_PKG_VERSION")),
        backoff: BackoffConfig::default(),
        tls_insecure: TLS_INSECURE,
    });
    spawner.spawn(tunnel_task(gw, stack, tunnel_config, rng).unwrap());
    let bufs = WORKER_BUFS.take();
    for (index, buf) in bufs.iter_mut().enumerate() {
        spawner.spawn(worker_task(gw, stack, index, buf).unwrap());
    }
}
