//! Starting and stopping a kubesim server: bind, accept, TLS, HTTP/1.1 with upgrades.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::http::State;
use crate::pods::Pods;
use crate::record::RecordedRequest;

/// Entry point for running kubesim in-process.
pub struct Server;

impl Server {
    /// Binds `config.listen`, starts the pods' main processes and serves in background tasks
    /// of the current tokio runtime. The error is one line suitable for a CLI.
    pub async fn start(config: Config) -> Result<Handle, String> {
        let acceptor = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?;
        let store = Arc::new(crate::store::Store::new());
        let pods = Pods::start(&config.pods, config.root.as_deref(), store.clone())
            .map_err(|e| format!("cannot start pods: {e}"))?;
        let state = Arc::new(State {
            recorder: Default::default(),
            token: config.token.clone(),
            pods,
            store,
            advertise: addr.to_string(),
            no_websocket: config.no_websocket,
        });
        let accept_state = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let state = accept_state.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        Some(acceptor) => match acceptor.accept(tcp).await {
                            Ok(tls) => serve_connection(tls, state).await,
                            Err(e) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        },
                        None => serve_connection(tcp, state).await,
                    }
                });
            }
        });
        Ok(Handle { addr, state, task })
    }
}

async fn serve_connection<I>(io: I, state: Arc<State>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| crate::http::handle(state.clone(), req));
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// A running server; dropping it stops accepting and kills the pods' main processes
/// (sessions already running finish on their own).
pub struct Handle {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Handle {
    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.recorder.snapshot()
    }

    /// Root directory of the pods' working directories.
    pub fn pods_root(&self) -> &std::path::Path {
        self.state.pods.root()
    }

    /// Resolves when the accept loop ends (it only ends on panic or [`Handle::shutdown`]).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }

    /// Stops accepting and kills the pods' main processes.
    pub fn shutdown(&self) {
        self.task.abort();
        self.state.pods.shutdown();
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
