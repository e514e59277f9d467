//! Key statistics `C = E[k kᵀ]`: the uncentred second moment of the keys entering a layer's
//! down projection, over plain text, computed on the base model. Cached in memory and on disk
//! (safetensors with the provenance in its metadata), keyed by model sha256, layer, sample
//! count and a hash of the corpus, so restarts and other replicas reuse them.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::stats_pass::StatsPass;
use super::EditError;
use crate::engine::model::generate::{generate, GenParams};
use crate::engine::model::sampling::Sampling;
use crate::engine::model::{CausalLm, Tok};

/// Tokens per corpus sequence.
pub const SEQ_TOKENS: usize = 128;

/// Where a statistic came from, stored with it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Provenance {
    pub model_sha256: String,
    pub layer: usize,
    /// Sequences asked for and sequences used (the corpus may hold fewer).
    pub samples: usize,
    pub sequences: usize,
    pub tokens: usize,
    /// `wikitext/AA` file names, or `generated` when no corpus was found.
    pub corpus: String,
    pub corpus_sha256: String,
    pub seconds: f64,
}

/// One layer's statistics, with the inverse computed on first use.
pub struct LayerStats {
    /// `(ff, ff)` row-major, f64.
    pub mom2: Vec<f64>,
    pub dim: usize,
    pub provenance: Provenance,
    inverse: Mutex<Option<Arc<Vec<f64>>>>,
}

impl LayerStats {
    pub(crate) fn new(mom2: Vec<f64>, dim: usize, provenance: Provenance) -> Self {
        Self {
            mom2,
            dim,
            provenance,
            inverse: Mutex::new(None),
        }
    }

    /// `C⁻¹` (row-major, f64), from a Cholesky factorisation with a tiny ridge for safety.
    pub fn inverse(&self) -> Result<Arc<Vec<f64>>, EditError> {
        let mut slot = self.inverse.lock().expect("stats lock");
        if let Some(inv) = slot.as_ref() {
            return Ok(inv.clone());
        }
        let n = self.dim;
        let mut m = nalgebra::DMatrix::<f64>::from_row_slice(n, n, &self.mom2);
        let ridge = 1e-6 * (0..n).map(|i| m[(i, i)]).sum::<f64>() / n as f64;
        for i in 0..n {
            m[(i, i)] += ridge.max(1e-12);
        }
        let chol = nalgebra::Cholesky::new(m).ok_or_else(|| {
            EditError::Stats(format!(
                "the key covariance of layer {} is not positive definite",
                self.provenance.layer
            ))
        })?;
        let inv = chol.inverse();
        // nalgebra is column-major; the matrix is symmetric, so either order reads the same.
        let inv = Arc::new(inv.as_slice().to_vec());
        *slot = Some(inv.clone());
        Ok(inv)
    }

    /// `C` as an f32 tensor on `device`.
    pub fn mom2_tensor(&self, device: &Device) -> Result<Tensor, EditError> {
        let v: Vec<f32> = self.mom2.iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_vec(v, (self.dim, self.dim), device)?)
    }

    pub fn inverse_tensor(&self, device: &Device) -> Result<Tensor, EditError> {
        let inv = self.inverse()?;
        let v: Vec<f32> = inv.iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_vec(v, (self.dim, self.dim), device)?)
    }
}

type Key = (String, usize, usize, String);

/// Statistics in memory and under `dir` on disk.
pub struct StatsCache {
    dir: PathBuf,
    data_dir: Option<PathBuf>,
    memory: Mutex<HashMap<Key, Arc<LayerStats>>>,
    /// The corpus, read and hashed once (every edit asks for its hash).
    corpus: std::sync::OnceLock<Option<Arc<Corpus>>>,
}

/// The text the statistics are computed over.
pub(crate) struct Corpus {
    pub(crate) name: String,
    pub(crate) sha256: String,
    pub(crate) texts: Vec<String>,
}

impl StatsCache {
    /// The dataset directory, if the server has one.
    pub fn data_dir(&self) -> Option<PathBuf> {
        self.data_dir.clone()
    }

