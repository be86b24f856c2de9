//! The command line: argument parsing, dispatch to a backend, and `keyward serve`.

use crate::client::{Admin, Remote};
use crate::error::{self, Error};
use crate::model::{self, ImportKey, NewAgent, NewKey, RotateKey};
use crate::store::{self, Store};
use crate::{api, output};
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use std::io::Read as _;
use std::path::PathBuf;
use std::sync::Arc;

/// keyward control plane: agents and API keys for Envoy, stored as SHA-256 digests.
///
/// With no connection flags, commands act on the local store (the one `cargo xtask up` uses).
/// With --url, they go through a running `keyward serve`'s admin API.
#[derive(Debug, Parser)]
#[command(name = "keyward", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// SQLite database file [default: $XDG_DATA_HOME/keyward/keyward.db]
    #[arg(long, global = true, env = "KEYWARD_DB", value_name = "PATH")]
    db: Option<PathBuf>,
    /// Talk to a running `keyward serve` instead of the database file, e.g. http://127.0.0.1:7070
    #[arg(long, global = true, env = "KEYWARD_URL", value_name = "URL")]
    url: Option<String>,
    /// Admin token for --url (and the token `serve` accepts, if set)
    #[arg(long, global = true, env = "KEYWARD_ADMIN_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Prefix of generated keys, `<prefix>_<random>_<checksum>`
    #[arg(long, global = true, env = "KEYWARD_KEY_PREFIX", default_value = store::DEFAULT_KEY_PREFIX, value_name = "PREFIX")]
    key_prefix: String,
    /// Machine-readable JSON output
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane: the admin API (and, later, the snapshot feed)
    Serve {
        /// Address to listen on
        #[arg(long, env = "KEYWARD_LISTEN", default_value = "127.0.0.1:7070")]
        listen: String,
    },
    /// Manage agents: the principals that own keys and carry scopes
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Manage keys
    #[command(subcommand)]
    Key(KeyCommand),
    /// Show the snapshot version and each connected Envoy's applied version
    Status,
    /// Show the append-only audit log of changes
    Audit {
        /// Show the last N entries
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Print the snapshot the filter enforces (digests only), e.g. for a static `snapshot` config
    Snapshot,
    /// Show requests per key and per hour, as reported by the Envoys
    Usage {
        /// Only this agent's keys
        #[arg(long)]
        agent: Option<String>,
        /// How far back, e.g. 24h, 7d
        #[arg(long, default_value = "24h", value_name = "DURATION")]
        since: String,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Create an agent and its first key, `Production` (printed once)
    Create {
        /// Agent name, unique
        name: String,
        /// Scopes, comma-separated, e.g. read:all,write:all
        #[arg(long, value_name = "SCOPES")]
        scopes: String,
        /// Default rate limit for the agent's keys: N/s, N/min, N/h or N/day
        #[arg(long, value_name = "RATE")]
        rate: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// List agents
    List,
    /// Show an agent and its keys
    Show { name: String },
    /// Turn off API access for an agent: its keys get 403 ACCESS_DISABLED
    Disable { name: String },
    /// Turn API access back on
    Enable { name: String },
    /// Delete an agent and revoke all of its keys
    Delete { name: String },
}

#[derive(Debug, Args)]
struct KeyOptions {
    /// The agent that owns the key
    #[arg(long)]
    agent: String,
    /// Key name, unique among the agent's live keys [default: the key's id]
    #[arg(long)]
    name: Option<String>,
    /// Scopes, a subset of the agent's [default: the agent's]
    #[arg(long, value_name = "SCOPES")]
    scopes: Option<String>,
    /// Expiry time, RFC 3339 (e.g. 2027-01-31T00:00:00Z)
    #[arg(long, value_name = "RFC3339", conflicts_with = "ttl")]
    expires: Option<String>,
    /// Time to live, e.g. 90d, 24h, 30m
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    /// Rate limit overriding the agent's: N/s, N/min, N/h or N/day
    #[arg(long, value_name = "RATE")]
    rate: Option<String>,
    /// Restrict the key to paths under this prefix (repeatable)
    #[arg(long = "path-prefix", value_name = "PATH")]
    path_prefixes: Vec<String>,
}

impl KeyOptions {
    fn into_new_key(self) -> NewKey {
        NewKey {
            agent: self.agent,
            name: self.name,
            scopes: self.scopes.as_deref().map(model::split_scopes),
            expires_at: self.expires,
            ttl: self.ttl,
            rate: self.rate,
            path_prefixes: self.path_prefixes,
        }
    }
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Create a key (printed once)
    Create(KeyOptions),
    /// Import an existing key (read from stdin) or its SHA-256 (--digest), to migrate without reissuing
    Import {
        #[command(flatten)]
        key: KeyOptions,
        /// SHA-256 of the key, 64 hex digits, instead of the key on stdin
        #[arg(long, value_name = "HEX", conflicts_with = "batch")]
        digest: Option<String>,
        /// Import many keys in one change: one per stdin line, a key or `sha256:<hex>`;
        /// they are named `<name>-<line>`
        #[arg(long)]
        batch: bool,
    },
    /// List keys, masked, with expiry, last use and status
    List {
        #[arg(long)]
        agent: Option<String>,
    },
    /// Revoke a key
    Revoke { id: String },
    /// Issue a new key with the same settings; the old one expires after the grace period
    Rotate {
        id: String,
        /// How long the old key keeps working
        #[arg(long, default_value = store::DEFAULT_GRACE, value_name = "DURATION")]
        grace: String,
    },
}

fn default_db() -> PathBuf {
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("keyward").join("keyward.db")
}

/// The CLI flag a request field came from, for error messages.
fn flag_for(field: &str, positional_name: bool) -> String {
    match field {
        "name" if positional_name => "NAME".into(),
        "id" => "ID".into(),
        "expires_at" => "--expires".into(),
        "path_prefixes" => "--path-prefix".into(),
        "key" => "the key on stdin".into(),
        "request" => "request".into(),
        other => format!("--{}", other.replace('_', "-")),
    }
}

/// Runs the CLI; the process exit code says how it went.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let code = match e.downcast_ref::<CliError>() {
                Some(CliError { error, flag }) => {
                    if json {
                        eprintln!("{}", error.body());
                    } else {
                        eprintln!("error: {flag}: {}", error.message());
                    }
                    match error {
                        Error::Invalid { .. } | Error::NotFound { .. } | Error::Conflict { .. } => 2,
                        Error::Unauthorized(_) => 3,
                        _ => 1,
                    }
                }
                None => {
                    // A busy or full database gets the same plain words as the API's answer.
                    match e.chain().find_map(|c| c.downcast_ref::<Error>()).filter(|err| err.store_fault().is_some()) {
                        Some(err) => eprintln!("error: {e}: {}", err.message()),
                        None => eprintln!("error: {e:#}"),
                    }
                    1
                }
            };
            std::process::ExitCode::from(code)
        }
    }
}

