//! Rebuilds when a migration is added: `sqlx::migrate!` embeds `migrations/` at compile time, and
//! cargo does not know the macro reads that directory (the build script sqlx's documentation gives).

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
