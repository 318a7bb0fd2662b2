//! `tether-gateway`: Tether's edge gateway.
//!
//! * Feature `firmware`: embassy firmware for thumbv7em-none-eabihf (an STM32F7-class part with
//!   Ethernet, budgeted to 256 KiB of RAM), embassy-net TCP, defmt logging over RTT.
//! * Feature `platform-std` (default): the same tasks on Linux, over std TCP sockets.
//!
//! Both run `tether_embassy`'s tunnel task and one worker task per stream slot, on one static
//! [`budget::GatewayState`].
#![cfg_attr(feature = "firmware", no_std)]
#![cfg_attr(feature = "firmware", no_main)]

#[cfg(all(feature = "firmware", feature = "platform-std"))]
compile_error!(
    "features `firmware` and `platform-std` are exclusive: build the firmware with \
     --no-default-features --features firmware"
);

mod budget;

#[cfg(feature = "platform-std")]
mod cli;
#[cfg(feature = "platform-std")]
mod host;

#[cfg(feature = "firmware")]
mod firmware;

#[cfg(feature = "platform-std")]
fn main() {
    match cli::parse(std::env::args().skip(1)) {
        Ok(cli::Command::Help) => print!("{}", cli::USAGE),
        Ok(cli::Command::Version) => println!("tether-gateway {}", env!("CARGO_PKG_VERSION")),
        Ok(cli::Command::PrintBudget) => print_budget(),
        Ok(cli::Command::Run(args)) => {
            cli::init_logging(args.json_logs);
            host::run(args)
        }
        Err(e) => cli::fail(&e),
    }
}

#[cfg(feature = "platform-std")]
fn print_budget() {
    println!(
        "streams {} x rings 2 x {} slots x {} B + tunnel rx {} + scratch {} + tx {}: static {} B \
         (gateway state {} B)",
        budget::STREAMS,
        budget::RING,
        budget::N,
        budget::RX_LEN,
        budget::SCRATCH_LEN,
        budget::TX_LEN,
        budget::STATIC_RAM,
        core::mem::size_of::<budget::GatewayState>()
    );
}

#[cfg(not(any(feature = "firmware", feature = "platform-std")))]
compile_error!("enable one platform: `platform-std` (default) or `firmware`");
