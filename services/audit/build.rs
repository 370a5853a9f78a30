//! `sqlx::migrate!` embeds the migrations at compile time, and a new or changed migration file
//! is not a change cargo sees on its own: without this, a build could ship the old schema
//! history (sqlx's documented remedy, `sqlx migrate build-script`). hiway-ingress, which
//! embeds them too, uses this same script; the path is relative to each crate's directory.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
