//! `wikitext`: perplexity of WikiText-2 (raw) test documents via rolling log-likelihood.
//! Documents are split as `EleutherAI/wikitext_document_level` does (a new page at every
//! top-level ` = Title = ` heading) and detokenized as lm-eval's `wikitext_detokenizer`; word
//! and byte counts come from the original page.
use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;

use super::{zero_shot_only, Instance, Prepared, Scorer, Task, TaskOptions};
use crate::engine::eval::data::{digest, read_text, select};
use crate::engine::eval::error::Result;
use crate::engine::eval::request::Request;

pub const FILE: &str = "wikitext2/wiki.test.raw";

pub struct Wikitext;

/// Splits raw WikiText into pages: a line that, with sub-heading markers collapsed, reads
/// `= Title =` starts a page; a page keeps its heading and the lines up to the next one.
pub fn split_documents(raw: &str) -> Vec<String> {
    let mut pages = Vec::new();
    let mut lines: Vec<&str> = Vec::new();
    for line in raw.split('\n') {
        let r = line.replace("= = =", "===").replace("= =", "==");
        let r = r.trim();
        if r.starts_with("= ") && r.ends_with(" =") {
            let page = lines.join("\n");
            if !page.trim().is_empty() {
                pages.push(page);
            }
            lines.clear();
        }
        lines.push(line);
    }
    let page = lines.join("\n");
    if !page.trim().is_empty() {
        pages.push(page);
    }
    pages
}

macro_rules! re {
    ($name:ident, $pat:expr) => {
        static $name: LazyLock<Regex> = LazyLock::new(|| Regex::new($pat).expect("valid regex"));
    };
}
re!(SLASH_QUOTE, r"/' [0-9]/");
re!(PARENS, r"\(\s*([^\)]*?)\s*\)");
re!(BRACKETS, r"\[\s*([^\]]*?)\s*\]");
re!(BRACES, r"\{\s*([^}]*?)\s*\}");
re!(DQUOTES, r#""\s*([^"]*?)\s*""#);
re!(SQUOTES, r"'\s*([^']*?)\s*'");
re!(WHITESPACE, r"\s+");

/// lm-eval's `wikitext_detokenizer`, step by step in its order.
pub fn detokenize(page: &str) -> String {
    let mut s = page.replace("s '", "s'");
    // lm-eval's pattern and replacement are both literal text here (a quirk kept as is).
    s = SLASH_QUOTE.replace_all(&s, "/'[0-9]/").into_owned();
    for (a, b) in [
        (" @-@ ", "-"),
        (" @,@ ", ","),
        (" @.@ ", "."),
        (" : ", ": "),
        (" ; ", "; "),
        (" . ", ". "),
        (" ! ", "! "),
        (" ? ", "? "),
        (" , ", ", "),
    ] {
        s = s.replace(a, b);
    }
    s = PARENS.replace_all(&s, "(${1})").into_owned();
    s = BRACKETS.replace_all(&s, "[${1}]").into_owned();
    s = BRACES.replace_all(&s, "{${1}}").into_owned();
    s = DQUOTES.replace_all(&s, "\"${1}\"").into_owned();
    s = SQUOTES.replace_all(&s, "'${1}'").into_owned();
    for (a, b) in [
        ("= = = =", "===="),
        ("= = =", "==="),
        ("= =", "=="),
        (" \u{b0} ", "\u{b0}"),
        (" \n", "\n"),
        ("\n ", "\n"),
        (" N ", " 1 "),
        (" 's", "'s"),
    ] {
        s = s.replace(a, b);
    }
    s
}

/// `len(re.split(r"\s+", page))`: whitespace runs + 1 (empty ends count, as in Python).
pub fn count_words(page: &str) -> usize {
    WHITESPACE.find_iter(page).count() + 1
}

impl Task for Wikitext {
    fn name(&self) -> &'static str {
        "wikitext"
    }
    fn version(&self) -> &'static str {
        "2.0"
    }
    fn default_num_fewshot(&self) -> usize {
        0
    }
    fn prepare(&self, data_dir: &Path, opts: &TaskOptions) -> Result<Prepared> {
        let num_fewshot = zero_shot_only(self.name(), opts)?;
        let pages = split_documents(&read_text(&data_dir.join(FILE))?);
        let instances = select(pages.len(), opts.limit, opts.seed)
            .into_iter()
            .map(|i| {
                let page = &pages[i];
                Instance {
                    doc_id: i,
                    subtask: None,
                    requests: vec![Request::LoglikelihoodRolling {
                        text: detokenize(page),
                    }],
                    scorer: Scorer::Rolling {
                        words: count_words(page),
                        bytes: page.len(),
                    },
                }
            })
            .collect();
        Ok(Prepared {
            instances,
            num_fewshot,
            data_files: vec![digest(data_dir, FILE)?],
            categories: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_split_at_top_level_headings() {
        let raw = " \n = A = \n \n x \n = = Sub = = \n y \n = B = \n z \n";
        let p = split_documents(raw);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0], " = A = \n \n x \n = = Sub = = \n y ");
        assert_eq!(p[1], " = B = \n z \n");
    }

    #[test]
    fn detokenizer() {
        assert_eq!(
            detokenize(" = = Career = = \n In 1 @,@ 000 the ( big ) dog 's \" bone \" . \n"),
            " == Career ==\nIn 1,000 the (big) dog's \"bone\".\n"
        );
        assert_eq!(count_words(" a b \n"), 4);
    }
}
