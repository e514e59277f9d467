//! Sites and hooks on the default model: reads, no-op replacement, the `mlp.in` contract,
//! split forwards, and gradients flowing into a patched site.
mod common;

use candle_core::{DType, Tensor, Var, D};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use common::*;
use emend::engine::model::{Forward, Hooks, PatchMode, Positions, Site, SiteKind};

fn prompt_ids() -> Vec<u32> {
    default_model()
        .tokenizer
        .encode("The Eiffel Tower is located in the city of")
        .unwrap()
}

fn logits_with(hooks: Option<&mut Hooks>, ids: &[u32]) -> Vec<Vec<f32>> {
    let m = default_model();
    let dev = m.model.device();
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), dev).unwrap();
    let mut fwd = Forward::new(1, ids.len(), dev);
    if let Some(h) = hooks {
        fwd = fwd.with_hooks(h);
    }
    m.model
        .forward(&input, &mut fwd)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn replacing_a_site_with_its_own_value_changes_nothing() {
    let ids = prompt_ids();
    let base = logits_with(None, &ids);
    let site = Site::new(12, SiteKind::MlpOut);
    let mut read = Hooks::new().read(site, Positions::All);
    let again = logits_with(Some(&mut read), &ids);
    assert_eq!(base, again, "reading must not perturb the forward");
    let value = read.take(site).unwrap();
    assert_eq!(value.dims(), &[1, ids.len(), 576]);
    let mut replace = Hooks::new().replace(site, value);
    assert_eq!(
        logits_with(Some(&mut replace), &ids),
        base,
        "no-op patch is bit-identical"
    );
}

#[test]
fn mlp_in_is_what_the_down_projection_multiplies() {
    let ids = prompt_ids();
    let m = default_model();
    let layer = 7;
    let (kin, kout) = (
        Site::new(layer, SiteKind::MlpIn),
        Site::new(layer, SiteKind::MlpOut),
    );
    let mut h = Hooks::new()
        .read(kin, Positions::All)
        .read(kout, Positions::All);
    logits_with(Some(&mut h), &ids);
    let k = h.take(kin).unwrap();
    let out = h.take(kout).unwrap();
    let w = m
        .model
        .weight(emend::engine::model::WeightId::mlp_down(layer))
        .unwrap();
    assert_eq!(
        k.dim(D::Minus1).unwrap(),
        w.dim(1).unwrap(),
        "key width = down_proj in-features (1536)"
    );
    let recomputed = k.squeeze(0).unwrap().matmul(&w.t().unwrap()).unwrap();
    let diff = (recomputed - out.squeeze(0).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4, "W·k differs from mlp.out by {diff}");
}

#[test]
fn selected_positions_read_rows_in_order() {
    let ids = prompt_ids();
    let site = Site::new(3, SiteKind::Residual);
    let mut all = Hooks::new().read(site, Positions::All);
    logits_with(Some(&mut all), &ids);
    let mut some = Hooks::new().read(site, Positions::Rows(vec![(0, 4), (0, 1)]));
    logits_with(Some(&mut some), &ids);
    let all = all.take(site).unwrap().squeeze(0).unwrap();
    let rows = some.take(site).unwrap();
    assert_eq!(
        rows.get(0).unwrap().to_vec1::<f32>().unwrap(),
        all.get(4).unwrap().to_vec1::<f32>().unwrap()
    );
    assert_eq!(
        rows.get(1).unwrap().to_vec1::<f32>().unwrap(),
        all.get(1).unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn running_layers_in_two_slices_equals_one_pass() {
    let m = default_model();
    let ids = prompt_ids();
    let dev = m.model.device();
    let n = m.model.spec().n_layers;
    let input = Tensor::from_vec(ids.clone(), (1, ids.len()), dev).unwrap();
    let mut fwd = Forward::new(1, ids.len(), dev);
    let e = m.model.embed(&input, &fwd).unwrap();
    let mid = m.model.run_layers(e, 0..10, &mut fwd).unwrap();
    let top = m.model.run_layers(mid, 10..n, &mut fwd).unwrap();
    let split: Vec<Vec<f32>> = m
        .model
        .head(&top, false)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(split, logits_with(None, &ids));
}

#[test]
fn gradients_reach_a_patched_site_and_adam_raises_the_target() {
    let m = default_model();
    let ids = prompt_ids();
    let dev = m.model.device();
    let target = m.tokenizer.encode(" Rome").unwrap()[0];
    let last = ids.len() - 1;
    let site = Site::new(20, SiteKind::MlpOut);
    let delta = Var::zeros((1, 576), DType::F32, dev).unwrap();
    let input = Tensor::from_vec(ids.clone(), (1, ids.len()), dev).unwrap();

    let target_logprob = |with_delta: bool| -> (Tensor, f32) {
        let mut hooks = Hooks::new();
        if with_delta {
            hooks = hooks.patch(
                site,
                vec![(0, last)],
                delta.as_tensor().clone(),
                PatchMode::Add,
            );
        }
        let mut fwd = Forward::new(1, ids.len(), dev)
            .with_hooks(&mut hooks)
            .differentiable();
        let logits = m.model.forward(&input, &mut fwd).unwrap();
        let row = logits.get(0).unwrap().get(last).unwrap();
        let lp = candle_nn::ops::log_softmax(&row, D::Minus1)
            .unwrap()
            .get(target as usize)
            .unwrap();
        let v = lp.to_scalar::<f32>().unwrap();
        (lp, v)
    };

    let (_, before) = target_logprob(false);
    let (lp, _) = target_logprob(true);
    let grads = lp.neg().unwrap().backward().unwrap();
    let g = grads
        .get(delta.as_tensor())
        .expect("gradient reaches the patched site");
    let norm = g
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(norm > 0.0, "gradient is non-zero");

    let mut opt = AdamW::new(
        vec![delta.clone()],
        ParamsAdamW {
            lr: 0.5,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    for _ in 0..20 {
        let (lp, _) = target_logprob(true);
        opt.backward_step(&lp.neg().unwrap()).unwrap();
    }
    let (_, after) = target_logprob(true);
    assert!(after > before + 1.0, "log P(Rome) {before} → {after}");
    // the base weights are untouched: without the patch the model is as before
    let (_, again) = target_logprob(false);
    assert_eq!(again, before);
}
