//! The one integration-test binary: every extra file in `tests/` would be another link step on a
//! 2-core machine. Each module covers one area; `helpers` starts the real broker against real
//! PostgreSQL and Redis and the Rust test IdP.

mod helpers;

mod backchannel_logout;
mod callback_attacks;
mod database_connections;
mod database_poolers;
mod database_stalls;
mod deploy_files;
mod faults;
mod forward_auth;
mod gateways;
mod id_token_attacks;
mod idp_failures;
mod input_attacks;
mod login_flow;
mod metrics;
mod migrations_and_cli;
mod openapi;
mod operations;
mod origin_and_cors;
mod redis_cluster;
mod redis_connections;
mod relay;
mod replicas;
mod secrets_in_logs;
mod shutdown;
mod storage_and_fixation;
