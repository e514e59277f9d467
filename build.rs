fn main() {
    // The `openblas` feature calls cblas_sgemm from the system OpenBLAS (libopenblas-dev).
    if std::env::var_os("CARGO_FEATURE_OPENBLAS").is_some() {
        println!("cargo:rustc-link-lib=openblas");
    }
}
