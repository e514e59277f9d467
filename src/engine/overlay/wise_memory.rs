//! A run-time module of the overlay: WISE's side memories at one layer's down projection (Wang
//! et al., NeurIPS 2024). Each memory is a copy of the down projection that edits were written
//! into, held as its difference `ΔW` from the layer's weight: a memory's output is the layer's
//! own output plus `ΔW k`. A router decides per sequence which memory, if any, answers: a
//! memory's activation score on a sequence is the largest (or, with [`Scoring::Mean`], the
//! mean) over its tokens of `‖act(out + ΔW k) − act(out)‖₂`, `act` the model's MLP activation,
//! and the sequence goes to the memory with the largest score among those whose score reaches
//! its threshold (`act_ratio` times the smallest score its own edits reached when written);
//! with none, the layer's output is left bit-identical.
//!
//! The decision is made once per sequence, on the first window it appears in (the prompt of a
//! generation, the whole sequence when scoring), and held for every later token: the forward
//! pass keeps it in the KV cache beside the sequence's keys and values.
//!
//! A version stores what its edit wrote as one [`WiseWrite`]: the open memory's values at its
//! shard's mask positions after the edit, and whether the memory closes (joins the retrieved
//! memories, EasyEdit's `save_freq`) and how many closed memories then merge into one (TIES,
//! EasyEdit's `merge_freq`). The memories of a version are the fold of its chain's writes.
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::delta::tensor_bytes;
use super::StateEntry;
use crate::engine::model::{Architecture, ModelError, Result};

/// State entries of WISE writes are named `wise.side.{layer}`.
const STATE_PREFIX: &str = "wise.side.";
/// Numbers before the values in a packed write.
const HEADER: usize = 11;
/// Beyond this many tokens a sequence's score is its largest token's (EasyEdit's rule).
const MEAN_TOKENS: usize = 100;

/// How a row's token distances make its score under a memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// The mean over its tokens, the largest beyond 100 tokens (EasyEdit's `euc` at inference).
    Mean,
    /// The largest token's.
    Max,
}

impl Scoring {
    /// A row's score from its tokens' distances.
    pub fn score(self, d: &[f32]) -> f32 {
        if d.is_empty() {
            0.0
        } else if self == Self::Max || d.len() > MEAN_TOKENS {
            d.iter().copied().fold(f32::MIN, f32::max)
        } else {
            d.iter().sum::<f32>() / d.len() as f32
        }
    }
}

/// One edit's write into a layer's side memories.
#[derive(Debug, Clone, PartialEq)]
pub struct WiseWrite {
    /// WISE edits at this layer before this one in the chain.
    pub edit: usize,
    /// The open memory's shard: its mask is drawn from (`seed`, `shard`).
    pub shard: usize,
    pub seed: u32,
    pub mask_ratio: f32,
    /// This edit's in-scope activation score after training (its prompts' mean).
    pub score: f32,
    pub act_ratio: f32,
    /// After this edit the open memory closes and joins the retrieved memories.
    pub close: bool,
    /// After closing, the last `merge` closed memories are merged into one (0 or 1: none).
    pub merge: usize,
    /// TIES density of a merge.
    pub density: f32,
    /// How the router scores rows (the last write's rule holds for every memory).
    pub scoring: Scoring,
    /// `ΔW` of the open memory at its mask positions, in mask order.
    pub values: Vec<f32>,
}

impl WiseWrite {
    pub fn state_name(layer: usize) -> String {
        format!("{STATE_PREFIX}{layer}")
    }

    /// The layer a state entry name writes to, if it names a WISE write.
    pub fn layer_of(name: &str) -> Option<usize> {
        name.strip_prefix(STATE_PREFIX)?.parse().ok()
    }

