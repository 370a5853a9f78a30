//! `sqlx::migrate!` embeds the migrations at compile time, and a new or changed migration file
//! is not a change cargo sees on its own: without this, a build could ship the old schema
//! history (sqlx's documented remedy, `sqlx migrate build-script`).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
