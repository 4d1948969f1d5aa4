//! Binding, serving and graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::thread::JoinHandle;

use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinSet;

use crate::body;
use crate::config::{ConnectionLimits, ServerConfig};
use crate::connections::{Admission, Registry, Ticket};
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
        let reading_budget = Arc::new(body::reading_budget(config.max_body_bytes));
        let batch_slots = routes::batch_slots();
        let state = Arc::new(AppState {
            store: store.into(),
            config,
            batches: AtomicU64::new(0),
            batch_slots,
            reading_budget,
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
        let listener = tokio::net::TcpListener::from_std(self.listener)?;
        let limits = self.state.config.connections.clone();
        let registry = Registry::new(limits.max_connections);
        let http = http1_builder(&limits);
        let app = routes::router(self.state);
        let (stop, stopped) = watch::channel(false);
        let mut connections = JoinSet::new();
        let refusals = Arc::new(Semaphore::new(MAX_PENDING_REFUSALS));
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut shutdown => break,
            };
            // Finished connections are reaped here so the set stays as small as the open ones.
            while connections.try_join_next().is_some() {}
            let stream = match stream {
                Ok((stream, _)) => stream,
                Err(e) if transient_accept_error(&e) => {
                    // Out of file descriptors or a connection reset before we took it:
                    // back off briefly instead of spinning, then keep serving.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            // Responses are written whole; Nagle would only add latency on small answers.
            let _ = stream.set_nodelay(true);
            match registry.admit() {
                Admission::Admitted(ticket) => {
                    let task = serve_connection(http.clone(), app.clone(), stream, ticket, stopped.clone());
                    connections.spawn(task);
                }
                Admission::Full => {
                    if let Ok(permit) = Arc::clone(&refusals).try_acquire_owned() {
                        tokio::spawn(async move {
                            refuse_connection(stream).await;
                            drop(permit);
                        });
                    }
                }
            }
        }
        drop(listener);
        let _ = stop.send(true);
        let drained = async { while connections.join_next().await.is_some() {} };
        tokio::time::timeout(grace, drained).await.map_err(|_| ServeError::ShutdownTimedOut(grace))
    }
}

/// Connections refused at once (answer being written) at most; past it they are just closed.
const MAX_PENDING_REFUSALS: usize = 64;

fn http1_builder(limits: &ConnectionLimits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    // hyper restarts this timer whenever the connection waits for a request head, so it
    // bounds dribbled headers and idle keep-alive connections alike.
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    builder
}

fn transient_accept_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    ) || matches!(error.raw_os_error(), Some(code) if code == EMFILE || code == ENFILE || code == ENOBUFS || code == ENOMEM)
}

// errno values (Linux, macOS and the BSDs agree on these four).
const ENOMEM: i32 = 12;
const ENFILE: i32 = 23;
const EMFILE: i32 = 24;
#[cfg(target_os = "linux")]
const ENOBUFS: i32 = 105;
#[cfg(not(target_os = "linux"))]
const ENOBUFS: i32 = 55;

/// Serves one connection until it closes, is evicted, or the server shuts down.
async fn serve_connection(
    http: http1::Builder,
    app: axum::Router,
    stream: tokio::net::TcpStream,
    ticket: Ticket,
    mut stopped: watch::Receiver<bool>,
) {
    let activity = Arc::clone(ticket.activity());
    let tracked = Arc::clone(&activity);
    let service = TowerToHyperService::new(app);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        let activity = Arc::clone(&tracked);
        activity.request_started();
        request.extensions_mut().insert(Arc::clone(&activity));
        let answer = hyper::service::Service::call(&service, request);
        async move {
            let response = answer.await;
            activity.request_finished();
            response
        }
    });
    let connection = http.serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let mut stopping = false;
    loop {
        tokio::select! {
            // Errors here are the client's (reset, timeout, malformed head) and end only
            // this connection.
            _ = connection.as_mut() => break,
            // Dropping the connection closes the socket; the registry only evicts
            // connections that are idle or still sending their body.
            () = activity.evicted() => break,
            changed = stopped.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
    drop(ticket);
}

/// The answer to a connection the full server cannot take: a 503 the client retries.
async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    let body = br#"{"error":"the receiver has too many open connections, retry later","details":[]}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let answer = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.shutdown().await?;
        // Reading what the client already sent avoids a reset that would destroy the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
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