    /// Packs the write as one f32 vector: a header of [`HEADER`] numbers, then the values
    /// (counts and seeds below 2²⁴ are exact in f32).
    pub fn to_state(&self, layer: usize) -> Result<StateEntry> {
        let mut v = Vec::with_capacity(HEADER + self.values.len());
        v.extend([
            self.edit as f32,
            self.shard as f32,
            self.seed as f32,
            self.mask_ratio,
            self.score,
            self.act_ratio,
            f32::from(u8::from(self.close)),
            self.merge as f32,
            self.density,
            f32::from(u8::from(self.scoring == Scoring::Max)),
            self.values.len() as f32,
        ]);
        v.extend_from_slice(&self.values);
        let n = v.len();
        Ok(StateEntry::new(
            Self::state_name(layer),
            Tensor::from_vec(v, n, &Device::Cpu)?,
        ))
    }

    pub fn from_state(t: &Tensor) -> Result<Self> {
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let bad = |why: String| ModelError::InvalidInput(format!("WISE write: {why}"));
        if v.len() < HEADER || v.len() != HEADER + v[HEADER - 1] as usize {
            return Err(bad(format!("{} numbers do not match its header", v.len())));
        }
        Ok(Self {
            edit: v[0] as usize,
            shard: v[1] as usize,
            seed: v[2] as u32,
            mask_ratio: v[3],
            score: v[4],
            act_ratio: v[5],
            close: v[6] != 0.0,
            merge: v[7] as usize,
            density: v[8],
            scoring: if v[9] != 0.0 {
                Scoring::Max
            } else {
                Scoring::Mean
            },
            values: v[HEADER..].to_vec(),
        })
    }
}

/// SplitMix64: a fixed mixing function, so a stored shard's mask is the same in every build.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE5_E4B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The flat indices of a `n`-element weight that shard `shard` may change: each independently
/// with probability `ratio` (EasyEdit's random-mask knowledge shards).
pub fn shard_mask(seed: u32, shard: usize, ratio: f32, n: usize) -> Vec<u32> {
    let base = mix(((seed as u64) << 32) | shard as u64);
    let cut = (ratio as f64 * (1u64 << 53) as f64) as u64;
    (0..n as u64)
        .filter(|&i| (mix(base ^ i) >> 11) < cut)
        .map(|i| i as u32)
        .collect()
}

/// The model's MLP activation, which the router's distance goes through (EasyEdit applies the
/// model's `hidden_act` to both outputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (GPT-2's `gelu_new`).
    GeluTanh,
    /// GELU with erf (GPT-NeoX).
    GeluErf,
}

impl Activation {
    pub fn of(arch: Architecture) -> Self {
        match arch {
            Architecture::Llama => Self::Silu,
            Architecture::Gpt2 => Self::GeluTanh,
            Architecture::GptNeox => Self::GeluErf,
        }
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Silu => candle_nn::ops::silu(x)?,
            Self::GeluTanh => x.gelu()?,
            Self::GeluErf => x.gelu_erf()?,
        })
    }
}

/// `‖act(out + add) − act(out)‖₂` per row of `(n, d)` tensors: `(n,)`. Training passes a tiny
/// `eps` under the root, whose gradient is infinite at 0 (the memory starts equal to the layer).
pub fn activation_distance(
    act: Activation,
    out: &Tensor,
    add: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let diff = (act.apply(&(out + add)?)? - act.apply(out)?)?;
    let sq = diff.sqr()?.sum(1)?;
    Ok(if eps > 0.0 {
        (sq + eps)?.sqrt()?
    } else {
        sq.sqrt()?
    })
}

/// One memory: `ΔW` on the host (merges read it) and transposed on the device, `(d_in, d_out)`,
/// so that `k ΔWᵀ` is one plain matmul.
#[derive(Debug, Clone)]
struct Memory {
    host: Arc<Vec<f32>>,
    delta_t: Tensor,
    /// The smallest in-scope score its edits reached.
    min_score: f32,
}

