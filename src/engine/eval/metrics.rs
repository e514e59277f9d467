//! Per-document metric values and their aggregation, as lm-evaluation-harness computes them:
//! `acc`/`acc_norm` for multiple choice, perplexities, exact match after regex extraction.
use std::collections::BTreeMap;

use regex::Regex;

/// One document's contribution to a metric; the variant says how documents aggregate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sample {
    /// Averaged (accuracy, exact match); reported with its standard error.
    Mean(f64),
    /// A log-likelihood; aggregates to `exp(-mean)` (lm-eval's `perplexity`).
    Perplexity(f64),
    /// `(log-likelihood, weight)`; aggregates to `exp(-Σll / Σweight)`.
    WeightedPerplexity(f64, f64),
    /// `(log-likelihood, bytes)`; aggregates to `-Σll / Σbytes / ln 2`.
    BitsPerByte(f64, f64),
}

/// Aggregates each metric's samples. Mean metrics also get `<name>_stderr` (sample standard
/// deviation over √n, as lm-eval's `mean_stderr`).
pub fn aggregate(samples: &[(String, Sample)]) -> BTreeMap<String, f64> {
    let mut by_name: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    for (name, s) in samples {
        by_name.entry(name.as_str()).or_default().push(*s);
    }
    let mut out = BTreeMap::new();
    for (name, v) in by_name {
        match v[0] {
            Sample::Mean(_) => {
                let xs: Vec<f64> = v.iter().map(value).collect();
                out.insert(name.to_string(), mean(&xs));
                if xs.len() > 1 {
                    out.insert(format!("{name}_stderr"), mean_stderr(&xs));
                }
            }
            Sample::Perplexity(_) => {
                let xs: Vec<f64> = v.iter().map(value).collect();
                out.insert(name.to_string(), (-mean(&xs)).exp());
            }
            Sample::WeightedPerplexity(..) => {
                let (ll, w) = sums(&v);
                out.insert(name.to_string(), (-ll / w).exp());
            }
            Sample::BitsPerByte(..) => {
                let (ll, w) = sums(&v);
                out.insert(name.to_string(), -ll / w / std::f64::consts::LN_2);
            }
        }
    }
    out
}

fn value(s: &Sample) -> f64 {
    match *s {
        Sample::Mean(x) | Sample::Perplexity(x) => x,
        Sample::WeightedPerplexity(x, _) | Sample::BitsPerByte(x, _) => x,
    }
}

fn sums(v: &[Sample]) -> (f64, f64) {
    v.iter().fold((0.0, 0.0), |(a, b), s| match *s {
        Sample::WeightedPerplexity(ll, w) | Sample::BitsPerByte(ll, w) => (a + ll, b + w),
        Sample::Mean(x) | Sample::Perplexity(x) => (a + x, b + 1.0),
    })
}

pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

pub fn mean_stderr(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let m = mean(xs);
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    (var / n).sqrt()
}

/// Index of the first maximum (numpy's `argmax`).
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// lm-eval's multiple-choice scoring: `acc` takes the most likely choice, `acc_norm` divides
/// each log-likelihood by the choice's length in characters (Python `len` of the choice string,
/// without the target delimiter).
pub fn multiple_choice(lls: &[f64], choices: &[String], gold: usize) -> (f64, f64) {
    let norm: Vec<f64> = lls
        .iter()
        .zip(choices)
        .map(|(ll, c)| ll / c.chars().count() as f64)
        .collect();
    let acc = (argmax(lls) == gold) as u8 as f64;
    let acc_norm = (argmax(&norm) == gold) as u8 as f64;
    (acc, acc_norm)
}

/// TruthfulQA MC2: the normalised probability mass of the answers labelled true.
pub fn mc2(lls: &[f64], labels: &[bool]) -> f64 {
    let p: Vec<f64> = lls.iter().map(|l| l.exp()).collect();
    let total: f64 = p.iter().sum();
    p.iter()
        .zip(labels)
        .filter(|(_, &t)| t)
        .map(|(p, _)| p)
        .sum::<f64>()
        / total
}

/// lm-eval's `regex` filter: the `group_select`-th match (negative counts from the end); with
/// capture groups, the first non-empty group; trimmed; `[invalid]` when nothing matches.
pub fn regex_extract(re: &Regex, text: &str, group_select: isize) -> String {
    const FALLBACK: &str = "[invalid]";
    let matches: Vec<regex::Captures<'_>> = re.captures_iter(text).collect();
    if matches.is_empty() {
        return FALLBACK.to_string();
    }
    let i = if group_select < 0 {
        matches.len() as isize + group_select
    } else {
        group_select
    };
    let Some(caps) = usize::try_from(i).ok().and_then(|i| matches.get(i)) else {
        return FALLBACK.to_string();
    };
    let m = if caps.len() == 1 {
        caps.get(0).map(|m| m.as_str())
    } else if caps.len() == 2 {
        Some(caps.get(1).map_or("", |m| m.as_str()))
    } else {
        (1..caps.len())
            .filter_map(|g| caps.get(g).map(|m| m.as_str()))
            .find(|s| !s.is_empty())
    };
    match m {
        Some(s) => s.trim().to_string(),
        None => FALLBACK.to_string(),
    }
}

