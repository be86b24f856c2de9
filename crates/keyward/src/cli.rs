//! The command line: argument parsing, dispatch to a backend, and `keyward serve`.

use crate::client::{Admin, Remote};
use crate::error::{self, Error};
use crate::model::{self, AgentUpdate, AuditFilter, Imply, ImportKey, KeyUpdate, NewAdmin, NewAgent, NewKey, NewScope, RotateKey};
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
    /// The store, by URL: sqlite:///path/to/keyward.db or postgres://user:password@host:5432/db
    /// (several `keyward serve` replicas may share one PostgreSQL); wins over --db [default: the --db file]
    #[arg(long, global = true, env = "KEYWARD_STORE", value_name = "URL", hide_env_values = true)]
    store: Option<String>,
    /// Talk to a running `keyward serve` instead of the database file, e.g. http://127.0.0.1:7070
    #[arg(long, global = true, env = "KEYWARD_URL", value_name = "URL")]
    url: Option<String>,
    /// CA certificate (PEM) to trust for --url https://…, besides the system's
    #[arg(long, global = true, env = "KEYWARD_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Admin token for --url: the bootstrap token or a personal one (`keyward admin create`);
    /// for `serve`, the bootstrap token it accepts, if set
    #[arg(long, global = true, env = "KEYWARD_ADMIN_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Prefix of generated keys, `<prefix>_<random>_<checksum>`
    #[arg(long, global = true, env = "KEYWARD_KEY_PREFIX", default_value = store::DEFAULT_KEY_PREFIX, value_name = "PREFIX")]
    key_prefix: String,
    /// Machine-readable JSON output
    #[arg(long, global = true)]
    json: bool,
    /// After a change, do not wait (up to 2 s) for every connected Envoy to apply it
    #[arg(long, global = true)]
    no_wait: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address of the admin API (and of the feed, without --feed-listen)
    #[arg(long, env = "KEYWARD_LISTEN", default_value = "127.0.0.1:7070", value_name = "ADDR")]
    listen: String,
    /// Serve the feed (GET /v1/feed, POST /v1/feed/usage, POST /v1/feed/rates) on this address
    /// only, and the admin API only on --listen
    #[arg(long, env = "KEYWARD_FEED_LISTEN", value_name = "ADDR")]
    feed_listen: Option<String>,
    /// This replica's name in /metrics [default: the host name, else "keyward"]
    #[arg(long, env = "KEYWARD_REPLICA", value_name = "NAME")]
    replica: Option<String>,
    /// Serve HTTPS on every listener with this PEM certificate chain (leaf first); needs --tls-key
    #[arg(long, env = "KEYWARD_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert
    #[arg(long, env = "KEYWARD_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Mark console cookies Secure even without --tls-cert (TLS ends at a proxy in front);
    /// with --tls-cert they always are
    #[arg(long, env = "KEYWARD_CONSOLE_SECURE")]
    console_secure: bool,
    /// Count rate limits fleet-wide in this Redis (or Valkey): redis://host:port[/db]. Without
    /// it, or while it does not answer, each Envoy enforces limit/(connected Envoys)
    #[arg(long, env = "KEYWARD_RATE_STORE", value_name = "URL", hide_env_values = true)]
    rate_store: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane: the admin API and the snapshot feed the Envoys fetch
    Serve(ServeArgs),
    /// Manage agents: the principals that own keys and carry scopes
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Manage keys
    #[command(subcommand)]
    Key(KeyCommand),
    /// The scope catalogue: the only scopes agents and keys may carry, and their implications
    #[command(subcommand)]
    Scope(ScopeCommand),
    /// Move and keep the store: copy between engines, back up and restore SQLite
    #[command(subcommand)]
    Store(StoreCommand),
    /// Admins of the admin API and console: each has a role (owner, editor, viewer) and a
    /// personal token, and the audit log names them
    #[command(subcommand)]
    Admin(AdminCommand),
    /// The bootstrap admin token of `keyward serve` (an owner, `api` in the audit log); for
    /// personal tokens, see `keyward admin`
    #[command(subcommand, name = "admin-token")]
    AdminToken(AdminTokenCommand),
    /// Show the snapshot version and each connected Envoy's applied version
    Status,
    /// Show the append-only audit log of changes
    Audit {
        /// Show the last N entries (that match the filters)
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only changes made by this actor: an admin's name, `api` (the bootstrap token) or
        /// `cli:USER` (the CLI on the store)
        #[arg(long)]
        actor: Option<String>,
        /// Only changes to this agent and its keys
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        /// Only this action (e.g. key.revoke), or a family of them (e.g. key)
        #[arg(long)]
        action: Option<String>,
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
        /// Requests an idle client may send at once, at most the limit's N [default: N]
        #[arg(long, value_name = "N", requires = "rate")]
        burst: Option<u32>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Change an agent's description, scopes (capabilities), rate limit or burst
    Update {
        /// The agent's name
        name: String,
        /// What the agent is for
        #[arg(long)]
        description: Option<String>,
        /// Replace the scopes, comma-separated
        #[arg(long, value_name = "SCOPES", conflicts_with_all = ["add_scope", "remove_scope"])]
        scopes: Option<String>,
        /// Add a scope (repeatable)
        #[arg(long = "add-scope", value_name = "SCOPE")]
        add_scope: Vec<String>,
        /// Remove a scope (repeatable); the agent's keys lose it at once
        #[arg(long = "remove-scope", value_name = "SCOPE")]
        remove_scope: Vec<String>,
        /// Rate limit for the agent's keys (N/s, N/min, N/h, N/day), or `none`
        #[arg(long, value_name = "RATE")]
        rate: Option<String>,
        /// Requests an idle client may send at once, or `none` for the whole limit
        #[arg(long, value_name = "N")]
        burst: Option<String>,
    },
    /// List agents
    List,
    /// Show an agent and its keys
    Show {
        /// The agent's name
        name: String,
    },
    /// Turn off API access for an agent: its keys get 403 ACCESS_DISABLED
    Disable {
        /// The agent's name
        name: String,
        /// Shown to API users as the ACCESS_DISABLED message, e.g. "Your plan does not include API access"
        #[arg(long)]
        reason: Option<String>,
    },
    /// Turn API access back on
    Enable {
        /// The agent's name
        name: String,
    },
    /// Delete an agent and revoke all of its keys
    Delete {
        /// The agent's name
        name: String,
    },
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
    /// Requests an idle client may send at once, at most the limit's N [default: N]
    #[arg(long, value_name = "N", requires = "rate")]
    burst: Option<u32>,
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
            burst: self.burst,
            path_prefixes: self.path_prefixes,
        }
    }
}

