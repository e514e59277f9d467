//! What an edit needs before it runs (key statistics, their null spaces, context templates),
//! made ahead of it in pieces. The engine thread runs a piece, serves the other lanes, and
//! comes back, so a first edit on a layer no longer holds every session's requests for the
//! length of a statistics pass; the edit then finds its resources cached.
use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::compute::EditContext;
use super::method::Resource;
use super::nullspace;
use super::primitives::context_template;
use super::stats::LayerStats;
use super::stats_pass::StatsPass;
use super::{hparams, EditError, Method};
use crate::engine::model::{CausalLm, Tok};

/// The missing resources of one edit, as pieces of work still to run.
pub struct Preparation {
    /// What is made (equal plans make the same resources).
    plan: String,
    pieces: VecDeque<Piece>,
}

enum Piece {
    /// Context templates, one generation per piece (`made` so far, after the bare `{}`).
    Templates {
        count: usize,
        tokens: usize,
        made: Vec<String>,
    },
    /// A statistics pass (begun on its first piece), then each layer's statistics stored.
    Stats {
        layers: Vec<usize>,
        samples: usize,
        pass: Option<StatsPass>,
    },
    /// A layer's finished statistics, whose inverse is computed next.
    Store(LayerStats),
    /// Pure arithmetic (an inverse, an eigendecomposition) on a thread of its own, so the
    /// engine thread only waits for it a slice at a time.
    Waiting {
        what: String,
        done: Receiver<Result<Option<LayerStats>, EditError>>,
    },
    NullSpace {
        layer: usize,
        samples: usize,
        threshold: f64,
    },
}

impl EditContext {
    /// What an edit by `method` with `overrides` lacks on `base`, or `None` when it can run now.
    /// Errors in the method or its hyper-parameters are left to the edit to report.
    pub fn preparation(
        &self,
        base: &dyn CausalLm,
        method: Method,
        overrides: &Value,
    ) -> Result<Option<Preparation>, EditError> {
        let resolved = hparams::resolve(method, base.spec(), overrides)?;
        let mut pieces = VecDeque::new();
        for r in method.imp().resources(&resolved)? {
            match r {
                Resource::ContextTemplates { count, tokens } => {
                    if !self.has_templates(count, tokens) {
                        pieces.push_back(Piece::Templates {
                            count,
                            tokens,
                            made: vec!["{}".into()],
                        });
                    }
                }
                Resource::KeyStats { layers, samples } => {
                    self.stats_pieces(&layers, samples, &mut pieces)?;
                }
                Resource::NullSpace {
                    layers,
                    samples,
                    threshold,
                } => {
                    self.stats_pieces(&layers, samples, &mut pieces)?;
                    for layer in layers {
                        let file = self.stats.file(&self.model_sha256, layer, samples);
                        if !self.null_spaces.cached(&file, threshold) {
                            pieces.push_back(Piece::NullSpace {
                                layer,
                                samples,
                                threshold,
                            });
                        }
                    }
                }
                // Read from the corpus files at the edit: nothing to prepare.
                Resource::CorpusSnippets { .. } | Resource::TrainedEditor { .. } => {}
            }
        }
        if pieces.is_empty() {
            return Ok(None);
        }
        let plan = pieces
            .iter()
            .map(Piece::describe)
            .collect::<Vec<_>>()
            .join("; ");
        Ok(Some(Preparation { plan, pieces }))
    }

    fn stats_pieces(
        &self,
        layers: &[usize],
        samples: usize,
        pieces: &mut VecDeque<Piece>,
    ) -> Result<(), EditError> {
        let layers = self.stats.missing(&self.model_sha256, layers, samples)?;
        if !layers.is_empty() {
            pieces.push_back(Piece::Stats {
                layers,
                samples,
                pass: None,
            });
        }
        Ok(())
    }
}

impl Piece {
    fn describe(&self) -> String {
        match self {
            Piece::Templates { count, tokens, .. } => format!("templates {count}x{tokens}"),
            Piece::Stats {
                layers, samples, ..
            } => format!("statistics {layers:?} n{samples}"),
            Piece::Store(s) => format!("store {}", s.provenance.layer),
            Piece::Waiting { what, .. } => what.clone(),
            Piece::NullSpace {
                layer,
                samples,
                threshold,
            } => format!("null space {layer} n{samples} t{threshold:e}"),
        }
    }
}

