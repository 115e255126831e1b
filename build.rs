//! Rebuilds when a migration is added or changed: `sqlx::migrate!` embeds
//! the migrations at compile time, and stable Rust cannot tell Cargo which
//! directory a macro read (sqlx's documented build script).

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