/// An operation error, with the CLI flag it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {error}")]
struct CliError {
    error: Error,
    flag: String,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if !keyward_core::keyformat::valid_prefix(&cli.key_prefix) {
        return Err(CliError {
            error: error::invalid("prefix", format!("{:?} must be 1-32 of [A-Za-z0-9_], not starting or ending in '_'", cli.key_prefix)),
            flag: "--key-prefix".into(),
        }
        .into());
    }
    let db = cli.db.clone().unwrap_or_else(default_db);
    if let Command::Serve { listen } = &cli.command {
        return serve(&db, listen, cli.token.clone(), &cli.key_prefix);
    }
    let mut backend: Box<dyn Admin> = match &cli.url {
        Some(url) => {
            let token = cli.token.clone().context("--url needs the admin token: pass --token or set KEYWARD_ADMIN_TOKEN")?;
            Box::new(Remote::new(url, token))
        }
        None => {
            let mut store = Store::open(&db).with_context(|| format!("opening {}", db.display()))?;
            store.actor = format!("cli:{}", std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into()));
            store.key_prefix = cli.key_prefix.clone();
            Box::new(store)
        }
    };
    let positional_name = matches!(cli.command, Command::Agent(_));
    let wrap = |error: Error| CliError { flag: error.field().map_or_else(|| "error".into(), |f| flag_for(f, positional_name)), error };
    let out = output::Output { json: cli.json };
    match cli.command {
        // Handled above, before any backend is opened.
        Command::Serve { .. } => {}
        Command::Agent(AgentCommand::Create { name, scopes, rate, description }) => {
            let req = NewAgent { name, scopes: model::split_scopes(&scopes), rate, description };
            out.created_agent(&backend.create_agent(&req).map_err(wrap)?)
        }
        Command::Agent(AgentCommand::List) => out.agents(&backend.list_agents().map_err(wrap)?),
        Command::Agent(AgentCommand::Show { name }) => out.agent_detail(&backend.show_agent(&name).map_err(wrap)?),
        Command::Agent(AgentCommand::Disable { name }) => out.agent_changed("Disabled", &backend.set_agent_enabled(&name, false).map_err(wrap)?),
        Command::Agent(AgentCommand::Enable { name }) => out.agent_changed("Enabled", &backend.set_agent_enabled(&name, true).map_err(wrap)?),
        Command::Agent(AgentCommand::Delete { name }) => out.agent_changed("Deleted", &backend.delete_agent(&name).map_err(wrap)?),
        Command::Key(KeyCommand::Create(opts)) => out.created_key(&backend.create_key(&opts.into_new_key()).map_err(wrap)?),
        Command::Key(KeyCommand::Import { key, batch: true, .. }) => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("reading keys from stdin")?;
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            let ids = backend.import_batch(&key.into_new_key(), &lines).map_err(wrap)?;
            out.imported_batch(&ids)
        }
        Command::Key(KeyCommand::Import { key, digest, .. }) => {
            let secret = match digest {
                Some(_) => None,
                None => {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s).context("reading the key from stdin")?;
                    Some(s.trim().to_string())
                }
            };
            let req = ImportKey { key: key.into_new_key(), secret, digest };
            out.key_changed("Imported", &backend.import_key(&req).map_err(wrap)?)
        }
        Command::Key(KeyCommand::List { agent }) => out.keys(&backend.list_keys(agent.as_deref()).map_err(wrap)?),
        Command::Key(KeyCommand::Revoke { id }) => out.key_changed("Revoked", &backend.revoke_key(&id).map_err(wrap)?),
        Command::Key(KeyCommand::Rotate { id, grace }) => {
            out.rotated(&backend.rotate_key(&id, &RotateKey { grace: Some(grace) }).map_err(wrap)?)
        }
        Command::Status => out.status(&backend.status().map_err(wrap)?),
        Command::Audit { limit } => out.audit(&backend.audit(limit).map_err(wrap)?),
        Command::Snapshot => out.json_value(&backend.snapshot().map_err(wrap)?),
        Command::Usage { agent, since } => out.usage(&backend.usage(agent.as_deref(), &since).map_err(wrap)?),
    }
    Ok(())
}

