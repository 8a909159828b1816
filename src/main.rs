//! The `token-broker` binary: everything lives in the library. It allocates with mimalloc
//! (README, "Choices"): glibc's malloc was 7–8 % of the hot path's CPU.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    token_broker::cli::run().await
}