/// The open memory: the shard's mask and its values there.
#[derive(Debug, Clone)]
struct Open {
    shard: usize,
    seed: u32,
    mask: Arc<Vec<u32>>,
    values: Vec<f32>,
    min_score: f32,
}

/// WISE's memories at one layer.
#[derive(Debug, Clone)]
pub struct WiseMemory {
    d_out: usize,
    d_in: usize,
    act: Activation,
    device: Device,
    edits: usize,
    act_ratio: f32,
    scoring: Scoring,
    open: Option<Open>,
    /// The open memory as a [`Memory`] (rebuilt after writes).
    open_memory: Option<Memory>,
    closed: Vec<Memory>,
    /// Shards closed so far (merging does not change it).
    closed_shards: usize,
}

/// Where each row's tokens are in a window: `start..end` (left padding before, right padding
/// after).
pub type Span = std::ops::Range<usize>;

impl WiseMemory {
    /// Empty memories for a down projection of `(d_out, d_in)`.
    pub fn new(d_out: usize, d_in: usize, act: Activation, device: &Device) -> Self {
        Self {
            d_out,
            d_in,
            act,
            device: device.clone(),
            edits: 0,
            act_ratio: 1.0,
            scoring: Scoring::Mean,
            open: None,
            open_memory: None,
            closed: Vec::new(),
            closed_shards: 0,
        }
    }

    /// WISE edits folded in.
    pub fn edits(&self) -> usize {
        self.edits
    }

    /// Memories the router chooses among (the open one included).
    pub fn memories(&self) -> usize {
        self.closed.len() + usize::from(self.open_memory.is_some())
    }

    pub fn activation(&self) -> Activation {
        self.act
    }

    /// The open memory's shard, seed, mask and values, if one is open.
    pub fn open(&self) -> Option<(usize, u32, &[u32], &[f32])> {
        self.open
            .as_ref()
            .map(|o| (o.shard, o.seed, o.mask.as_slice(), o.values.as_slice()))
    }

    /// The smallest in-scope score of the open memory's edits, if `shard` is open.
    pub fn open_min_score(&self, shard: usize) -> Option<f32> {
        self.open
            .as_ref()
            .filter(|o| o.shard == shard)
            .map(|o| o.min_score)
    }

    /// The shard the next edit writes into (the open one, or the one after the last closed).
    pub fn next_shard(&self) -> usize {
        self.open.as_ref().map_or(self.closed_shards, |o| o.shard)
    }

