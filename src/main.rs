//! The `token-broker` binary: everything lives in the library.

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    token_broker::cli::run().await
}
