//! Reading dataset files in their public formats (JSON, JSON Lines, CSV, Python list literals),
//! their digests, and the `limit` / seeded-sample selection of documents.
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::error::{EvalError, Result};

pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// One JSON value per non-empty line.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = read_text(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| EvalError::data(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// The rows of a Parquet file as JSON objects (column name → value), as a JSON Lines export of
/// the same table would read.
pub fn read_parquet(path: &Path) -> Result<Vec<serde_json::Value>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |e: parquet::errors::ParquetError| EvalError::data(path, e.to_string());
    let file = std::fs::File::open(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    let rows = reader.get_row_iter(None).map_err(bad)?;
    rows.map(|r| {
        let row = r.map_err(bad)?;
        let obj: serde_json::Map<String, serde_json::Value> = row
            .get_column_iter()
            .map(|(name, field)| (name.clone(), field_json(field)))
            .collect();
        Ok(serde_json::Value::Object(obj))
    })
    .collect()
}

/// A Parquet cell as JSON: strings, numbers, booleans and nulls (the types the datasets use);
/// anything else as its display text.
fn field_json(f: &parquet::record::Field) -> serde_json::Value {
    use parquet::record::Field as F;
    use serde_json::Value as V;
    match f {
        F::Null => V::Null,
        F::Bool(b) => V::Bool(*b),
        F::Byte(x) => (*x).into(),
        F::Short(x) => (*x).into(),
        F::Int(x) => (*x).into(),
        F::Long(x) => (*x).into(),
        F::UByte(x) => (*x).into(),
        F::UShort(x) => (*x).into(),
        F::UInt(x) => (*x).into(),
        F::ULong(x) => (*x).into(),
        F::Float(x) => f64::from(*x).into(),
        F::Double(x) => (*x).into(),
        F::Str(s) => V::String(s.clone()),
        other => V::String(other.to_string()),
    }
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| EvalError::data(path, e.to_string()))
}

/// A data file as recorded with a result: its path relative to the data dir and its SHA-256.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileDigest {
    pub path: String,
    pub sha256: String,
}

pub fn digest(data_dir: &Path, rel: &str) -> Result<FileDigest> {
    let path = data_dir.join(rel);
    let bytes = std::fs::read(&path).map_err(|source| EvalError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(FileDigest {
        path: rel.to_string(),
        sha256: hex::encode(Sha256::digest(&bytes)),
    })
}

/// RFC 4180 CSV: fields separated by `,`, optionally quoted with `"` (inner quotes doubled,
/// newlines allowed inside quotes); CRLF or LF records.
pub fn parse_csv(text: &str, delimiter: char) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    field.push('"');
                    chars.next();
                } else {
                    quoted = false;
                }
            } else {
                field.push(c);
            }
        } else if c == '"' && field.is_empty() {
            quoted = true;
        } else if c == delimiter {
            row.push(std::mem::take(&mut field));
        } else if c == '\n' || c == '\r' {
            if c == '\r' && chars.peek() == Some(&'\n') {
                chars.next();
            }
            row.push(std::mem::take(&mut field));
            rows.push(std::mem::take(&mut row));
            any = false;
        } else {
            field.push(c);
        }
    }
    if any {
        row.push(field);
        rows.push(row);
    }
    rows
}

/// A CSV file with a header row, as maps from column name to value.
pub fn read_csv_records(path: &Path) -> Result<Vec<std::collections::HashMap<String, String>>> {
    let rows = parse_csv(&read_text(path)?, ',');
    let mut it = rows.into_iter();
    let header = it
        .next()
        .ok_or_else(|| EvalError::data(path, "empty CSV file"))?;
    it.enumerate()
        .map(|(i, r)| {
            if r.len() != header.len() {
                return Err(EvalError::data(
                    path,
                    format!(
                        "record {}: {} fields, header has {}",
                        i + 1,
                        r.len(),
                        header.len()
                    ),
                ));
            }
            Ok(header.iter().cloned().zip(r).collect())
        })
        .collect()
}

/// A Python list of string literals, e.g. `['a', "b's", 'c\'d']` (what `str(list)` writes).
pub fn parse_py_str_list(s: &str) -> Option<Vec<String>> {
    let s = s.trim();
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let Some(q) = chars.next() else { break };
        if q != '\'' && q != '"' {
            return None;
        }
        let mut lit = String::new();
        loop {
            let c = chars.next()?;
            if c == q {
                break;
            }
            if c != '\\' {
                lit.push(c);
                continue;
            }
            match chars.next()? {
                'n' => lit.push('\n'),
                't' => lit.push('\t'),
                'r' => lit.push('\r'),
                'x' => lit.push(hex_char(&mut chars, 2)?),
                'u' => lit.push(hex_char(&mut chars, 4)?),
                'U' => lit.push(hex_char(&mut chars, 8)?),
                other => lit.push(other),
            }
        }
        out.push(lit);
    }
    Some(out)
}

fn hex_char(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, n: usize) -> Option<char> {
    let digits: String = (0..n).filter_map(|_| chars.next()).collect();
    char::from_u32(u32::from_str_radix(&digits, 16).ok()?)
}

/// Which documents to evaluate: all, the first `limit`, or with a seed a uniform sample of
/// `limit` documents (kept in dataset order so few-shot sampling stays reproducible).
pub fn select(n: usize, limit: Option<usize>, seed: Option<u64>) -> Vec<usize> {
    match (limit, seed) {
        (Some(l), Some(s)) if l < n => {
            let mut rng = StdRng::seed_from_u64(s);
            let mut idx = sample(&mut rng, n, l).into_vec();
            idx.sort_unstable();
            idx
        }
        (Some(l), _) => (0..l.min(n)).collect(),
        (None, _) => (0..n).collect(),
    }
}

/// The first of `candidates` (relative to `data_dir`) that exists, for datasets published under
/// several file names.
pub fn first_existing(data_dir: &Path, candidates: &[&'static str]) -> Result<&'static str> {
    candidates
        .iter()
        .copied()
        .find(|c| data_dir.join(c).is_file())
        .ok_or_else(|| {
            EvalError::data(
                data_dir.join(candidates[0]),
                format!(
                    "not found (looked for {})",
                    candidates
                        .iter()
                        .map(|c| PathBuf::from(c).display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_newlines() {
        let rows = parse_csv("a,b\r\n\"x, \"\"y\"\"\",\"l1\nl2\"\n1,\n", ',');
        assert_eq!(
            rows,
            vec![
                vec!["a".to_string(), "b".into()],
                vec!["x, \"y\"".into(), "l1\nl2".into()],
                vec!["1".into(), "".into()],
            ]
        );
    }

    #[test]
    fn python_list_literals() {
        assert_eq!(
            parse_py_str_list(r#"['David Seville', "O'Neil", 'it\'s', 'caf\xe9']"#).unwrap(),
            vec!["David Seville", "O'Neil", "it's", "café"]
        );
        assert_eq!(parse_py_str_list("[]").unwrap(), Vec::<String>::new());
        assert!(parse_py_str_list("nope").is_none());
    }

    #[test]
    fn selection() {
        assert_eq!(select(5, None, None), vec![0, 1, 2, 3, 4]);
        assert_eq!(select(5, Some(2), None), vec![0, 1]);
        assert_eq!(select(3, Some(9), Some(1)), vec![0, 1, 2]);
        let a = select(100, Some(10), Some(7));
        assert_eq!(a, select(100, Some(10), Some(7)));
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_ne!(a, select(100, Some(10), Some(8)));
    }
}
