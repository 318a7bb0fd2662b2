//! kubesim: a Kubernetes API simulator that real `kubectl` v1.32 accepts.
//!
//! It serves discovery, pods and namespaces, and the streaming subresources `exec`, `attach`,
//! `portforward` and `log`, over HTTP/1.1 (plain or TLS), with an optional bearer token.
//! Pods are simulated on this machine: each pod is a working directory under a temporary root;
//! exec runs real local processes there (so absolute paths, e.g. in `kubectl cp`, are real
//! paths of this machine); every container has a long-running main process (`sh` reading
//! stdin) whose output is the container log and which `attach` connects to.
//!
//! In-process use (tests):
//!
//! ```no_run
//! # async fn demo() -> Result<(), String> {
//! let config = kubesim::Config::new("127.0.0.1:0".parse().unwrap()).pod("default/demo")?;
//! let handle = kubesim::Server::start(config).await?;
//! println!("listening on {}", handle.addr());
//! let seen = handle.requests();
//! # let _ = seen; Ok(()) }
//! ```
//!
//! The `kubesim` binary logs one `request` event per request (fields `method`, `path`,
//! `query`, `headers` = JSON array of `[name, value]` with the credential redacted) and one
//! `listening` event (field `addr`) once bound; with `--log-format json` these are JSON lines
//! on stderr, which is how out-of-process tests read them.

pub mod attach;
pub mod channel;
pub mod config;
pub mod container;
pub mod discovery;
pub mod exec;
pub mod http;
pub mod logs;
pub mod objects;
pub mod patch;
pub mod pods;
pub mod portforward;
pub mod query;
pub mod record;
pub mod server;
pub mod session;
pub mod spdy;
pub mod status;
pub mod store;
pub mod table;
pub mod tls;
pub mod upgrade;

pub use config::{Config, PodSpec, TlsPem};
pub use record::RecordedRequest;
pub use server::{Handle, Server};
