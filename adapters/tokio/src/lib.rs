//! tokio runtime adapter for tether-core: the pieces the agent and the control plane share.
//!
//! The adapter drives the core and holds no protocol logic of its own: sockets, clocks, TLS and
//! credentials live here; framing, stream lifecycle and flow control live in `tether-core`.

pub mod backoff;
pub mod buf;
pub mod byte_pipe;
pub mod socket;
pub mod token;
pub(crate) mod tunnel_driver;
pub mod watched;
pub mod wire_mode;

// The agent runtime and its Kubernetes access.
pub mod agent;
pub mod kube;

// The control-plane runtime.
pub mod control_plane;
