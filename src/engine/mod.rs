//! The one owner of the device and the model: architectures, loaders, tokenizer, inference, and
//! the worker thread that serialises access to them.
pub mod editing;
pub mod eval;
pub mod model;
pub mod overlay;
pub mod training;
pub mod worker;
