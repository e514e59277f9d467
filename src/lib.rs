//! emend: serve a language model, edit the knowledge inside it, and measure what the edits cost.
//!
//! Layout follows `DESIGN.md`: `api` → `sessions`, `jobs`, `store` → `engine`. Everything that touches
//! tensors lives under [`engine`]; nothing under it knows about HTTP.
pub mod api;
pub mod canary;
pub mod config;
pub mod engine;
pub mod jobs;
pub mod metrics;
pub mod server;
pub mod sessions;
pub mod setup;
pub mod store;