    pub fn write_all<'w>(&mut self, writes: impl IntoIterator<Item = &'w WiseWrite>) -> Result<()> {
        for w in writes {
            self.write_one(w)?;
        }
        self.refresh()
    }

    fn write_one(&mut self, w: &WiseWrite) -> Result<()> {
        let bad = |why: String| Err(ModelError::InvalidInput(format!("WISE write: {why}")));
        if w.edit != self.edits {
            return bad(format!("edit {} follows {} edits", w.edit, self.edits));
        }
        let n = self.d_out * self.d_in;
        let open = match self.open.take() {
            Some(o) if o.shard == w.shard && o.seed == w.seed => o,
            _ => {
                let mask = shard_mask(w.seed, w.shard, w.mask_ratio, n);
                Open {
                    shard: w.shard,
                    seed: w.seed,
                    values: vec![0.0; mask.len()],
                    mask: Arc::new(mask),
                    min_score: f32::INFINITY,
                }
            }
        };
        if w.values.len() != open.mask.len() {
            return bad(format!(
                "{} values for a shard of {} positions",
                w.values.len(),
                open.mask.len()
            ));
        }
        let open = Open {
            values: w.values.clone(),
            min_score: open.min_score.min(w.score),
            ..open
        };
        self.act_ratio = w.act_ratio;
        self.scoring = w.scoring;
        self.edits += 1;
        if w.close {
            let host = Arc::new(dense(&open.mask, &open.values, n));
            self.closed.push(self.memory(host, open.min_score)?);
            self.closed_shards = w.shard + 1;
            if w.merge > 1 && self.closed.len() >= w.merge {
                let merged = self.closed.split_off(self.closed.len() - w.merge);
                let min_score = merged
                    .iter()
                    .map(|m| m.min_score)
                    .fold(f32::INFINITY, f32::min);
                let hosts: Vec<&[f32]> = merged.iter().map(|m| m.host.as_slice()).collect();
                let host = Arc::new(ties_merge(&hosts, w.density));
                self.closed.push(self.memory(host, min_score)?);
            }
            self.open = None;
        } else {
            self.open = Some(open);
        }
        Ok(())
    }

    fn memory(&self, host: Arc<Vec<f32>>, min_score: f32) -> Result<Memory> {
        let delta_t = Tensor::from_slice(host.as_slice(), (self.d_out, self.d_in), &self.device)?
            .t()?
            .contiguous()?;
        Ok(Memory {
            host,
            delta_t,
            min_score,
        })
    }

    fn refresh(&mut self) -> Result<()> {
        self.open_memory = match &self.open {
            None => None,
            Some(o) => Some(self.memory(
                Arc::new(dense(&o.mask, &o.values, self.d_out * self.d_in)),
                o.min_score,
            )?),
        };
        Ok(())
    }

    /// The memories in routing order (open first, as EasyEdit checks it first).
    fn candidates(&self) -> impl Iterator<Item = &Memory> {
        self.open_memory.iter().chain(self.closed.iter())
    }

    /// Each row's score under every memory, `[row][memory]`, for the rows' `spans` of a
    /// `(b, t, ·)` window.
    pub fn scores(&self, key: &Tensor, out: &Tensor, spans: &[Span]) -> Result<Vec<Vec<f32>>> {
        let (b, t, _) = key.dims3()?;
        let k = key.reshape((b * t, self.d_in))?;
        let o = out.reshape((b * t, self.d_out))?.to_dtype(DType::F32)?;
        let mut per_row = vec![Vec::new(); b];
        for m in self.candidates() {
            let add = k
                .matmul(&m.delta_t.to_dtype(k.dtype())?)?
                .to_dtype(DType::F32)?;
            let d: Vec<f32> = activation_distance(self.act, &o, &add, 0.0)?.to_vec1()?;
            for (r, span) in spans.iter().enumerate() {
                let toks = &d[r * t + span.start.min(t)..r * t + span.end.min(t)];
                per_row[r].push(self.scoring.score(toks));
            }
        }
        Ok(per_row)
    }

    /// The memory each row goes to (index in routing order), from its scores.
    pub fn route(&self, scores: &[Vec<f32>]) -> Vec<Option<usize>> {
        let thresholds: Vec<f32> = self
            .candidates()
            .map(|m| m.min_score * self.act_ratio)
            .collect();
        scores
            .iter()
            .map(|s| {
                s.iter()
                    .zip(&thresholds)
                    .enumerate()
                    .filter(|(_, (score, thr))| score >= thr)
                    .max_by(|a, b| a.1 .0.total_cmp(b.1 .0))
                    .map(|(i, _)| i)
            })
            .collect()
    }

    /// The down projection's output `out` (`(b, t, d_out)`) with each routed row's memory
    /// added; `routes` are the rows' decisions, made here (from `spans`) when `None`. Rows
    /// routed nowhere are the same elements, bit for bit. Returns the decisions too.
    pub fn apply(
        &self,
        key: &Tensor,
        out: Tensor,
        spans: &[Span],
        routes: Option<&[Option<usize>]>,
    ) -> Result<(Tensor, Vec<Option<usize>>)> {
        let routes = match routes {
            Some(r) => r.to_vec(),
            None if self.memories() == 0 => vec![None; spans.len()],
            None => self.route(&self.scores(key, &out, spans)?),
        };
        if routes.iter().all(Option::is_none) {
            return Ok((out, routes));
        }
        let (b, t, _) = key.dims3()?;
        let candidates: Vec<&Memory> = self.candidates().collect();
        let mut result = out;
        for (i, m) in candidates.iter().enumerate() {
            let rows: Vec<u32> = (0..b as u32)
                .filter(|&r| routes[r as usize] == Some(i))
                .collect();
            if rows.is_empty() {
                continue;
            }
            let mut sel = vec![0f32; b];
            for &r in &rows {
                sel[r as usize] = 1.0;
            }
            let k = key.reshape((b * t, self.d_in))?;
            let add = k
                .matmul(&m.delta_t.to_dtype(k.dtype())?)?
                .reshape((b, t, self.d_out))?;
            let sel = Tensor::from_vec(sel, (b, 1, 1), &self.device)?.to_dtype(add.dtype())?;
            result = (result + add.broadcast_mul(&sel)?.to_dtype(key.dtype())?)?;
        }
        Ok((result, routes))
    }

    /// Bytes held: host copies and device tensors of every memory, and the open shard.
    pub fn bytes(&self) -> usize {
        let mem = |m: &Memory| m.host.len() * 4 + tensor_bytes(&m.delta_t);
        self.candidates().map(mem).sum::<usize>()
            + self
                .open
                .as_ref()
                .map_or(0, |o| (o.mask.len() + o.values.len()) * 4)
    }
}

