//! A sweep's curve: one row per method and checkpoint, as CSV and JSON tables, and the means
//! that fill its `edit.*` and `edit_at_apply.*` columns.
use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::sweep::CurveRow;

/// Numeric metrics of a task result, standard errors left out.
pub fn headline_metrics(v: &Value) -> BTreeMap<String, f64> {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| !k.ends_with("_stderr"))
                .filter_map(|(k, x)| x.as_f64().map(|f| (k.clone(), f)))
                .collect()
        })
        .unwrap_or_default()
}

/// Means of the numeric `post` metrics of edit reports (as JSON), each over the reports that
/// have it.
pub fn mean_post_metrics(reports: &[Value]) -> BTreeMap<String, f64> {
    let posts: Vec<Value> = reports.iter().map(|r| r["post"].clone()).collect();
    mean_metrics(&posts)
}

/// Means of the numeric fields of metric objects (as JSON), each over the objects that have it.
pub fn mean_metrics(metrics: &[Value]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for m in metrics {
        for (k, x) in m.as_object().into_iter().flatten() {
            if let Some(f) = x.as_f64() {
                let e = sums.entry(k.clone()).or_default();
                e.0 += f;
                e.1 += 1;
            }
        }
    }
    sums.into_iter()
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect()
}

/// Column names of a curve: `method`, `n_edits`, `version`, `edit.<metric>`,
/// `edit_at_apply.<metric>`, `<task>.<metric>`.
pub fn curve_columns(rows: &[CurveRow]) -> Vec<String> {
    let mut edit = BTreeSet::new();
    let mut at_apply = BTreeSet::new();
    let mut tasks = BTreeSet::new();
    for r in rows {
        edit.extend(r.edit.keys().map(|k| format!("edit.{k}")));
        at_apply.extend(r.edit_at_apply.keys().map(|k| format!("edit_at_apply.{k}")));
        for (t, m) in &r.tasks {
            tasks.extend(m.keys().map(|k| format!("{t}.{k}")));
        }
    }
    let mut cols: Vec<String> = ["method", "n_edits", "version"].map(String::from).into();
    cols.extend(edit);
    cols.extend(at_apply);
    cols.extend(tasks);
    cols
}

/// A numeric cell (every column but `method`).
fn cell(r: &CurveRow, col: &str) -> Option<f64> {
    match col {
        "n_edits" => Some(r.n_edits as f64),
        "version" => Some(r.version as f64),
        _ => match col.strip_prefix("edit.") {
            Some(k) => r.edit.get(k).copied(),
            None if col.starts_with("edit_at_apply.") => {
                r.edit_at_apply.get(&col["edit_at_apply.".len()..]).copied()
            }
            None => {
                let (t, m) = col.split_once('.')?;
                r.tasks.get(t)?.get(m).copied()
            }
        },
    }
}

