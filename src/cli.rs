//! The command line: `serve` (the default), `migrate`, `openapi`, `dev`, and the operator
//! commands `sessions list|revoke` and `rotate-keys` (their work lives in [`crate::admin`]).

use clap::{Parser, Subcommand};

use crate::admin;
use crate::config::{Config, LogFormat, Settings};
use crate::startup::Application;
use crate::store::{postgres, StoreError};
use crate::telemetry;

#[derive(Parser)]
#[command(
    name = "token-broker",
    version,
    about = "OAuth 2.0 / OpenID Connect backend-for-frontend token broker"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (the default)
    Serve,
    /// Apply database migrations and exit
    Migrate,
    /// Print the OpenAPI document
    Openapi,
    /// Zero-setup local mode: in-memory stores, a built-in IdP, loopback only. Not for production.
    Dev,
    /// Inspect or end a user's sessions (incident response); same configuration as serve
    Sessions {
        #[command(subcommand)]
        action: SessionsCommand,
    },
    /// Re-encrypt every stored token under the first key of BROKER_ENCRYPTION_KEYS.
    ///
    /// Procedure: put the new key first (keeping the old one) and roll it out to every replica;
    /// run rotate-keys; then remove the old key. Sessions no configured key opens are deleted.
    RotateKeys,
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// List a subject's sessions: id, created, last seen, expiry (never a token, cookie or hash)
    List {
        /// The IdP subject (`sub` claim) whose sessions to list
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        sub: String,
        /// One JSON object per line instead of a table
        #[arg(long)]
        json: bool,
    },
    /// End every session of a subject on all replicas.
    ///
    /// The sessions' refresh tokens are not revoked at the IdP (the broker forgets them); to keep
    /// the user out, also disable them at the IdP, or they can simply log in again.
    Revoke {
        /// The IdP subject (`sub` claim) whose sessions to end
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        sub: String,
    },
}

fn fail(lines: &str) -> std::process::ExitCode {
    for line in lines.lines() {
        eprintln!("token-broker: configuration error: {line}");
    }
    std::process::ExitCode::from(2)
}

/// The operator commands, which share configuration, stores and exit codes.
enum Operation {
    Sessions(SessionsCommand),
    RotateKeys,
}

/// Operator commands log warnings to stderr, so that stdout is only their output (`--json`).
fn init_operator_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs an operator command (`sessions …`, `rotate-keys`): exit 0 on success, 2 on a
/// configuration error, 1 with one line (no secret in it) when a store fails.
async fn operator(settings: &Settings, operation: Operation) -> std::process::ExitCode {
    let config = match Config::from_settings(settings) {
        Ok(config) => config,
        Err(errors) => return fail(&errors.to_string()),
    };
    init_operator_logs();
    match operate(&config, operation).await {
        Ok(output) => {
            print!("{output}");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            let line = admin::one_line_without_secrets(&error.to_string(), &config);
            eprintln!("token-broker: {line}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn operate(config: &Config, operation: Operation) -> Result<String, admin::AdminError> {
    let stores = admin::connect(config).await?;
    match operation {
        Operation::Sessions(SessionsCommand::List { sub, json }) => {
            let sessions = admin::list_sessions(stores.sessions.as_ref(), &sub).await?;
            if json {
                admin::render_json_lines(&sessions)
                    .map_err(|e| StoreError::Corrupt(e.to_string()).into())
            } else if sessions.is_empty() {
                Ok(format!("no sessions of subject {}\n", sub.escape_debug()))
            } else {
                Ok(admin::render_table(&sessions))
            }
        }
        Operation::Sessions(SessionsCommand::Revoke { sub }) => {
            let ended =
                admin::revoke_sessions(stores.sessions.as_ref(), stores.cache.as_ref(), &sub)
                    .await?;
            Ok(format!(
                "ended {ended} session(s) of subject {} (refresh tokens were not revoked at the IdP)\n",
                sub.escape_debug()
            ))
        }
        Operation::RotateKeys => {
            let report =
                admin::rotate_keys(stores.sessions.as_ref(), stores.cache.as_ref()).await?;
            let key_id = config.encryption_keys.first().map_or("", |k| k.id());
            let mut output = format!("resealed {} sessions under key {key_id}\n", report.resealed);
            if report.ended > 0 {
                output.push_str(&format!(
                    "ended {} session(s) sealed under keys no longer configured\n",
                    report.ended
                ));
            }
            Ok(output)
        }
    }
}

/// Runs the command line; the process exit code says how it went.
pub async fn run() -> std::process::ExitCode {
    let code = run_command(Cli::parse()).await;
    // The log is written by a thread of its own: what is still buffered goes out before exit.
    telemetry::flush();
    code
}

async fn run_command(cli: Cli) -> std::process::ExitCode {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Openapi => {
            print!("{}", crate::openapi::document_json());
            std::process::ExitCode::SUCCESS
        }
        Command::Migrate => {
            telemetry::init(LogFormat::Json);
            let Some(url) = cli
                .settings
                .database_url
                .as_deref()
                .filter(|u| !u.is_empty())
            else {
                return fail("DATABASE_URL: is required (set it or pass --database-url)");
            };
            // The connections' time-out does not matter here: migrations run without one.
            let pools = match postgres::Pools::shared(url, std::time::Duration::from_secs(5)) {
                Ok(pools) => pools,
                Err(error) => return fail(&format!("DATABASE_URL: {error}")),
            };
            match postgres::migrate(pools.get()).await {
                Ok(()) => {
                    tracing::info!("migrations applied");
                    std::process::ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("token-broker: migrations failed: {error}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Dev => {
            telemetry::init(
                cli.settings
                    .log_format
                    .as_deref()
                    .map_or(LogFormat::Pretty, |f| {
                        if f == "json" {
                            LogFormat::Json
                        } else {
                            LogFormat::Pretty
                        }
                    }),
            );
            let (application, public_url) = match crate::dev::build(
                cli.settings.listen_addr.as_deref(),
                cli.settings.allowed_origins.as_deref(),
            ) {
                Ok(built) => built,
                Err(error) => {
                    eprintln!("token-broker: cannot start dev mode: {error}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            println!("{}", crate::dev::banner(&public_url));
            match application.run_until_stopped().await {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("token-broker: server error: {error}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Sessions { action } => operator(&cli.settings, Operation::Sessions(action)).await,
        Command::RotateKeys => operator(&cli.settings, Operation::RotateKeys).await,
        Command::Serve => {
            let config = match Config::from_settings(&cli.settings) {
                Ok(config) => config,
                Err(errors) => return fail(&errors.to_string()),
            };
            telemetry::init(config.log_format);
            let application = match Application::build(config).await {
                Ok(application) => application,
                Err(error) => {
                    eprintln!("token-broker: cannot start: {error}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            match application.run_until_stopped().await {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("token-broker: server error: {error}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
