//! `keel serve`: the same layer stack a host links in ([`keel::stack::Stack`]), over HTTP.
//!
//! Two protocols on one listener, HTTP/1.1 and HTTP/2: OpenAI's (`/v1/embeddings`,
//! `/v1/chat/completions`, `/v1/completions`, `/v1/models`) and KServe's Open Inference
//! Protocol v2 (`/v2/...`), plus `/health` and `/metrics`. Every answer carries its guardrails
//! (request id, version, route, price, review decision) in headers and in a `keel` object of its
//! body; every refusal is a status code with its typed reason ([`wire`]). Once the store holds an
//! API key, every request but the health probes needs one ([`auth`]).
//!
//! A Rust host mounts [`Server::router`] in its own axum app, or runs [`Server::serve`]; the
//! `keel serve` command runs [`run`].
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod admin;
pub mod auth;
mod body;
mod kserve;
mod openai;
pub mod tls;
pub mod wire;

use axum::extract::State;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use keel::stack::Stack;
use keel::Infer;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wire::ApiError;

/// The server's limits.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The largest request body taken (bytes); a larger one is answered 413.
    pub body_limit: usize,
    /// The most tokens a generation may ask for (`max_tokens`); more is answered 400.
    pub max_tokens: usize,
    /// `max_tokens` when a request does not say.
    pub default_max_tokens: usize,
    /// On shutdown, how long streams in flight may go on before they are cut (each still
    /// settled: charged, counted, recorded).
    pub stream_grace: Duration,
}

/// `keel serve --config FILE`: the limits, each optional.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    body_limit: Option<usize>,
    max_tokens: Option<usize>,
    default_max_tokens: Option<usize>,
    stream_grace_s: Option<f64>,
}

impl ServeConfig {
    /// The limits of a TOML text (`body_limit`, `max_tokens`, `default_max_tokens`,
    /// `stream_grace_s`), the defaults for those it does not set.
    ///
    /// ```
    /// let c = keel_serve::ServeConfig::from_toml("max_tokens = 64\nstream_grace_s = 2.5").unwrap();
    /// assert_eq!((c.max_tokens, c.stream_grace.as_millis()), (64, 2500));
    /// ```
    ///
    /// # Errors
    /// Not TOML, an unknown key, a value out of range.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut c = Self::default();
        c.body_limit = file.body_limit.unwrap_or(c.body_limit);
        c.max_tokens = file.max_tokens.unwrap_or(c.max_tokens);
        c.default_max_tokens = file
            .default_max_tokens
            .unwrap_or(c.default_max_tokens.min(c.max_tokens));
        if let Some(s) = file.stream_grace_s {
            c.stream_grace =
                Duration::try_from_secs_f64(s).map_err(|e| format!("stream_grace_s {s}: {e}"))?;
        }
        if c.max_tokens == 0 || c.default_max_tokens == 0 || c.default_max_tokens > c.max_tokens {
            return Err(format!(
                "need 0 < default_max_tokens ({}) <= max_tokens ({})",
                c.default_max_tokens, c.max_tokens
            ));
        }
        Ok(c)
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            body_limit: 2 << 20,
            max_tokens: 4096,
            default_max_tokens: 256,
            stream_grace: Duration::from_secs(10),
        }
    }
}

/// An HTTP server over a stack. Cheap to clone (clones share it).
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

struct Shared {
    stack: Arc<Stack>,
    config: ServeConfig,
    keys: auth::Keys,
    /// Set on shutdown once the streams' grace is over: streams in flight end at their next token.
    cutting: AtomicBool,
}

impl Server {
    /// A server over `stack`. Its API keys are the stack's store's (a stack without a version
    /// layer has no store, hence no keys: every request is let in).
    pub fn new(stack: Stack, config: ServeConfig) -> Self {
        let store = stack.versioned().map(|v| v.store().clone());
        Self {
            shared: Arc::new(Shared {
                stack: Arc::new(stack),
                config,
                keys: auth::Keys::new(store),
                cutting: AtomicBool::new(false),
            }),
        }
    }

