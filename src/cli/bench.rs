//! `emend bench`: load time, prefill and decode throughput, peak RSS (stub replaced below).
use anyhow::Result;
use clap::Args;

use super::Global;

#[derive(Args)]
pub struct BenchArgs {}

pub fn run(_g: &Global, _a: BenchArgs) -> Result<()> {
    anyhow::bail!("bench is not built yet")
}
