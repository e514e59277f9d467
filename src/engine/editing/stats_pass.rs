//! One pass over the statistics corpus, in pieces: `Σ k kᵀ` at the keys entering the down
//! projections of some layers. A piece is one layer of one batch, so the engine thread can
//! serve other lanes between pieces instead of stalling for the whole pass; run to the end in
//! one go, the pass computes exactly what it computes in pieces.
use std::ops::Range;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use super::stats::{Corpus, LayerStats, Provenance, SEQ_TOKENS};
use super::EditError;
use crate::engine::model::{CausalLm, Forward, Hooks, Positions, Site, SiteKind, Tok};

/// Sequences per forward pass.
const BATCH: usize = 16;
/// Batches whose f32 partial sums are added before they fold into the f64 totals.
const FOLD_EVERY: usize = 8;

pub struct StatsPass {
    layers: Vec<usize>,
    samples: usize,
    model_sha256: String,
    corpus_name: String,
    corpus_sha256: String,
    seqs: Vec<Vec<u32>>,
    /// Runs of equal-length sequences in `seqs`, at most [`BATCH`] each.
    batches: Vec<Range<usize>>,
    /// f32 partial sums per layer (folded into `sums` every [`FOLD_EVERY`] batches).
    acc: Vec<Tensor>,
    sums: Vec<Vec<f64>>,
    /// Width of the keys (the MLP's intermediate size); `sums` are `ff × ff`.
    ff: usize,
    tokens: usize,
    /// The batch in hand and the next layer to run on it (its hidden state in `hidden`).
    batch: usize,
    layer: usize,
    hidden: Option<Tensor>,
    /// Time spent computing (not waiting between pieces).
    busy: Duration,
}