    pub fn new(dir: PathBuf, data_dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            data_dir,
            memory: Mutex::new(HashMap::new()),
            corpus: std::sync::OnceLock::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn corpus(&self) -> Option<Arc<Corpus>> {
        self.corpus
            .get_or_init(|| self.read_corpus().map(Arc::new))
            .clone()
    }

    /// `wikitext/AA/wiki_*` under the data dir, articles without their `<doc>` lines.
    fn read_corpus(&self) -> Option<Corpus> {
        let dir = self.data_dir.as_ref()?.join("wikitext").join("AA");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("wiki_"))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return None;
        }
        let mut hasher = Sha256::new();
        let mut texts = Vec::new();
        for f in &files {
            let raw = std::fs::read(f).ok()?;
            hasher.update(&raw);
            let raw = String::from_utf8_lossy(&raw);
            let mut article = String::new();
            for line in raw.lines() {
                if line.starts_with("<doc ") {
                    article.clear();
                } else if line.starts_with("</doc>") {
                    if article.trim().len() > 200 {
                        texts.push(std::mem::take(&mut article));
                    }
                    article.clear();
                } else if !line.trim().is_empty() {
                    if !article.is_empty() {
                        article.push('\n');
                    }
                    article.push_str(line);
                }
            }
        }
        let names: Vec<String> = files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        Some(Corpus {
            name: format!("wikitext/AA/{{{}}}", names.join(",")),
            sha256: hex::encode(hasher.finalize()),
            texts,
        })
    }

    /// Text generated by the model from short seeds: the documented stand-in when the data dir
    /// has no corpus (deterministic: fixed seeds).
    fn generated(model: &dyn CausalLm, tok: &Tok, samples: usize) -> Result<Corpus, EditError> {
        const SEEDS: [&str; 8] = [
            "The", "In", "A", "It", "This", "History", "Science", "People",
        ];
        let n = samples.clamp(1, 64);
        let prompts: Vec<Vec<u32>> = (0..n)
            .map(|i| tok.encode(SEEDS[i % SEEDS.len()]))
            .collect::<Result<_, _>>()?;
        let mut texts = Vec::with_capacity(n);
        for (i, p) in prompts.iter().enumerate() {
            let g = generate(
                model,
                tok,
                std::slice::from_ref(p),
                &GenParams {
                    max_tokens: SEQ_TOKENS,
                    sampling: Sampling {
                        temperature: 1.0,
                        top_k: Some(40),
                        top_p: None,
                        seed: i as u64,
                    },
                    stop: Vec::new(),
                    stop_at_eos: false,
                },
                &mut |_, _| {},
            )?;
            texts.push(format!("{}{}", SEEDS[i % SEEDS.len()], g[0].text));
        }
        let mut h = Sha256::new();
        for t in &texts {
            h.update(t.as_bytes());
        }
        Ok(Corpus {
            name: "generated".into(),
            sha256: hex::encode(h.finalize()),
            texts,
        })
    }

    /// The cache file of one layer's statistic (whether or not it exists yet).
    pub fn file(&self, model_sha256: &str, layer: usize, samples: usize) -> PathBuf {
        let corpus_sha = match self.corpus() {
            Some(c) => c.sha256.clone(),
            None => "generated".into(),
        };
        self.path(&(model_sha256.to_string(), layer, samples, corpus_sha))
    }

    fn path(&self, key: &Key) -> PathBuf {
        let (sha, layer, samples, corpus) = key;
        self.dir.join(format!(
            "mom2-{}-L{layer}-n{samples}-{}.safetensors",
            &sha[..sha.len().min(16)],
            &corpus[..corpus.len().min(12)]
        ))
    }

    fn corpus_sha(&self) -> String {
        match self.corpus() {
            Some(c) => c.sha256.clone(),
            None => "generated".into(),
        }
    }

    /// Those of `layers` whose statistics are neither in memory nor on disk (files found on
    /// disk are loaded into memory).
    pub fn missing(
        &self,
        model_sha256: &str,
        layers: &[usize],
        samples: usize,
    ) -> Result<Vec<usize>, EditError> {
        let corpus_sha = self.corpus_sha();
        let key = |l: usize| (model_sha256.to_string(), l, samples, corpus_sha.clone());
        let mut missing = Vec::new();
        let mut mem = self.memory.lock().expect("stats lock");
        for &l in layers {
            if mem.contains_key(&key(l)) {
                continue;
            }
            match read(&self.path(&key(l))) {
                Some(s) => {
                    if s.inverse.lock().expect("stats lock").is_none() {
                        // A file from before inverses were cached: add it once.
                        s.inverse()?;
                        if let Err(e) = write(&self.path(&key(l)), &s) {
                            tracing::warn!(error = %e, "could not cache statistics on disk");
                        }
                    }
                    mem.insert(key(l), Arc::new(s));
                }
                None => missing.push(l),
            }
        }
        Ok(missing)
    }

    /// A pass that computes the statistics of `layers` (run it, then [`Self::store`] what it
    /// finishes with).
    pub fn begin(
        &self,
        model: &dyn CausalLm,
        tok: &Tok,
        model_sha256: &str,
        layers: &[usize],
        samples: usize,
    ) -> Result<StatsPass, EditError> {
        let corpus = match self.corpus() {
            Some(c) => c,
            None => Arc::new(Self::generated(model, tok, samples)?),
        };
        StatsPass::new(model, tok, &corpus, layers, samples, model_sha256)
    }

    /// Keeps a layer's finished statistics, in memory and on disk, with their inverse (it costs
    /// seconds per layer, f64 Cholesky: computed once, stored with `C`).
    pub fn store(&self, s: LayerStats) -> Result<Arc<LayerStats>, EditError> {
        s.inverse()?;
        let p = &s.provenance;
        let k = (
            p.model_sha256.clone(),
            p.layer,
            p.samples,
            self.corpus_sha(),
        );
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| EditError::Stats(format!("{}: {e}", self.dir.display())))?;
        if let Err(e) = write(&self.path(&k), &s) {
            tracing::warn!(error = %e, "could not cache statistics on disk");
        }
        let s = Arc::new(s);
        self.memory.lock().expect("stats lock").insert(k, s.clone());
        Ok(s)
    }

    /// The first sentence (up to about 160 characters) of each of the corpus's first `count`
    /// articles: prompts unrelated to any edit, for methods that train against them (WISE's
    /// out-of-scope rows). Without a corpus, the generated stand-in's texts, cut the same way.
    pub fn snippets(
        &self,
        model: &dyn CausalLm,
        tok: &Tok,
        count: usize,
    ) -> Result<Vec<String>, EditError> {
        let corpus = match self.corpus() {
            Some(c) => c,
            None => Arc::new(Self::generated(model, tok, count)?),
        };
        Ok(corpus
            .texts
            .iter()
            .map(|t| first_sentence(t.lines().nth(1).unwrap_or(t)))
            .filter(|s| !s.is_empty())
            .take(count)
            .collect())
    }

    /// Statistics of `layers`, computing (in one pass over the corpus) those not cached.
    pub fn get(
        &self,
        model: &dyn CausalLm,
        tok: &Tok,
        model_sha256: &str,
        layers: &[usize],
        samples: usize,
    ) -> Result<Vec<Arc<LayerStats>>, EditError> {
        let missing = self.missing(model_sha256, layers, samples)?;
        if !missing.is_empty() {
            let mut pass = self.begin(model, tok, model_sha256, &missing, samples)?;
            pass.advance(model, Duration::MAX)?;
            for s in pass.finish() {
                self.store(s)?;
            }
        }
        let corpus_sha = self.corpus_sha();
        let mem = self.memory.lock().expect("stats lock");
        layers
            .iter()
            .map(|&l| {
                let k = (model_sha256.to_string(), l, samples, corpus_sha.clone());
                mem.get(&k).cloned().ok_or_else(|| {
                    EditError::Stats(format!("the statistics of layer {l} were not kept"))
                })
            })
            .collect()
    }
}