/// `none` clears a value; anything else must parse.
fn clearable_u32(flag: &str, v: Option<String>) -> Result<Option<Option<u32>>, CliError> {
    match v.as_deref() {
        None => Ok(None),
        Some("none") => Ok(Some(None)),
        Some(n) => n.parse().map(|n| Some(Some(n))).map_err(|_| CliError {
            error: error::invalid("burst", format!("{n:?} is not a number of requests (or `none`)")),
            flag: flag.into(),
        }),
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
        /// Accept keys shorter than 16 characters (easy to guess)
        #[arg(long)]
        allow_weak: bool,
        /// Import many keys in one change: one per stdin line, a key or `sha256:<hex>`;
        /// they are named `<name>-<line>`
        #[arg(long)]
        batch: bool,
    },
    /// List keys, masked, with expiry, last use and status
    List {
        /// Only this agent's keys
        #[arg(long)]
        agent: Option<String>,
    },
    /// Show one key, masked
    Show {
        /// The key's id (`key list` shows it)
        id: String,
    },
    /// Change a key's name, scopes, expiry, rate limit, burst or path restrictions
    Update {
        /// The key's id (`key list` shows it)
        id: String,
        /// New name, unique among the agent's live keys
        #[arg(long)]
        name: Option<String>,
        /// Scopes, a subset of the agent's
        #[arg(long, value_name = "SCOPES", conflicts_with = "inherit_scopes")]
        scopes: Option<String>,
        /// Drop the key's own scopes: it has its agent's
        #[arg(long)]
        inherit_scopes: bool,
        /// New expiry time, RFC 3339
        #[arg(long, value_name = "RFC3339", conflicts_with_all = ["ttl", "no_expiry"])]
        expires: Option<String>,
        /// New lifetime from now, e.g. 30d
        #[arg(long, value_name = "DURATION", conflicts_with = "no_expiry")]
        ttl: Option<String>,
        /// Remove the expiry
        #[arg(long)]
        no_expiry: bool,
        /// Rate limit overriding the agent's (N/s, N/min, N/h, N/day), or `none` to use the agent's
        #[arg(long, value_name = "RATE")]
        rate: Option<String>,
        /// Requests an idle client may send at once, or `none` for the whole limit
        #[arg(long, value_name = "N")]
        burst: Option<String>,
        /// Restrict the key to paths under this prefix (repeatable; replaces the list)
        #[arg(long = "path-prefix", value_name = "PATH", conflicts_with = "no_path_prefix")]
        path_prefixes: Vec<String>,
        /// Remove the path restrictions
        #[arg(long)]
        no_path_prefix: bool,
    },
    /// Revoke a key
    Revoke {
        /// The key's id (`key list` shows it)
        id: String,
    },
    /// Issue a new key with the same settings; the old one expires after the grace period
    Rotate {
        /// The key's id (`key list` shows it)
        id: String,
        /// How long the old key keeps working
        #[arg(long, default_value = store::DEFAULT_GRACE, value_name = "DURATION")]
        grace: String,
        /// The new key's lifetime from now [default: the old key's original lifetime]
        #[arg(long, value_name = "DURATION", conflicts_with_all = ["expires", "no_expiry"])]
        ttl: Option<String>,
        /// The new key's expiry time, RFC 3339
        #[arg(long, value_name = "RFC3339", conflicts_with = "no_expiry")]
        expires: Option<String>,
        /// The new key never expires
        #[arg(long)]
        no_expiry: bool,
    },
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copy a whole store into a new, empty one (SQLite to PostgreSQL or back): agents, keys,
    /// scopes, the audit log, usage, the snapshot version and the admin token's digest
    Copy {
        /// The store to read, e.g. sqlite:///var/lib/keyward/keyward.db
        #[arg(long, value_name = "URL")]
        from: String,
        /// The store to write, which must hold no data yet, e.g. postgres://keyward@db/keyward
        #[arg(long, value_name = "URL")]
        to: String,
    },
    /// Take a consistent backup of a SQLite store into a new file, while `keyward serve` runs
    Backup {
        /// The backup file to create
        file: PathBuf,
    },
    /// Put a SQLite backup back: the store gets the backup's data, a new identity and a version
    /// above any it had, so every Envoy drops what the backup lacks
    Restore {
        /// A file made by `keyward store backup`
        file: PathBuf,
    },
    /// After restoring a store by other means (pg_restore): give it a new identity and a
    /// higher version, so every Envoy drops keys the restored store lacks
    Rekey,
}