fn serve(db: &std::path::Path, listen: &str, env_token: Option<String>, key_prefix: &str) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEYWARD_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut store = Store::open(db).with_context(|| format!("opening {}", db.display()))?;
    store.actor = "api".into();
    store.key_prefix = key_prefix.to_string();
    // An empty KEYWARD_ADMIN_TOKEN (docker-compose.yml passes `${KEYWARD_ADMIN_TOKEN-}`) is unset.
    let token_digest = match env_token.filter(|t| !t.is_empty()) {
        Some(token) => {
            if token.len() < 16 {
                anyhow::bail!("KEYWARD_ADMIN_TOKEN must be at least 16 characters");
            }
            keyward_core::Digest::of(token.as_bytes())
        }
        None => match store.meta("admin_token_sha256")?.and_then(|h| keyward_core::Digest::from_hex(&h)) {
            Some(d) => d,
            None => {
                let token = store::generate_key("kwadm")?;
                let digest = keyward_core::Digest::of(token.as_bytes());
                store.set_meta("admin_token_sha256", &digest.to_hex(), "admin_token.create")?;
                println!("admin token (shown once; store it now, only its digest is kept):\n\n  {token}\n");
                digest
            }
        },
    };
    let feed_token_digest = match std::env::var("KEYWARD_FEED_TOKEN") {
        Ok(t) if t.len() >= 16 => Some(keyward_core::Digest::of(t.as_bytes())),
        Ok(_) => anyhow::bail!("KEYWARD_FEED_TOKEN must be at least 16 characters"),
        Err(_) => None,
    };
    let state = Arc::new(api::AppState::new(store, token_digest, feed_token_digest)?);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        // Changes made by the CLI straight to the file reach the feed through this watcher.
        tokio::spawn(api::watch_version(Arc::clone(&state), std::time::Duration::from_millis(50)));
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
        tracing::info!(address = %listener.local_addr()?, db = %db.display(), version = env!("CARGO_PKG_VERSION"), "keyward serve listening");
        // Client addresses feed the token brute-force guard.
        let app = api::router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
        axum::serve(listener, app).with_graceful_shutdown(shutdown()).await?;
        tracing::info!("keyward serve stopped");
        anyhow::Ok(())
    })
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
