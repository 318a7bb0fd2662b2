//! Support for the end-to-end tests in `tests/`: real kubectl -> `tether-control-plane` ->
//! tunnel -> `tether-agent` -> kubesim, all real processes on loopback with TLS and tokens.
//!
//! * [`bins`]: finds (and builds once per test process) the three binaries.
//! * [`cluster::Cluster`]: starts kubesim, the control plane and the agent, writes kubeconfigs,
//!   waits until the tunnel works, prints the processes' log tails when a test fails and stops
//!   everything on drop.
//! * [`kubectl`]: runs the real kubectl (`/usr/bin/kubectl`, v1.32) and collects its results.
//! * [`scripted`]: a scripted control plane (WebSocket server, TLS or plain) for driving the
//!   agent message by message.
//! * [`pipeops_agent`]: a scripted agent that behaves as the incumbent PipeOps agent.
//! * [`services`]: real Redis and PostgreSQL servers for the fleet tests.
//! * [`connect_proxy`]: an HTTP CONNECT proxy for the agent's proxy tests.
//! * [`data`]: deterministic payloads and checksums; [`https`]: a tiny HTTPS client;
//!   [`tls`]: throwaway certificates; [`proc`]: child processes with log files.
//! * [`terminal`]: `exec -it` on a real pty with a resize.
//! * [`transfer`]: `kubectl cp` and `port-forward` transfers checked byte for byte.

pub mod bins;
pub mod cluster;
pub mod connect_proxy;
pub mod data;
pub mod https;
pub mod kubectl;
pub mod pipeops_agent;
pub mod proc;
pub mod scripted;
pub mod services;
pub mod terminal;
pub mod tls;
pub mod transfer;

pub use cluster::{CLUSTER, Cluster, POD, USER};
pub use kubectl::{Outcome, Running};