#[derive(Debug, Subcommand)]
enum ScopeCommand {
    /// List the catalogue: each scope, its description, what it implies and who carries it
    List,
    /// Add a scope to the catalogue
    Add {
        /// The new scope's name, e.g. billing:read
        name: String,
        /// What the scope grants, e.g. "Read access to all resources"
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Remove a scope that no agent or key carries
    Remove {
        /// The scope to remove
        name: String,
    },
    /// Make scope A imply scope B (a key with A may do what B allows)
    Imply {
        /// The scope that implies
        #[arg(value_name = "A")]
        scope: String,
        /// The scope it implies
        #[arg(value_name = "B")]
        implies: String,
        /// Remove the implication instead
        #[arg(long)]
        remove: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Create an admin and its personal token (printed once)
    Create {
        /// The admin's name, unique; the audit log records it
        name: String,
        /// owner: everything, including admins and the scope catalogue; editor: agents and keys;
        /// viewer: read only
        #[arg(long, value_name = "ROLE")]
        role: String,
    },
    /// List admins, their roles and status (never their tokens)
    List,
    /// Disable an admin: its token and console sessions stop working at once
    Disable {
        /// The admin's name
        name: String,
    },
    /// Enable a disabled admin again: its token works again
    Enable {
        /// The admin's name
        name: String,
    },
    /// Issue a new personal token for an admin (printed once); the old one stops working
    Token {
        /// The admin's name
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum AdminTokenCommand {
    /// Replace the admin token `keyward serve` accepts (unless it runs with KEYWARD_ADMIN_TOKEN);
    /// the new token is printed once
    Rotate,
}

fn default_db() -> PathBuf {
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("keyward").join("keyward.db")
}

/// The CLI flag a request field came from, for error messages. `positional` lists the fields
/// the command takes as positional arguments, named as the user typed them.
fn flag_for(field: &str, positional: &[(&str, &str)]) -> String {
    if let Some((_, shown)) = positional.iter().find(|(f, _)| *f == field) {
        return shown.to_string();
    }
    match field {
        "id" => "ID".into(),
        "add_scopes" => "--add-scope".into(),
        "remove_scopes" => "--remove-scope".into(),
        "request" => "error".into(),
        "expires_at" => "--expires".into(),
        "path_prefixes" => "--path-prefix".into(),
        "key" => "the key on stdin".into(),
        other => format!("--{}", other.replace('_', "-")),
    }
}

/// Runs the CLI; the process exit code says how it went.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        // `keyward key list | head -1`: a closed pipe ends the command quietly, as in other
        // Unix tools, instead of a panic in println!.
        #[cfg(unix)]
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let json = cli.json;
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let code = match e.downcast_ref::<CliError>() {
                Some(CliError { error, flag }) => {
                    if json {
                        eprintln!("{}", error.body());
                    } else if flag == "error" {
                        eprintln!("error: {}", error.message());
                    } else {
                        eprintln!("error: {flag}: {}", error.message());
                    }
                    match error {
                        Error::Invalid { .. } | Error::NotFound { .. } | Error::RemoteNotFound { .. } | Error::Conflict { .. } | Error::Missing(_) => 2,
                        Error::Unauthorized(_) | Error::Forbidden(_) => 3,
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
    // The flag a store problem is reported against.
    let store_flag = if cli.store.is_some() { "--store" } else { "--db" };
    let location = match &cli.store {
        Some(url) => store::Location::parse(url).map_err(|error| CliError { error, flag: "--store".into() })?,
        None => store::Location::Sqlite(cli.db.clone().unwrap_or_else(default_db)),
    };
    if let Command::Serve(args) = &cli.command {
        return serve(&location, args, cli.token.clone(), &cli.key_prefix);
    }
    if let Command::Store(cmd) = &cli.command {
        if cli.url.is_some() {
            anyhow::bail!("store commands work on the store itself; run them without --url (with --store or --db)");
        }
        return store_command(cmd, &location, store_flag, cli.json);
    }
    if let Command::AdminToken(AdminTokenCommand::Rotate) = &cli.command {
        if cli.url.is_some() {
            anyhow::bail!("admin-token rotate works on the store (where serve keeps the token's digest); run it without --url");
        }
        return rotate_admin_token(&location, store_flag);
    }
    let wait = !cli.no_wait;
    let mut backend: Box<dyn Admin> = match &cli.url {
        Some(url) => {
            let token = cli.token.clone().context("--url needs the admin token: pass --token or set KEYWARD_ADMIN_TOKEN")?;
            let remote = Remote::new(url, token, wait, cli.ca_cert.as_deref());
            Box::new(remote.map_err(|error| CliError { flag: if error.field() == Some("ca_cert") { "--ca-cert" } else { "--url" }.into(), error })?)
        }
        None => {
            // Only a first write may create the store; anything else on a missing file is an
            // error. A first write that would be refused is tried on an in-memory store first,
            // so that it leaves no folder or empty store behind.
            let creates = matches!(
                cli.command,
                Command::Agent(AgentCommand::Create { .. }) | Command::Scope(ScopeCommand::Add { .. }) | Command::Admin(AdminCommand::Create { .. })
            );
            let missing = matches!(&location, store::Location::Sqlite(db) if !db.exists());
            let opened = if creates && missing {
                first_write_probe(&cli.command, &cli.key_prefix)
                    .map_err(|error| CliError { flag: error.field().map_or_else(|| "error".into(), |f| flag_for(f, &[("name", "NAME")])), error })?;
                Store::open_at(&location)
            } else {
                Store::open_existing_at(&location)
            };
            let mut store = match opened {
                Err(error @ Error::Missing(_)) => return Err(CliError { error, flag: store_flag.into() }.into()),
                other => other.with_context(|| format!("opening {}", location.display()))?,
            };
            store.actor = format!("cli:{}", std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into()));
            store.key_prefix = cli.key_prefix.clone();
            Box::new(store)
        }
    };
    let positional: &[(&str, &str)] = match &cli.command {
        Command::Agent(AgentCommand::Create { .. }) => &[("name", "NAME")],
        Command::Agent(_) => &[("agent", "NAME")],
        Command::Key(KeyCommand::Show { .. } | KeyCommand::Update { .. } | KeyCommand::Revoke { .. } | KeyCommand::Rotate { .. }) => &[("id", "ID")],
        Command::Scope(ScopeCommand::Imply { .. }) => &[("name", "A"), ("implies", "B")],
        Command::Scope(_) => &[("name", "NAME")],
        Command::Admin(_) => &[("name", "NAME")],
        _ => &[],
    };
    let wrap = |error: Error| CliError { flag: error.field().map_or_else(|| "error".into(), |f| flag_for(f, positional)), error };
    let mut out = output::Output { json: cli.json, applied: None };
    // After a change: how it reached the Envoys, said plainly.
    let reach = |backend: &mut Box<dyn Admin>, out: &mut output::Output| -> anyhow::Result<()> {
        out.applied = backend.applied(wait).map_err(wrap)?;
        Ok(())
    };
    match cli.command {
        // Handled above, before any backend is opened.
        Command::Serve { .. } | Command::AdminToken(_) | Command::Store(_) => {}
        Command::Agent(AgentCommand::Create { name, scopes, rate, burst, description }) => {
            let req = NewAgent { name, scopes: model::split_scopes(&scopes), rate, burst, description };
            let r = backend.create_agent(&req).map_err(wrap)?;
            reach(&mut backend, &mut out)?;
            out.created_agent(&r)
        }
        Command::Agent(AgentCommand::Update { name, description, scopes, add_scope, remove_scope, rate, burst }) => {
            let burst = clearable_u32("--burst", burst)?;
            let req = AgentUpdate {
                description,
                scopes: scopes.as_deref().map(model::split_scopes),
                add_scopes: add_scope.iter().flat_map(|s| model::split_scopes(s)).collect(),
                remove_scopes: remove_scope.iter().flat_map(|s| model::split_scopes(s)).collect(),
                // `none` reaches the store as written: it clears the limit there, for the API too.
                rate: rate.map(Some),
                burst,
            };
            let r = backend.update_agent(&name, &req).map_err(wrap)?;
            reach(&mut backend, &mut out)?;
            out.agent_changed("Updated", &r)
        }
        Command::Agent(AgentCommand::List) => out.agents(&backend.list_agents().map_err(wrap)?),
        Command::Agent(AgentCommand::Show { name }) => out.agent_detail(&backend.show_agent(&name).map_err(wrap)?),
        Command::Agent(AgentCommand::Disable { name, reason }) => {
            let r = backend.set_agent_enabled(&name, false, reason.as_deref()).map_err(wrap)?;
            reach(&mut backend, &mut out)?;
            out.agent_changed("Disabled", &r)
        }
        Command::Agent(AgentCommand::Enable { name }) => {
            let r = backend.set_agent_enabled(&name, true, None).map_err(wrap)?;
            reach(&mut backend, &mut out)?;
            out.agent_changed("Enabled", &r)
        }
        Command::Agent(AgentCommand::Delete { name }) => {
            let r = backend.delete_agent(&name).map_err(wrap)?;
            reach(&mut backend, &mut out)?;
            out.agent_changed("Deleted", &r)
        }
        Command::Key(KeyCommand::Create(opts)) => {
            let r = backend.create_key(&opts.into_new_key()).map_err(wrap)?;
            reach(&mut backend, &mut out)?;
            out.created_key(&r)
        }
        Command::Key(KeyCommand::Import { key, batch: true, allow_weak, .. }) => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("reading keys from stdin")?;
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            let mut progress = crate::progress::Progress::new(cli.json);
            let ids = backend.import_batch(&key.into_new_key(), &lines, allow_weak, &mut |n| progress.update("keys", n as u64, lines.len() as u64));
            progress.finish();
            let ids = ids.map_err(wrap)?;
            reach(&mut backend, &mut out)?;
            out.imported_batch(&ids)
        }
        Command::Key(KeyCommand::Import { key, digest, allow_weak, .. }) => {
            let secret = match digest {
                Some(_) => None,
                None => {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s).context("reading the key from stdin")?;
                    Some(s.trim().to_string())
                }
            };
            let req = ImportKey { key: key.into_new_key(), secret, digest, allow_weak };
            let r = backend.import_key(&req).map_err(wrap)?;
            reach(&mut backend, &mut out)?;
            out.key_changed("Imported", &r)
        }
        Command::Key(KeyCommand::List { agent }) => out.keys(&backend.list_keys(agent.as_deref()).map_err(wrap)?),
        Command::Key(KeyCommand::Show { id }) => out.key(&backend.get_key(&id).map_err(wrap)?),
        Command::Key(KeyCommand::Update { id, name, scopes, inherit_scopes, expires, ttl, no_expiry, rate, burst, path_prefixes, no_path_prefix }) => {
            let burst = clearable_u32("--burst", burst)?;
            let req = KeyUpdate {
                name,
                scopes: if inherit_scopes { Some(None) } else { scopes.as_deref().map(|s| Some(model::split_scopes(s))) },
                expires_at: if no_expiry { Some(None) } else { expires.map(Some) },
                ttl,
                // `none` reaches the store as written: it clears the limit there, for the API too.
                rate: rate.map(Some),
                burst,
                path_prefixes: if no_path_prefix { Some(Vec::new()) } else { Some(path_prefixes).filter(|p| !p.is_empty()) },
            };
            let r = backend.update_key(&id, &req).map_err(wrap)?;
            reach(&mut backend, &mut out)?;
            out.key_changed("Updated", &r)
        }
        Command::Key(KeyCommand::Revoke { id }) => {
            let r = backend.revoke_key(&id).map_err(wrap)?;
            reach(&mut backend, &mut out)?;
            out.key_changed("Revoked", &r)
        }
        Command::Key(KeyCommand::Rotate { id, grace, ttl, expires, no_expiry }) => {
            let r = backend.rotate_key(&id, &RotateKey { grace: Some(grace), ttl, expires_at: expires, no_expiry }).map_err(wrap)?;
            reach(&mut backend, &mut out)?;
            out.rotated(&r)
        }
        Command::Scope(ScopeCommand::List) => out.scopes(&backend.list_scopes().map_err(wrap)?),
        Command::Scope(ScopeCommand::Add { name, description }) => {
            let r = backend.add_scope(&NewScope { name, description }).map_err(wrap)?;
            reach(&mut backend, &mut out)?;
            out.scope_changed("Added", &r)
        }
        Command::Scope(ScopeCommand::Remove { name }) => {
            let r = backend.remove_scope(&name).map_err(wrap)?;
            reach(&mut backend, &mut out)?;
            out.scope_changed("Removed", &r)
        }
        Command::Scope(ScopeCommand::Imply { scope, implies, remove }) => {
            let r = backend.imply_scope(&scope, &Imply { implies, remove }).map_err(wrap)?;
            reach(&mut backend, &mut out)?;
            out.scope_changed(if remove { "No longer implied by" } else { "Implications of" }, &r)
        }
        Command::Status => out.status(&backend.status().map_err(wrap)?),
        Command::Audit { limit, actor, agent, action } => out.audit(&backend.audit(limit, &AuditFilter { actor, agent, action }).map_err(wrap)?),
        // Admins are not part of the snapshot: no Envoy has anything to apply.
        Command::Admin(AdminCommand::Create { name, role }) => out.admin_token("Created", &backend.create_admin(&NewAdmin { name, role }).map_err(wrap)?),
        Command::Admin(AdminCommand::List) => out.admins(&backend.list_admins().map_err(wrap)?),
        Command::Admin(AdminCommand::Disable { name }) => out.admin_changed("Disabled", &backend.set_admin_enabled(&name, false).map_err(wrap)?),
        Command::Admin(AdminCommand::Enable { name }) => out.admin_changed("Enabled", &backend.set_admin_enabled(&name, true).map_err(wrap)?),
        Command::Admin(AdminCommand::Token { name }) => out.admin_token("New token", &backend.new_admin_token(&name).map_err(wrap)?),
        Command::Snapshot => out.json_value(&backend.snapshot().map_err(wrap)?),
        Command::Usage { agent, since } => out.usage(&backend.usage(agent.as_deref(), &since).map_err(wrap)?),
    }
    Ok(())
}

/// Runs a first write (`agent create`, `scope add`) on an in-memory store: if the rules refuse
/// it there, they would refuse it on the new file too.
fn first_write_probe(command: &Command, key_prefix: &str) -> Result<(), Error> {
    let mut probe = Store::memory()?;
    probe.key_prefix = key_prefix.to_string();
    match command {
        Command::Agent(AgentCommand::Create { name, scopes, rate, burst, description }) => {
            let req = NewAgent { name: name.clone(), scopes: model::split_scopes(scopes), rate: rate.clone(), burst: *burst, description: description.clone() };
            probe.create_agent(&req).map(|_| ())
        }
        Command::Scope(ScopeCommand::Add { name, description }) => probe.add_scope(&NewScope { name: name.clone(), description: description.clone() }).map(|_| ()),
        Command::Admin(AdminCommand::Create { name, role }) => probe.create_admin(&NewAdmin { name: name.clone(), role: role.clone() }).map(|_| ()),
        _ => Ok(()),
    }
}

/// `keyward store …`: operations on a whole store.
fn store_command(cmd: &StoreCommand, location: &store::Location, flag: &str, json: bool) -> anyhow::Result<()> {
    let mut progress = crate::progress::Progress::new(json);
    let mut update = |stage: &str, done: u64, total: u64| progress.update(stage, done, total);
    let actor = format!("cli:{}", std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into()));
    let opened = |loc: &store::Location, flag: &str| -> anyhow::Result<Store> {
        let mut s = Store::open_existing_at(loc).map_err(|error| CliError { error, flag: flag.into() })?;
        s.actor = actor.clone();
        Ok(s)
    };
    let result = match cmd {
        StoreCommand::Copy { from, to } => {
            let from = store::Location::parse(from).map_err(|error| CliError { error, flag: "--from".into() })?;
            let to = store::Location::parse(to).map_err(|error| CliError { error, flag: "--to".into() })?;
            let started = std::time::Instant::now();
            let summary = store::copy::copy(&from, &to, &mut update).map_err(|(side, error)| CliError { error, flag: side.into() })?;
            let rows: serde_json::Map<String, serde_json::Value> = summary.rows.iter().map(|(t, n)| (t.to_string(), (*n).into())).collect();
            let secs = started.elapsed().as_secs_f64();
            serde_json::json!({"from": from.display(), "to": to.display(), "snapshot_version": summary.version, "rows": rows, "seconds": secs})
        }
        StoreCommand::Backup { file } => {
            let store = opened(location, flag)?;
            let version = store.backup(file, &mut update).map_err(|error| CliError { flag: flag_of(&error, flag), error })?;
            serde_json::json!({"backup": file.display().to_string(), "snapshot_version": version})
        }
        StoreCommand::Restore { file } => {
            let mut store = opened(location, flag)?;
            let (from, version) = store.restore(file, &mut update).map_err(|error| CliError { flag: flag_of(&error, flag), error })?;
            serde_json::json!({"restored": file.display().to_string(), "backup_version": from, "snapshot_version": version})
        }
        StoreCommand::Rekey => {
            let mut store = opened(location, flag)?;
            // Past every version an Envoy is known to have applied; one that applied more (after
            // the dump) moves the store past it on its next feed request.
            let floor = store.max_applied().map_err(|error| CliError { error, flag: flag.into() })?;
            let version = store.rekey(floor, "store.rekey", serde_json::json!({})).map_err(|error| CliError { error, flag: flag.into() })?;
            serde_json::json!({"snapshot_version": version, "store_id": store.store_id()?})
        }
    };
    progress.finish();
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    match cmd {
        StoreCommand::Copy { .. } => {
            println!("Copied {} to {} at snapshot version {}:", result["from"].as_str().unwrap_or(""), result["to"].as_str().unwrap_or(""), result["snapshot_version"]);
            if let Some(rows) = result["rows"].as_object() {
                for (table, n) in rows {
                    println!("  {table:<20} {n}");
                }
            }
            println!("in {:.1} s. Point `keyward serve --store` at the new store; Envoys keep what they applied.", result["seconds"].as_f64().unwrap_or(0.0));
        }
        StoreCommand::Backup { file } => println!("Backed up snapshot version {} to {}.", result["snapshot_version"], file.display()),
        StoreCommand::Restore { file } => println!(
            "Restored {} (snapshot version {}). The store is now at version {} with a new identity: every Envoy replaces what it holds.",
            file.display(),
            result["backup_version"],
            result["snapshot_version"]
        ),
        StoreCommand::Rekey => println!(
            "The store has a new identity and is at version {}: every Envoy replaces what it holds with it.",
            result["snapshot_version"]
        ),
    }
    Ok(())
}

/// The flag an error is reported against: its own field's, else the store's.
fn flag_of(error: &Error, store_flag: &str) -> String {
    match error.field() {
        Some("file") => "FILE".into(),
        _ => store_flag.into(),
    }
}

/// `admin-token rotate`: a new bootstrap admin token, printed once; only its digest is kept.
fn rotate_admin_token(location: &store::Location, flag: &str) -> anyhow::Result<()> {
    let mut store = Store::open_existing_at(location).map_err(|error| CliError { error, flag: flag.into() })?;
    store.actor = format!("cli:{}", std::env::var("USER").unwrap_or_else(|_| "unknown".into()));
    let token = store::generate_key("kwadm")?;
    store.set_meta("admin_token_sha256", &keyward_core::Digest::of(token.as_bytes()).to_hex(), "admin_token.rotate")?;
    println!("New admin token (shown once; store it now, only its digest is kept):\n\n  {token}\n");
    println!("A running `keyward serve` accepts it within a second, and no longer accepts the old one,");
    println!("unless it was started with KEYWARD_ADMIN_TOKEN, which then stays the token.");
    Ok(())
}

/// `serve --replica`'s default: the host name, else "keyward".
fn default_replica() -> String {
    let file = std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string());
    file.filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "keyward".into())
}

