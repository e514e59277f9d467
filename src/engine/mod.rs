//! The one owner of the device and the model: architectures, loaders, tokenizer, inference.
pub mod model;
