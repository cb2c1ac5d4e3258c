//! `keel serve` (the stack over HTTP) and `keel keys` (who may call it).

use keel::DeviceKind;
use keel_serve::{RunOptions, ServeConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// `keel serve`'s flags.
#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// Where to listen (port 0: any free port, printed on the first line).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A TOML file of limits: `body_limit` (bytes), `max_tokens`, `default_max_tokens`,
    /// `stream_grace_s`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen beyond the loopback interface though the store holds no API key.
    #[arg(long)]
    allow_open: bool,
    /// Serve HTTPS with this certificate chain (PEM; with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
pub(crate) enum KeysCommand {
    /// Make a key; prints its secret once, on the last line (the store keeps only its sha256).
    Create {
        /// Its name (unique).
        #[arg(long)]
        name: String,
        /// What it may do: infer, review, admin (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        scope: Vec<String>,
        /// The tenant its requests are routed and charged as.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Every key (never a secret).
    List {
        /// Print JSON (one array).
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key: its requests are refused within a second.
    Revoke {
        /// Its name.
        name: String,
    },
}

/// Runs the server until SIGTERM or Ctrl-C.
pub(crate) fn serve(args: ServeArgs, device: DeviceKind, store: Option<String>) -> Result<()> {
    let config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            ServeConfig::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => ServeConfig::default(),
    };
    // Structured logs on stderr, one line per request with its id (RUST_LOG filters them).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let stack = crate::serving(device, store)?;
    let options = RunOptions {
        listen: args.listen,
        allow_open: args.allow_open,
        config,
        tls: args.tls_cert.zip(args.tls_key),
    };
    keel_serve::run(stack, options).map_err(|e| e.to_string().into())
}

/// `keel keys ...`.
pub(crate) fn keys(command: KeysCommand, store: Option<String>) -> Result<()> {
    let store = crate::open_store(store)?;
    match command {
        KeysCommand::Create { name, scope, tenant } => {
            let (secret, key) = keel_serve::auth::new_key(&name, &scope, tenant)?;
            store.add_key(&key)??;
            eprintln!(
                "keel: key '{}' made with the scopes [{}]; its secret, shown this once:",
                key.name,
                key.scopes.join(", ")
            );
            println!("{secret}");
        }
        KeysCommand::List { json } => {
            let keys = store.keys()?;
            if json {
                println!("{}", serde_json::to_string(&keys)?);
            }
            for k in keys.iter().filter(|_| !json) {
                let state = if k.revoked_ms.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{:<20} {:<8} scopes={:<20} tenant={}",
                    k.name,
                    state,
                    k.scopes.join(","),
                    k.tenant.as_deref().unwrap_or("-")
                );
            }
        }
        KeysCommand::Revoke { name } => {
            if !store.revoke_key(&name, keel::store::now_ms())? {
                return Err(format!("no key '{name}' in force").into());
            }
            eprintln!("keel: key '{name}' revoked");
        }
    }
    Ok(())
}