    /// The stack it serves.
    pub fn stack(&self) -> &Stack {
        &self.shared.stack
    }

    /// Its limits.
    pub fn config(&self) -> &ServeConfig {
        &self.shared.config
    }

    /// Whether streams in flight must end now (shutdown, past the grace).
    fn cutting(&self) -> bool {
        self.shared.cutting.load(Ordering::Relaxed)
    }

    /// Every route: OpenAI's, KServe v2's, `/health`, `/metrics`; each behind the key check of
    /// its scope, the health probes open.
    pub fn router(&self) -> Router {
        let open = Router::new()
            .route("/health", get(health))
            .merge(kserve::health());
        let infer = Router::new()
            .merge(openai::routes())
            .merge(kserve::routes())
            .route_layer(from_fn_with_state(self.gate(auth::Scope::Infer), auth::check));
        let admin =
            admin::admin_routes().route_layer(from_fn_with_state(self.gate(auth::Scope::Admin), auth::check));
        let review = admin::review_routes()
            .route_layer(from_fn_with_state(self.gate(auth::Scope::Review), auth::check));
        let any_key = Router::new()
            .route("/metrics", get(metrics))
            .route_layer(from_fn_with_state(self.gate(auth::Scope::Any), auth::check));
        open.merge(infer)
            .merge(admin)
            .merge(review)
            .merge(any_key)
            .fallback(not_found)
            .layer(axum::extract::DefaultBodyLimit::max(
                self.shared.config.body_limit,
            ))
            .layer(axum::middleware::from_fn(auth::request_id))
            .with_state(self.clone())
    }

    /// The key check of a group of routes that need `scope`.
    fn gate(&self, scope: auth::Scope) -> auth::Gate {
        auth::Gate {
            server: self.clone(),
            scope,
        }
    }

    /// Loads the version each name's `production` alias points at, so that the first requests
    /// do not wait for it (and `/v2/health/ready` says so).
    ///
    /// # Errors
    /// A version that does not load.
    pub fn preload(&self) -> keel::Result<()> {
        for name in self.production_names()? {
            self.shared.stack.target(&name)?;
        }
        Ok(())
    }

    /// The registered names with a `production` alias.
    fn production_names(&self) -> keel::Result<Vec<String>> {
        let Some(versioned) = self.shared.stack.versioned() else {
            return Ok(Vec::new());
        };
        let mut names: Vec<String> = versioned
            .catalog()?
            .into_iter()
            .filter(|e| e.aliases.iter().any(|a| a == keel::version::PRODUCTION))
            .map(|e| e.name)
            .collect();
        names.dedup();
        Ok(names)
    }