/// The curve as CSV, one row per method and checkpoint (empty cells for missing values).
pub fn curve_csv(rows: &[CurveRow]) -> String {
    let cols = curve_columns(rows);
    let mut out = cols.join(",");
    out.push('\n');
    for r in rows {
        // Method names are plain identifiers (`rome`, `ft-m`): nothing to quote.
        let mut line = vec![r.method.clone()];
        line.extend(
            cols[1..]
                .iter()
                .map(|c| cell(r, c).map(|v| v.to_string()).unwrap_or_default()),
        );
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// The curve as JSON: the columns and one array of values (or null) per method and checkpoint.
pub fn curve_json(rows: &[CurveRow]) -> Value {
    let cols = curve_columns(rows);
    let data: Vec<Vec<Value>> = rows
        .iter()
        .map(|r| {
            std::iter::once(Value::from(r.method.clone()))
                .chain(cols[1..].iter().map(|c| cell(r, c).into()))
                .collect()
        })
        .collect();
    serde_json::json!({"columns": cols, "rows": data})
}

/// A curve table that [`curve_rows`] cannot read.
#[derive(Debug, thiserror::Error)]
#[error("not a curve table ({0}): expected {{\"columns\": [\"method\", \"n_edits\", \"version\", ...], \"rows\": [[...], ...]}} as curve.json holds")]
pub struct CurveShapeError(String);

/// The rows of a curve table written by [`curve_json`] (its inverse; `finished_at` is not in
/// the table and comes back empty).
pub fn curve_rows(table: &Value) -> Result<Vec<CurveRow>, CurveShapeError> {
    let bad = |why: &str| CurveShapeError(why.to_string());
    let cols: Vec<&str> = table["columns"]
        .as_array()
        .ok_or_else(|| bad("no columns"))?
        .iter()
        .map(|c| {
            c.as_str()
                .ok_or_else(|| bad("a column name is not a string"))
        })
        .collect::<Result<_, _>>()?;
    if cols.get(..3) != Some(&["method", "n_edits", "version"][..]) {
        return Err(bad("the first columns are not method, n_edits, version"));
    }
    let lines = table["rows"].as_array().ok_or_else(|| bad("no rows"))?;
    lines
        .iter()
        .map(|line| {
            let cells = line.as_array().filter(|c| c.len() == cols.len());
            let cells = cells.ok_or_else(|| bad("a row's length differs from the columns'"))?;
            // Every cell but the method is written as a float.
            let count = |i: usize| {
                cells[i]
                    .as_f64()
                    .filter(|x| *x >= 0.0 && x.fract() == 0.0)
                    .map(|x| x as u64)
                    .ok_or_else(|| bad("n_edits and version must be whole numbers"))
            };
            let mut row = CurveRow {
                method: cells[0]
                    .as_str()
                    .ok_or_else(|| bad("a method is not a string"))?
                    .into(),
                n_edits: count(1)? as usize,
                version: count(2)?,
                edit: BTreeMap::new(),
                edit_at_apply: BTreeMap::new(),
                tasks: BTreeMap::new(),
                finished_at: String::new(),
            };
            for (col, x) in cols.iter().zip(cells).skip(3) {
                let Some(x) = x.as_f64() else { continue };
                if let Some(k) = col.strip_prefix("edit_at_apply.") {
                    row.edit_at_apply.insert(k.into(), x);
                } else if let Some(k) = col.strip_prefix("edit.") {
                    row.edit.insert(k.into(), x);
                } else {
                    let (t, m) = col
                        .split_once('.')
                        .ok_or_else(|| bad("a column without a dot"))?;
                    row.tasks.entry(t.into()).or_default().insert(m.into(), x);
                }
            }
            Ok(row)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, n: usize, rel: f64, acc: f64, ppl: f64) -> CurveRow {
        CurveRow {
            method: method.into(),
            n_edits: n,
            version: n as u64,
            edit: if n == 0 {
                BTreeMap::new()
            } else {
                [("reliability".to_string(), rel)].into()
            },
            edit_at_apply: BTreeMap::new(),
            tasks: [(
                "arc_easy".to_string(),
                [("acc".to_string(), acc), ("perplexity".to_string(), ppl)].into(),
            )]
            .into(),
            finished_at: "t".into(),
        }
    }

    #[test]
    fn curves_render_as_csv_and_json() {
        let rows = [
            row("rome", 0, 0.0, 0.5, 30.0),
            row("rome", 2, 0.75, 0.25, 31.5),
            row("ft-m", 2, 1.0, 0.5, 30.5),
        ];
        assert_eq!(
            curve_csv(&rows),
            "method,n_edits,version,edit.reliability,arc_easy.acc,arc_easy.perplexity\n\
             rome,0,0,,0.5,30\nrome,2,2,0.75,0.25,31.5\nft-m,2,2,1,0.5,30.5\n"
        );
        let j = curve_json(&rows);
        assert_eq!(j["columns"][0], "method");
        assert_eq!(j["rows"][2][0], "ft-m");
        assert_eq!(j["rows"][0][3], Value::Null);
        assert_eq!(j["rows"][1][4], 0.25);
        let back = curve_rows(&j).unwrap();
        assert_eq!(curve_csv(&back), curve_csv(&rows));
        assert_eq!(back[1].edit["reliability"], 0.75);
        assert_eq!(back[2].tasks["arc_easy"]["perplexity"], 30.5);
    }

    #[test]
    fn a_table_of_another_shape_is_refused() {
        for bad in [
            serde_json::json!([]),
            serde_json::json!({"columns": ["n_edits"], "rows": []}),
            serde_json::json!({"columns": ["method", "n_edits", "version"], "rows": [["rome", 1]]}),
            serde_json::json!({"columns": ["method", "n_edits", "version"], "rows": [["rome", 1.5, 1]]}),
        ] {
            assert!(curve_rows(&bad).is_err(), "{bad}");
        }
    }
}