/// A dense `n`-element `ΔW` with `values` at `mask`.
fn dense(mask: &[u32], values: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n];
    for (&i, &v) in mask.iter().zip(values) {
        out[i as usize] = v;
    }
    out
}

/// TIES merging of task vectors (Yadav et al. 2023), as EasyEdit's WISE calls it (`GTA` with
/// magnitude pruning, sign consensus by sum, normalised; equal weights): each vector keeps its
/// `density` largest-magnitude entries, each entry takes the sign of the entries' sum, and the
/// agreeing entries are averaged.
pub fn ties_merge(vectors: &[&[f32]], density: f32) -> Vec<f32> {
    let n = vectors.first().map_or(0, |v| v.len());
    let w = 1.0 / vectors.len() as f32;
    let pruned: Vec<Vec<f32>> = vectors
        .iter()
        .map(|v| {
            let keep = ((density as f64 * n as f64) as usize).clamp(1, n.max(1));
            if keep >= n {
                return v.iter().map(|x| x * w).collect();
            }
            let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
            let (_, cut, _) = mags.select_nth_unstable_by(n - keep, |a, b| a.total_cmp(b));
            let cut = *cut;
            v.iter()
                .map(|&x| if x.abs() >= cut { x * w } else { 0.0 })
                .collect()
        })
        .collect();
    (0..n)
        .map(|i| {
            let sum: f32 = pruned.iter().map(|p| p[i]).sum();
            let sign = if sum >= 0.0 { 1.0 } else { -1.0 };
            let (mut mixed, mut divisor) = (0.0f32, 0.0f32);
            for p in &pruned {
                if p[i] != 0.0 && p[i].signum() == sign {
                    mixed += p[i];
                    divisor += w;
                }
            }
            if divisor == 0.0 {
                mixed
            } else {
                mixed / divisor
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_fixed_by_seed_and_shard_and_near_the_ratio() {
        let a = shard_mask(3, 0, 0.2, 10_000);
        assert_eq!(a, shard_mask(3, 0, 0.2, 10_000));
        assert_ne!(a, shard_mask(3, 1, 0.2, 10_000));
        assert!((1900..2100).contains(&a.len()), "{}", a.len());
        assert!(a.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn writes_round_trip_through_state() {
        let w = WiseWrite {
            edit: 4,
            shard: 1,
            seed: 9,
            mask_ratio: 0.2,
            score: 21.5,
            act_ratio: 0.88,
            close: true,
            merge: 2,
            density: 0.53,
            scoring: Scoring::Max,
            values: vec![0.5, -1.0, 0.25],
        };
        let s = w.to_state(25).unwrap();
        assert_eq!(WiseWrite::layer_of(&s.name), Some(25));
        assert_eq!(WiseWrite::from_state(&s.tensor).unwrap(), w);
    }

    #[test]
    fn ties_keeps_agreeing_large_entries() {
        // Entry 0: both positive → their mean; entry 1: signs disagree, the sum's sign wins and
        // only the agreeing entry counts; entry 2: pruned in both (smallest magnitudes).
        let a = [2.0f32, 3.0, 0.1, 4.0];
        let b = [4.0f32, -2.5, 2.0, 4.0];
        let m = ties_merge(&[&a, &b], 0.75);
        assert_eq!(m[0], 3.0);
        assert_eq!(m[1], 3.0);
        assert_eq!(m[2], 0.0);
        assert_eq!(m[3], 4.0);
    }

    fn memory_with(values: f32, score: f32) -> WiseMemory {
        let dev = Device::Cpu;
        let mut m = WiseMemory::new(2, 3, Activation::Silu, &dev);
        let n = shard_mask(1, 0, 1.0, 6).len();
        m.write_all(&[WiseWrite {
            edit: 0,
            shard: 0,
            seed: 1,
            mask_ratio: 1.0,
            score,
            act_ratio: 0.5,
            close: false,
            merge: 0,
            density: 0.5,
            scoring: Scoring::Mean,
            values: vec![values; n],
        }])
        .unwrap();
        m
    }

    #[test]
    fn rows_below_the_threshold_stay_bit_identical() {
        let dev = Device::Cpu;
        let m = memory_with(1.0, 2.0);
        // Row 0: a large key (score well above 0.5 × 2); row 1: a zero key (score 0).
        let key = Tensor::new(&[[[3.0f32, 3.0, 3.0]], [[0.0, 0.0, 0.0]]], &dev).unwrap();
        let out = Tensor::new(&[[[0.1f32, 0.2]], [[0.3, 0.4]]], &dev).unwrap();
        let (got, routes) = m.apply(&key, out.clone(), &[0..1, 0..1], None).unwrap();
        assert_eq!(routes, vec![Some(0), None]);
        let got: Vec<Vec<Vec<f32>>> = got.to_vec3().unwrap();
        assert_eq!(got[1], vec![vec![0.3, 0.4]]);
        assert!((got[0][0][0] - 9.1).abs() < 1e-5, "{got:?}");
        // A held decision applies whatever the window's own score.
        let (held, _) = m
            .apply(&key, out, &[0..1, 0..1], Some(&[None, Some(0)]))
            .unwrap();
        let held: Vec<Vec<Vec<f32>>> = held.to_vec3().unwrap();
        assert_eq!(held[0], vec![vec![0.1, 0.2]]);
        assert_eq!(held[1], vec![vec![0.3, 0.4]]);
    }

    #[test]
    fn closing_and_merging_fold_shards_into_one_memory() {
        let dev = Device::Cpu;
        let mut m = WiseMemory::new(2, 3, Activation::Silu, &dev);
        let write = |edit, shard, close, merge| {
            let n = shard_mask(1, shard, 0.5, 6).len();
            WiseWrite {
                edit,
                shard,
                seed: 1,
                mask_ratio: 0.5,
                score: 10.0 + edit as f32,
                act_ratio: 0.9,
                close,
                merge,
                density: 1.0,
                scoring: Scoring::Mean,
                values: vec![1.0; n],
            }
        };
        m.write_all(&[write(0, 0, false, 0), write(1, 0, true, 0)])
            .unwrap();
        assert_eq!((m.memories(), m.next_shard()), (1, 1));
        m.write_all(&[write(2, 1, true, 2)]).unwrap();
        assert_eq!(m.memories(), 1);
        assert_eq!(m.closed[0].min_score, 10.0);
        assert!(m.write_all(&[write(7, 2, false, 0)]).is_err());
    }
}
