//! emend: serve a language model, edit the knowledge inside it, and measure what the edits cost.
//!
//! Layout follows `DESIGN.md`: everything that touches tensors lives under [`engine`].
pub mod engine;
pub mod setup;