impl StatsPass {
    /// A pass over `corpus` for `layers` (sorted, distinct) with `samples` sequences.
    pub(crate) fn new(
        model: &dyn CausalLm,
        tok: &Tok,
        corpus: &Corpus,
        layers: &[usize],
        samples: usize,
        model_sha256: &str,
    ) -> Result<Self, EditError> {
        let start = Instant::now();
        let mut seqs: Vec<Vec<u32>> = Vec::new();
        'outer: for t in &corpus.texts {
            let ids = tok.encode_plain(t)?;
            for w in ids.chunks(SEQ_TOKENS) {
                if w.len() < 8 {
                    continue;
                }
                seqs.push(w.to_vec());
                if seqs.len() >= samples {
                    break 'outer;
                }
            }
        }
        if seqs.is_empty() {
            return Err(EditError::Stats(format!(
                "the corpus `{}` holds no text",
                corpus.name
            )));
        }
        // Equal lengths batch without padding; sort so batches are near-uniform.
        seqs.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let mut batches = Vec::new();
        let mut i = 0;
        while i < seqs.len() {
            let width = seqs[i].len();
            let mut j = i + 1;
            while j < seqs.len() && j - i < BATCH && seqs[j].len() == width {
                j += 1;
            }
            batches.push(i..j);
            i = j;
        }
        let mut layers = layers.to_vec();
        layers.sort_unstable();
        layers.dedup();
        let ff = model.spec().intermediate_size;
        let dev = model.device();
        Ok(Self {
            acc: layers
                .iter()
                .map(|_| Tensor::zeros((ff, ff), DType::F32, dev))
                .collect::<Result<_, _>>()?,
            sums: vec![vec![0.0; ff * ff]; layers.len()],
            ff,
            layers,
            samples,
            model_sha256: model_sha256.to_string(),
            corpus_name: corpus.name.clone(),
            corpus_sha256: corpus.sha256.clone(),
            seqs,
            batches,
            tokens: 0,
            batch: 0,
            layer: 0,
            hidden: None,
            busy: start.elapsed(),
        })
    }

    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    pub fn samples(&self) -> usize {
        self.samples
    }

    pub fn done(&self) -> bool {
        self.batch == self.batches.len()
    }

    /// Fraction of the pieces done.
    pub fn progress(&self) -> f64 {
        let per_batch = self.top() + 1;
        let done = self.batch * per_batch + self.layer;
        done as f64 / (self.batches.len() * per_batch) as f64
    }

    fn top(&self) -> usize {
        *self.layers.last().expect("at least one layer")
    }

    /// Runs pieces until `budget` has passed (at least one piece) or the pass is done; whether
    /// it is done.
    pub fn advance(&mut self, model: &dyn CausalLm, budget: Duration) -> Result<bool, EditError> {
        let start = Instant::now();
        while !self.done() {
            self.piece(model)?;
            if start.elapsed() >= budget {
                break;
            }
        }
        self.busy += start.elapsed();
        Ok(self.done())
    }

    /// One layer of the batch in hand (embedding it first when it is new).
    fn piece(&mut self, model: &dyn CausalLm) -> Result<(), EditError> {
        let dev = model.device().clone();
        let range = self.batches[self.batch].clone();
        let (b, width) = (range.len(), self.seqs[range.start].len());
        let h = match self.hidden.take() {
            Some(h) => h,
            None => {
                let ids: Vec<u32> = self.seqs[range].iter().flatten().copied().collect();
                let input = Tensor::from_vec(ids, (b, width), &dev)?;
                model.embed(&input, &Forward::new(b, width, &dev))?
            }
        };
        let l = self.layer;
        let read = self.layers.iter().position(|&x| x == l);
        let mut hooks = Hooks::new();
        if read.is_some() {
            hooks = hooks.read(Site::new(l, SiteKind::MlpIn), Positions::All);
        }
        let h = {
            let mut fwd = Forward::new(b, width, &dev).with_hooks(&mut hooks);
            model.run_layers(h, l..l + 1, &mut fwd)?
        };
        if let Some(i) = read {
            let ff = self.ff;
            let k = hooks
                .take(Site::new(l, SiteKind::MlpIn))
                .expect("key read")
                .to_dtype(DType::F32)?
                .reshape((b * width, ff))?;
            self.acc[i] = (&self.acc[i] + k.t()?.matmul(&k)?)?;
        }
        if l < self.top() {
            self.hidden = Some(h);
            self.layer += 1;
            return Ok(());
        }
        self.tokens += b * width;
        self.layer = 0;
        self.batch += 1;
        // Fold the f32 partial sums into f64 now and then, so long runs keep their precision.
        if self.batch.is_multiple_of(FOLD_EVERY) || self.done() {
            for (a, s) in self.acc.iter_mut().zip(&mut self.sums) {
                fold(s, a)?;
                *a = a.zeros_like()?;
            }
        }
        Ok(())
    }

    /// The finished statistics, one per layer (inverses not yet computed).
    pub fn finish(self) -> Vec<LayerStats> {
        assert!(
            self.done(),
            "a statistics pass finishes after its last piece"
        );
        let seconds = self.busy.as_secs_f64();
        tracing::info!(
            layers = ?self.layers,
            tokens = self.tokens,
            seconds,
            "key statistics computed"
        );
        let ff = self.ff;
        let sequences = self.seqs.len();
        let tokens = self.tokens;
        self.layers
            .iter()
            .zip(self.sums)
            .map(|(&layer, s)| {
                LayerStats::new(
                    s.into_iter().map(|x| x / tokens as f64).collect(),
                    ff,
                    Provenance {
                        model_sha256: self.model_sha256.clone(),
                        layer,
                        samples: self.samples,
                        sequences,
                        tokens,
                        corpus: self.corpus_name.clone(),
                        corpus_sha256: self.corpus_sha256.clone(),
                        seconds,
                    },
                )
            })
            .collect()
    }
}

fn fold(sum: &mut [f64], t: &Tensor) -> Result<(), EditError> {
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    for (s, x) in sum.iter_mut().zip(v) {
        *s += x as f64;
    }
    Ok(())
}