/// `text` up to the end of its first sentence after 40 characters, else cut at a space before
/// 160 characters.
fn first_sentence(text: &str) -> String {
    let text = text.trim();
    let limit = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i >= 160)
        .unwrap_or(text.len());
    let head = &text[..limit];
    if let Some(end) = head
        .match_indices(". ")
        .map(|(i, _)| i + 1)
        .find(|&i| i >= 40)
    {
        return head[..end].to_string();
    }
    if limit == text.len() {
        return head.to_string();
    }
    head.rsplit_once(' ').map_or(head, |(a, _)| a).to_string()
}

fn write(path: &Path, s: &LayerStats) -> Result<(), String> {
    let bytes: Vec<u8> = s.mom2.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![s.dim, s.dim], &bytes)
            .map_err(|e| e.to_string())?;
    let meta: HashMap<String, String> = [(
        "provenance".to_string(),
        serde_json::to_string(&s.provenance).map_err(|e| e.to_string())?,
    )]
    .into();
    let inv = s.inverse.lock().expect("stats lock").clone();
    let inv_bytes: Option<Vec<u8>> = inv.map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect());
    let mut views = vec![("mom2", view)];
    if let Some(b) = &inv_bytes {
        views.push((
            "mom2_inv",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![s.dim, s.dim], b)
                .map_err(|e| e.to_string())?,
        ));
    }
    let out = safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())?;
    // Write then rename: a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, out).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

fn read(path: &Path) -> Option<LayerStats> {
    let bytes = std::fs::read(path).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    let provenance: Provenance =
        serde_json::from_str(meta.metadata().as_ref()?.get("provenance")?).ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let t = st.tensor("mom2").ok()?;
    let dim = *t.shape().first()?;
    let f64s = |data: &[u8]| -> Vec<f64> {
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    };
    let mom2 = f64s(t.data());
    let inverse = st
        .tensor("mom2_inv")
        .ok()
        .map(|t| f64s(t.data()))
        .filter(|v| v.len() == dim * dim)
        .map(Arc::new);
    (mom2.len() == dim * dim).then(|| LayerStats {
        mom2,
        dim,
        provenance,
        inverse: Mutex::new(inverse),
    })
}