/// Options of lm-eval's `exact_match` (HF evaluate's semantics).
#[derive(Debug, Clone, Default)]
pub struct ExactMatch {
    pub regexes_to_ignore: Vec<Regex>,
    pub ignore_case: bool,
    pub ignore_punctuation: bool,
}

impl ExactMatch {
    fn normalise(&self, s: &str) -> String {
        let mut s = s.to_string();
        for re in &self.regexes_to_ignore {
            s = re.replace_all(&s, "").into_owned();
        }
        if self.ignore_case {
            s = s.to_lowercase();
        }
        if self.ignore_punctuation {
            // Python's string.punctuation: ASCII punctuation only.
            s.retain(|c| !c.is_ascii_punctuation());
        }
        s
    }

    /// 1 when the prediction equals any of the references after normalisation.
    pub fn score(&self, prediction: &str, references: &[String]) -> f64 {
        let p = self.normalise(prediction);
        references.iter().any(|r| self.normalise(r) == p) as u8 as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn acc_and_acc_norm() {
        // Choice 1 is most likely in total; per character, the long choice 2 wins.
        let lls = [-3.0, -2.0, -4.0];
        let ch = s(&["ab", "a", "abcdefgh"]);
        assert_eq!(multiple_choice(&lls, &ch, 1), (1.0, 0.0));
        assert_eq!(multiple_choice(&lls, &ch, 2), (0.0, 1.0));
        // ties go to the first
        assert_eq!(argmax(&[1.0, 1.0]), 0);
        // characters, not bytes
        let (_, n) = multiple_choice(&[-2.0, -2.1], &s(&["éé", "ab"]), 1);
        assert_eq!(n, 0.0);
    }

    #[test]
    fn aggregation() {
        let m = aggregate(&[
            ("acc".into(), Sample::Mean(1.0)),
            ("acc".into(), Sample::Mean(0.0)),
            ("ppl".into(), Sample::Perplexity(-1.0)),
            ("ppl".into(), Sample::Perplexity(-3.0)),
            ("wp".into(), Sample::WeightedPerplexity(-6.0, 2.0)),
            ("wp".into(), Sample::WeightedPerplexity(-2.0, 2.0)),
            (
                "bpb".into(),
                Sample::BitsPerByte(-std::f64::consts::LN_2 * 8.0, 4.0),
            ),
        ]);
        assert_eq!(m["acc"], 0.5);
        assert!((m["acc_stderr"] - 0.5).abs() < 1e-12);
        assert!((m["ppl"] - 2f64.exp()).abs() < 1e-12);
        assert!((m["wp"] - 2f64.exp()).abs() < 1e-12);
        assert!((m["bpb"] - 2.0).abs() < 1e-12);
    }

    #[test]
    fn mc2_mass() {
        let lls = [0.5f64.ln(), 0.25f64.ln(), 0.25f64.ln()];
        assert!((mc2(&lls, &[true, false, false]) - 0.5).abs() < 1e-12);
        assert!((mc2(&lls, &[false, true, true]) - 0.5).abs() < 1e-12);
        assert!((mc2(&lls, &[true, true, false]) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn gsm8k_extraction() {
        let strict = Regex::new(r"#### (\-?[0-9\.\,]+)").unwrap();
        let flex = Regex::new(r"(-?[$0-9.,]{2,})|(-?[0-9]+)").unwrap();
        let out = "She has 3 + 4 = 7 apples.\n#### 1,200.\nQuestion";
        assert_eq!(regex_extract(&strict, out, 0), "1,200.");
        assert_eq!(regex_extract(&flex, out, -1), "1,200.");
        assert_eq!(regex_extract(&strict, "no answer 5", 0), "[invalid]");
        assert_eq!(regex_extract(&flex, "so 5 and then 7", -1), "7");
        let em = ExactMatch {
            regexes_to_ignore: [",", r"\$", r"(?s).*#### ", r"\.$"]
                .iter()
                .map(|r| Regex::new(r).unwrap())
                .collect(),
            ignore_case: true,
            ignore_punctuation: false,
        };
        let gold = s(&["Some reasoning.\n#### 1200"]);
        assert_eq!(em.score("1,200.", &gold), 1.0);
        assert_eq!(em.score("$1200", &gold), 1.0);
        assert_eq!(em.score("120", &gold), 0.0);
    }

    #[test]
    fn bbh_and_triviaqa_matching() {
        let re = Regex::new(r"the answer is (.*).").unwrap();
        assert_eq!(
            regex_extract(&re, "... So the answer is (B).\nmore", 0),
            "(B)"
        );
        assert_eq!(regex_extract(&re, "So the answer is False.", 0), "False");
        let em = ExactMatch {
            ignore_case: true,
            ignore_punctuation: true,
            ..Default::default()
        };
        assert_eq!(em.score("the beatles", &s(&["The Beatles!", "x"])), 1.0);
        assert_eq!(em.score("beatles", &s(&["The Beatles"])), 0.0);
    }
}
