//! The command line: `serve` (the default), `migrate`, and `openapi`.

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat, Settings};
use crate::startup::Application;
use crate::store::postgres;
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
}

fn fail(lines: &str) -> std::process::ExitCode {
    for line in lines.lines() {
        eprintln!("token-broker: configuration error: {line}");
    }
    std::process::ExitCode::from(2)
}

/// Runs the command line; the process exit code says how it went.
pub async fn run() -> std::process::ExitCode {
    let cli = Cli::parse();
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
            let pool = match postgres::connect_lazy(url) {
                Ok(pool) => pool,
                Err(error) => return fail(&format!("DATABASE_URL: {error}")),
            };
            match postgres::migrate(&pool).await {
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