    /// Whether the store answers and every production alias's version is loaded.
    fn ready(&self) -> keel::Result<bool> {
        let Some(versioned) = self.shared.stack.versioned() else {
            return Ok(true);
        };
        // A replica that cannot reach its store cannot record what it answers: not ready.
        if versioned.store().routes_version().is_err() {
            return Ok(false);
        }
        let loaded: Vec<keel::VersionId> = self
            .shared
            .stack
            .engine()
            .models()
            .into_iter()
            .map(|m| m.id)
            .collect();
        for name in self.production_names()? {
            let routes = versioned.routes(&name)?;
            if let Some(id) = routes.aliases.get(keel::version::PRODUCTION) {
                if !loaded.contains(id) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Serves on `listener` (a `tokio::net::TcpListener`, better through [`no_delay`], or a
    /// [`tls::TlsListener`] for HTTPS)
    /// until `shutdown` resolves; then stops accepting, lets requests in
    /// flight finish (streams for [`ServeConfig::stream_grace`], then cut at their next
    /// token), and flushes the stack (lineage, review queue) so that nothing answered is lost.
    ///
    /// # Errors
    /// The listener's; the stack's flush.
    pub async fn serve<L>(
        self,
        listener: L,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        L: axum::serve::Listener,
        L::Addr: std::fmt::Debug,
    {
        let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
        let signal = async move {
            shutdown.await;
            let _ = stopping_tx.send(true);
        };
        let grace = self.shared.config.stream_grace;
        let cutter = {
            let server = self.clone();
            tokio::spawn(async move {
                if stopping_rx.wait_for(|s| *s).await.is_ok() {
                    tokio::time::sleep(grace).await;
                    tracing::info!("shutdown: the streams' grace is over; cutting those in flight");
                    server.shared.cutting.store(true, Ordering::Relaxed);
                }
            })
        };
        let app = self.router().into_make_service();
        axum::serve(listener, app).with_graceful_shutdown(signal).await?;
        cutter.abort();
        let stack = self.shared.stack.clone();
        tokio::task::spawn_blocking(move || stack.flush()).await??;
        tracing::info!("shutdown: every answer recorded");
        Ok(())
    }
}

/// What `keel serve` runs: where to listen, the stack, the limits.
pub struct RunOptions {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// Listen beyond the loopback interface though the store holds no API key (anyone who can
    /// reach the port may then use every route).
    pub allow_open: bool,
    /// The limits.
    pub config: ServeConfig,
    /// TLS: the certificate chain's and the private key's PEM files (`None`: plain HTTP).
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Serves `stack` until SIGTERM or Ctrl-C, on a runtime of its own (what `keel serve` runs).
/// Refuses to listen beyond the loopback interface with no API key in the store unless told to.
///
/// # Errors
/// The address taken; an open server refused; a version that does not load; the flush at the end.
pub fn run(stack: Stack, options: RunOptions) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let server = Server::new(stack, options.config);
    if !options.listen.ip().is_loopback() && !options.allow_open && !server.shared.keys.any()? {
        return Err(format!(
            "refusing to serve {} with no API key: anyone who reaches it could use it. Create one (keel keys create --name NAME --scope infer), listen on 127.0.0.1, or pass --allow-open",
            options.listen
        )
        .into());
    }
    let tls = match &options.tls {
        Some((cert, key)) => Some(tls::config(cert, key)?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(options.listen).await?;
        let preloading = server.clone();
        tokio::task::spawn_blocking(move || preloading.preload()).await??;
        let address = listener.local_addr()?;
        match tls {
            Some(config) => {
                let listener = tls::TlsListener::new(listener, config)?;
                // The one line a script waits for (the port, when asked for port 0).
                println!("keel serve: listening on https://{address}");
                server.serve(listener, terminated()).await
            }
            None => {
                println!("keel serve: listening on http://{address}");
                server.serve(no_delay(listener), terminated()).await
            }
        }
    })
}

/// `listener` with `TCP_NODELAY` on each connection, as [`run`] serves: a stream's events go out
/// as they are made, not held back by Nagle's algorithm until the client acknowledges the last.
pub fn no_delay(listener: tokio::net::TcpListener) -> impl axum::serve::Listener<Addr = SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("TCP_NODELAY: {e}");
        }
    })
}

/// SIGTERM or Ctrl-C.
async fn terminated() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown: stopped accepting; finishing the requests in flight");
}

/// `GET /health`: the process answers (a liveness probe).
async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// `GET /metrics`: the stack's metrics, Prometheus text. Rendered on the blocking pool: some
/// samples are read from the store (the review queue, a fleet's budgets), whose PostgreSQL
/// client blocks (and may not run on a runtime's worker).
async fn metrics(State(server): State<Server>) -> Result<Response, ApiError> {
    let text = blocking(move || server.shared.stack.metrics_text()).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "invalid_request_error",
        "route_not_found",
        format!("no route {}", uri.path()),
    )
}

/// Runs `f` on the blocking pool (the stack's calls wait on the scheduler): a panic in it is a
/// 500, never the server's end.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("the request's worker failed: {e}")))
}
