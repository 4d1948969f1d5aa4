//! Binding, serving and graceful shutdown.

use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::thread::JoinHandle;

use axum::serve::ListenerExt;
use tokio::sync::oneshot;

use crate::config::ServerConfig;
use crate::routes::{self, AppState};
use crate::store::AnyStore;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("receiver server failed: {0}")]
    Io(#[from] io::Error),
    #[error("in-flight requests did not finish within {0:?} of the shutdown request")]
    ShutdownTimedOut(std::time::Duration),
    #[error("the receiver server thread panicked")]
    Panicked,
}

/// A bound, not yet serving receiver. Binding first lets the caller learn the real port
/// (for `:0`) and report bind errors before anything else starts.
pub struct Server {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    state: Arc<AppState>,
}

impl Server {
    pub fn bind(addr: SocketAddr, config: ServerConfig, store: impl Into<AnyStore>) -> Result<Server, ServeError> {
        let bind_error = |source| ServeError::Bind { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let state = Arc::new(AppState {
            store: store.into(),
            config,
            batches: AtomicU64::new(0),
            batch_slots: routes::batch_slots(),
        });
        Ok(Server { listener, addr, state })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests
    /// finish (within the configured grace period) and returns. Must run inside a Tokio
    /// runtime with I/O and timers enabled.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let grace = self.state.config.shutdown_grace;
        let listener = tokio::net::TcpListener::from_std(self.listener)?.tap_io(|stream| {
            // Responses are written whole; Nagle would only add latency on small answers.
            let _ = stream.set_nodelay(true);
        });
        let app = routes::router(self.state);
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .into_future();
        let mut serving = std::pin::pin!(serving);
        tokio::select! {
            result = &mut serving => Ok(result?),
            () = shutdown => {
                let _ = stop.send(());
                match tokio::time::timeout(grace, serving).await {
                    Ok(result) => Ok(result?),
                    Err(_) => Err(ServeError::ShutdownTimedOut(grace)),
                }
            }
        }
    }
}

impl Server {
    /// Blocking: serves on a new multi-threaded runtime until SIGINT or SIGTERM (Ctrl-C off
    /// Unix), then shuts down gracefully. `ready` runs once the signal handlers are in place
    /// and before the first request is served: the moment to announce the address, because
    /// a signal sent after the announcement is then always a graceful stop.
    pub fn run_until_signal(self, ready: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
        let addr = self.addr;
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let result = runtime.block_on(async move {
            let stop = termination()?;
            ready(addr);
            self.run_until(stop).await
        });
        // Dropping the runtime waits for store calls still running on blocking threads, so
        // the store is released (and the database closed) before this returns.
        drop(runtime);
        result
    }
}

#[cfg(unix)]
fn termination() -> io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn termination() -> io::Result<impl Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// A receiver serving on its own thread and runtime, for tests, benchmarks and in-process
/// demos. Dropping it shuts the server down gracefully.
pub struct RunningServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

impl RunningServer {
    pub fn start(
        addr: SocketAddr,
        config: ServerConfig,
        store: impl Into<AnyStore>,
    ) -> Result<RunningServer, ServeError> {
        let server = Server::bind(addr, config, store)?;
        let addr = server.local_addr();
        let runtime =
            tokio::runtime::Builder::new_multi_thread().thread_name("kitty-sync-receiver").enable_all().build()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("kitty-sync-receiver".into()).spawn(move || {
            // The runtime is dropped on this thread after serving, which waits for
            // blocking store calls still running; the store is released after them.
            runtime.block_on(server.run_until(async move {
                let _ = stopped.await;
            }))
        })?;
        Ok(RunningServer { addr, stop: Some(stop), thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://HOST:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts down gracefully and waits until the store is released.
    pub fn stop(mut self) -> Result<(), ServeError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| ServeError::Panicked)?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