/// The TLS configuration of `--tls-cert` and `--tls-key`, read and checked before anything starts.
fn serve_tls(args: &ServeArgs) -> anyhow::Result<Option<Arc<tokio_rustls::rustls::ServerConfig>>> {
    // An empty variable (compose's `${KEYWARD_TLS_CERT-}`) is unset.
    let given = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
    match (given(&args.tls_cert), given(&args.tls_key)) {
        (Some(cert), Some(key)) => Ok(Some(crate::tls::server_config(&cert, &key)?)),
        (None, None) => Ok(None),
        (Some(_), None) => anyhow::bail!("--tls-cert needs --tls-key (KEYWARD_TLS_KEY): the certificate's private key"),
        (None, Some(_)) => anyhow::bail!("--tls-key needs --tls-cert (KEYWARD_TLS_CERT): the certificate it belongs to"),
    }
}

fn serve(location: &store::Location, args: &ServeArgs, env_token: Option<String>, key_prefix: &str) -> anyhow::Result<()> {
    let tls = serve_tls(args)?;
    // An empty KEYWARD_RATE_STORE (compose's `${KEYWARD_RATE_STORE-}`) is unset.
    let rate_store = match args.rate_store.as_deref().filter(|u| !u.is_empty()) {
        Some(url) => Some(crate::rates::RateStore::open(url).map_err(anyhow::Error::msg)?),
        None => None,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEYWARD_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut store = Store::open_at(location).with_context(|| format!("opening {}", location.display()))?;
    let replica = args.replica.clone().filter(|r| !r.is_empty()).unwrap_or_else(default_replica);
    let mut _lock = None;
    match location {
        store::Location::Sqlite(db) => {
            // Held while serve runs: the CLI on the file sees that its changes are published.
            // Another serve on the same store holds its Envoys' feed requests open: keep them.
            let alone = !crate::applied::serve_running(db);
            _lock = Some(
                crate::applied::ServeLock::acquire(db).with_context(|| format!("locking {}", crate::applied::lock_path(db).display()))?,
            );
            if alone {
                store.forget_open_feeds(None)?;
            }
        }
        // Other replicas hold their own Envoys' feeds; this one held none yet.
        _ => store.forget_open_feeds(Some(&replica))?,
    }
    store.replica = Some(replica.clone());
    store.is_server = true;
    store.actor = "api".into();
    store.key_prefix = key_prefix.to_string();
    // An empty KEYWARD_ADMIN_TOKEN (docker-compose.yml passes `${KEYWARD_ADMIN_TOKEN-}`) is unset.
    let from_env = env_token.as_deref().is_some_and(|t| !t.is_empty());
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
                // Replicas starting together on a new store: one token wins, and only its
                // maker prints it.
                if store.init_meta("admin_token_sha256", &digest.to_hex(), "admin_token.create")? {
                    println!("admin token (shown once; store it now, only its digest is kept):\n\n  {token}\n");
                    digest
                } else {
                    store
                        .meta("admin_token_sha256")?
                        .and_then(|h| keyward_core::Digest::from_hex(&h))
                        .context("the store's admin token digest is unreadable")?
                }
            }
        },
    };
    let feed_token_digest = match std::env::var("KEYWARD_FEED_TOKEN") {
        Ok(t) if t.len() >= 16 => Some(keyward_core::Digest::of(t.as_bytes())),
        Ok(_) => anyhow::bail!("KEYWARD_FEED_TOKEN must be at least 16 characters"),
        Err(_) => None,
    };
    let engine = store.engine().name();
    let mut state = api::AppState::new(store, token_digest, feed_token_digest)?;
    // `admin-token rotate` writes a new digest to the file; the watcher picks it up.
    state.token_from_store = !from_env;
    state.replica = replica;
    state.engine = engine;
    state.console_secure = tls.is_some() || args.console_secure;
    if let Some(rs) = rate_store {
        tracing::info!(rate_store = %rs.shown(), "rate limits are counted fleet-wide in the rate store while it answers");
        state.rates = crate::rates::Rates::with_store(rs);
    }
    let state = Arc::new(state);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let postgres = match location {
        store::Location::Postgres(url) => Some(url.clone()),
        _ => None,
    };
    runtime.block_on(async move {
        // Changes made by the CLI straight to the file reach the feed through this watcher. On
        // PostgreSQL, every replica's changes arrive at once by LISTEN/NOTIFY; the watcher is
        // the safety net for a notification lost with a connection.
        let period = if postgres.is_some() { 1000 } else { 20 };
        tokio::spawn(api::watch_version(Arc::clone(&state), std::time::Duration::from_millis(period)));
        if let Some(url) = postgres {
            let s = Arc::clone(&state);
            crate::notify::listen(url, move |payload| {
                // `block <address> <until>`: another replica saw the address reach the limit.
                if let Some(rest) = payload.strip_prefix("block ") {
                    let mut parts = rest.split(' ');
                    if let (Some(Ok(ip)), Some(Ok(until))) = (parts.next().map(str::parse), parts.next().map(str::parse::<i64>)) {
                        let left = u64::try_from(until - store::now_unix()).unwrap_or(0);
                        s.guard.block(ip, left, std::time::Instant::now());
                    }
                    return;
                }
                if let Err(e) = s.refresh_version() {
                    tracing::warn!(error = %e, "reading the snapshot version");
                }
            });
        }
        tokio::spawn(api::heartbeat(Arc::clone(&state), state.replica.clone()));
        tokio::spawn(api::persist_rates(Arc::clone(&state)));
        // An empty KEYWARD_FEED_LISTEN (compose's `${KEYWARD_FEED_LISTEN-}`) is unset.
        let listeners = match args.feed_listen.as_deref().filter(|a| !a.is_empty()) {
            None => vec![(args.listen.as_str(), "--listen", api::Role::AdminAndFeed)],
            Some(feed) => vec![(args.listen.as_str(), "--listen", api::Role::Admin), (feed, "--feed-listen", api::Role::Feed)],
        };
        // Every address is bound before any serves: a taken port fails the start.
        let mut bound = Vec::new();
        for (addr, flag, role) in listeners {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("{flag}: cannot listen on {addr}"))?;
            bound.push((listener, role));
        }
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut servers = tokio::task::JoinSet::new();
        for (listener, role) in bound {
            let address = listener.local_addr()?;
            let incoming = match &tls {
                Some(config) => crate::tls::Incoming::tls(listener, Arc::clone(config))?,
                None => crate::tls::Incoming::plain(listener)?,
            };
            tracing::info!(%address, listener = %role.as_str(), tls = tls.is_some(), store = %location.display(), replica = %state.replica, version = env!("CARGO_PKG_VERSION"), "keyward serve listening");
            // Client addresses feed the token brute-force guard. `tap_io` is a no-op here: it is
            // what gives `ConnectInfo<SocketAddr>` to a listener other than `TcpListener`.
            let incoming = axum::serve::ListenerExt::tap_io(incoming, |_| {});
            let app = api::router_for(Arc::clone(&state), role).into_make_service_with_connect_info::<std::net::SocketAddr>();
            let mut stopped = stopped.clone();
            servers.spawn(async move {
                axum::serve(incoming, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    })
                    .await
            });
        }
        tokio::spawn(async move {
            shutdown().await;
            let _ = stop.send(true);
        });
        while let Some(served) = servers.join_next().await {
            served??;
        }
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
