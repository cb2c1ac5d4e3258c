//! The metrics text on a local HTTP port, for a Prometheus server to scrape (feature
//! `metrics-http`): one thread, `GET /metrics`, nothing else.

use super::Metrics;
use std::sync::Arc;
use std::thread::JoinHandle;

/// A running metrics endpoint; dropping it stops the server and joins its thread.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    address: std::net::SocketAddr,
}

impl MetricsServer {
    /// Serves `metrics` (a stack's: [`crate::stack::Stack::metrics`]) on `address` (e.g.
    /// "127.0.0.1:9464"; port 0 picks a free one).
    ///
    /// # Errors
    /// An address that cannot be bound, as [`crate::Error::InvalidArgument`].
    pub fn start(metrics: Arc<Metrics>, address: &str) -> crate::Result<Self> {
        let server = tiny_http::Server::http(address)
            .map_err(|e| crate::Error::InvalidArgument(format!("cannot serve metrics on {address}: {e}")))?;
        let server = Arc::new(server);
        let address = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| crate::Error::InvalidArgument(format!("{address} is not an IP address")))?;
        let serving = server.clone();
        let thread = std::thread::Builder::new()
            .name("keel-metrics".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    let response =
                        if request.url() == "/metrics" && *request.method() == tiny_http::Method::Get {
                            let header = tiny_http::Header::from_bytes(
                                "Content-Type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .expect("a valid header");
                            tiny_http::Response::from_string(metrics.text()).with_header(header)
                        } else {
                            tiny_http::Response::from_string("only GET /metrics is served here\n")
                                .with_status_code(404)
                        };
                    // A client gone before its answer is no error of ours.
                    let _ = request.respond(response);
                }
            })
            .map_err(|e| crate::Error::Internal(format!("cannot start the metrics thread: {e}")))?;
        Ok(Self {
            server,
            thread: Some(thread),
            address,
        })
    }

    /// The address it listens on.
    pub fn address(&self) -> std::net::SocketAddr {
        self.address
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
