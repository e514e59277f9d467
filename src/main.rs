use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    pin_blas_kernels();
    let args = cli::Cli::parse();
    cli::init_tracing(&args.global);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// OpenBLAS picks its kernels from CPUID when it loads. Debian's 0.3.21 does not know recent
/// Xeons (Sapphire Rapids here) and falls back to its SSE3 "Prescott" kernels, about 3× slower
/// on prefill than its AVX-512 ones (BENCHMARKS.md). The choice is read from
/// `OPENBLAS_CORETYPE` before `main`, so when it is unset the binary sets it from the CPU's
/// features and re-executes itself once (the variable being set is the guard).
fn pin_blas_kernels() {
    #[cfg(all(feature = "openblas", target_arch = "x86_64", unix))]
    {
        use std::os::unix::process::CommandExt;
        if std::env::var_os("OPENBLAS_CORETYPE").is_some() {
            return;
        }
        let core = if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
        {
            "SKYLAKEX"
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            "HASWELL"
        } else {
            return;
        };
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        // `exec` only returns on failure; then run on with the kernels OpenBLAS chose.
        let _ = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("OPENBLAS_CORETYPE", core)
            .exec();
    }
}
