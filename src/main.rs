//! The `token-broker` binary: everything lives in the library, except the choice of allocator.

/// jemalloc rather than glibc's malloc: the hot paths allocate a few dozen small objects per
/// request, and jemalloc's per-thread caches serve them with less work (+5 % req/s on a cached
/// `/session` and `/auth`); and it hands memory back that a load spike used (its dirty pages decay
/// within seconds), where glibc's heap kept a 1,000-connection run's peak resident. README,
/// "Choices", has the measurements and why not mimalloc.
#[cfg(all(not(target_env = "msvc"), not(fuzzing)))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    token_broker::cli::run().await
}