impl Preparation {
    /// Whether `other` makes the same resources (a preparation under way is continued rather
    /// than begun again).
    pub fn same_plan(&self, other: &Preparation) -> bool {
        self.plan == other.plan
    }

    pub fn plan(&self) -> &str {
        &self.plan
    }

    /// Runs pieces until `budget` has passed (at least one piece); whether everything is made.
    pub fn advance(
        &mut self,
        ctx: &EditContext,
        base: &dyn CausalLm,
        tok: &Tok,
        budget: Duration,
    ) -> Result<bool, EditError> {
        let start = Instant::now();
        while let Some(piece) = self.pieces.pop_front() {
            let left = budget.saturating_sub(start.elapsed());
            // What remains of a piece (a pass turns into its layers' stores) comes first.
            for rest in Self::run(piece, ctx, base, tok, left)?.into_iter().rev() {
                self.pieces.push_front(rest);
            }
            if start.elapsed() >= budget {
                break;
            }
        }
        Ok(self.pieces.is_empty())
    }

    /// Runs (part of) `piece` within about `left`; the pieces that remain of it, in order.
    fn run(
        piece: Piece,
        ctx: &EditContext,
        base: &dyn CausalLm,
        tok: &Tok,
        left: Duration,
    ) -> Result<Vec<Piece>, EditError> {
        Ok(match piece {
            Piece::Templates {
                count,
                tokens,
                mut made,
            } => {
                let i = made.len() - 1;
                made.push(context_template(base, tok, i, count, tokens)?);
                if made.len() == count + 1 {
                    ctx.pin_templates(count, tokens, made);
                    Vec::new()
                } else {
                    vec![Piece::Templates {
                        count,
                        tokens,
                        made,
                    }]
                }
            }
            Piece::Stats {
                layers,
                samples,
                pass,
            } => {
                let mut p = match pass {
                    Some(p) => p,
                    None => ctx
                        .stats
                        .begin(base, tok, &ctx.model_sha256, &layers, samples)?,
                };
                if p.advance(base, left)? {
                    // Each layer's inverse is a piece of its own.
                    p.finish().into_iter().map(Piece::Store).collect()
                } else {
                    vec![Piece::Stats {
                        layers,
                        samples,
                        pass: Some(p),
                    }]
                }
            }
            Piece::Store(s) => vec![background(
                format!("inverse {}", s.provenance.layer),
                move || {
                    s.inverse()?;
                    Ok(Some(s))
                },
            )],
            Piece::NullSpace {
                layer,
                samples,
                threshold,
            } => {
                let s = ctx
                    .stats
                    .get(base, tok, &ctx.model_sha256, &[layer], samples)?
                    .remove(0);
                let file = ctx.stats.file(&ctx.model_sha256, layer, samples);
                vec![background(format!("null space {layer}"), move || {
                    nullspace::compute_to_disk(&s, &file, threshold)?;
                    Ok(None)
                })]
            }
            Piece::Waiting { what, done } => match done.recv_timeout(left.max(MIN_WAIT)) {
                Ok(r) => {
                    if let Some(s) = r? {
                        ctx.stats.store(s)?;
                    }
                    Vec::new()
                }
                Err(RecvTimeoutError::Timeout) => vec![Piece::Waiting { what, done }],
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(EditError::Stats(format!("{what}: its thread panicked")))
                }
            },
        })
    }
}

/// How long a slice waits at least for a background piece (so an engine with nothing else to
/// do does not spin).
const MIN_WAIT: Duration = Duration::from_millis(20);

/// Runs `work` on a thread of its own; the piece that waits for it.
fn background(
    what: String,
    work: impl FnOnce() -> Result<Option<LayerStats>, EditError> + Send + 'static,
) -> Piece {
    let (tx, done) = mpsc::channel();
    let name = format!("emend-{}", what.replace(' ', "-"));
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        let _ = tx.send(work());
    });
    if let Err(e) = spawned {
        let (tx, done) = mpsc::channel();
        let _ = tx.send(Err(EditError::Stats(format!("{what}: {e}"))));
        return Piece::Waiting { what, done };
    }
    Piece::Waiting { what, done }
}
