#!/usr/bin/env python3
"""An independent PyTorch ROME on the default model, to cross-check emend's Rust ROME.

Written from the ROME paper's equations (Meng et al. 2022, section 3 and appendix), with the
loss and optimiser conventions of its reference code described in ROME's README and EasyEdit's
docs; none of their code is used. It runs on HF transformers (GGUF dequantised to f32, CPU) with
the same inputs emend used: the edit request, the context templates (they are sampled text, so
they are taken from emend's dump instead of being sampled again) and the key statistics `C`
(emend's cached `mom2` safetensors), and computes

    k*  = mean over templates of the key entering layer L's down projection at the subject's
          last token;
    v*  = v + δ, δ optimised with Adam so the model predicts target_new (NLL averaged over the
          templates), plus the KL term on "{subject} is a" and weight decay ‖δ‖/‖v‖², clamped to
          clamp_norm_factor·‖v‖, stopping once the NLL is below 5e-2 (emend's rule; ROME's
          reference stops on the total loss, which overshoots on this model);
    Δ   = (v* − v) ⊗ (C⁻¹k* / ‖C⁻¹k*‖) / (k · C⁻¹k*/‖C⁻¹k*‖),  k, v: the plain prompt's key/value.

It then compares Δ with emend's (cosine of the matrices) and writes the fixture that
`tests/rome_reference.rs` checks emend against. Run from the repository root:

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install -r scripts/requirements-reference.txt
    ./target/debug/emend edit --method rome --file tests/fixtures/rome_request.json --dump /tmp/rome-dump
    /tmp/ref/bin/python scripts/rome_reference.py --gguf ~/.cache/emend/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --dump /tmp/rome-dump --out tests/fixtures/rome_reference.json
"""
import argparse
import json
import os
import statistics
import time

import torch
import transformers
from safetensors.torch import load_file

from reference_tokenizer import smollm_tokenizer_from_gguf


def locate(tok, context, prompt, subject):
    """Token ids of `context` filled with `prompt` and the subject, and the index of the
    subject's last token (the last token of the text cut right after the subject)."""
    template = context.replace("{}", prompt, 1)
    at = template.index("{}")
    text = template.replace("{}", subject, 1)
    ids = tok.encode(text).ids
    prefix = tok.encode(text[: at + len(subject)]).ids
    return ids, min(len(prefix) - 1, len(ids) - 1)


def continuation(tok, context, cont):
    """lm-evaluation-harness's split: encode(context + continuation) minus encode(context)."""
    whole = tok.encode(context + cont).ids
    ctx = tok.encode(context).ids
    return whole[len(ctx):]


def batch(rows, pad_id):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def keys_values(model, layer, ids, mask, at):
    """The down projection's input and output at each (row, position) of `at`."""
    got = {}
    down = model.model.layers[layer].mlp.down_proj

    def hook(_m, inp, out):
        got["k"] = torch.stack([inp[0][r, p] for r, p in at])
        got["v"] = torch.stack([out[r, p] for r, p in at])

    h = down.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        h.remove()
    return got["k"], got["v"]


def rome(model, tok, req, templates, layer, hp, inv_cov):
    prompt, subject = req["prompt"], req["subject"]
    target_text = " " + req["target_new"].strip()
    pad = tok.token_to_id("<|im_end|>")

    # k*: the mean key over the templates.
    located = [locate(tok, c, prompt, subject) for c in templates]
    ids, mask = batch([l[0] for l in located], pad)
    k_rows, _ = keys_values(model, layer, ids, mask, [(r, l[1]) for r, l in enumerate(located)])
    k_star = k_rows.mean(0)

    # The plain prompt's key and value.
    plain_ids, plain_last = locate(tok, "{}", prompt, subject)
    ids, mask = batch([plain_ids], pad)
    cur_k, cur_v = keys_values(model, layer, ids, mask, [(0, plain_last)])
    cur_k, cur_v = cur_k[0], cur_v[0]

    # v*: rows are each template's prompt + target[:-1], then the KL prompt.
    target = continuation(tok, prompt.replace("{}", subject, 1), target_text)
    rows, lookups, terms = [], [], []
    w = 1.0 / (len(templates) * len(target))
    for r, (l_ids, last) in enumerate(located):
        for j, t in enumerate(target):
            terms.append((r, len(l_ids) - 1 + j, t))
        rows.append(l_ids + target[:-1])
        lookups.append(last)
    kl_ids, kl_last = locate(tok, "{}", "{} is a", subject)
    kl_row = len(rows)
    rows.append(kl_ids)
    lookups.append(kl_last)
    ids, mask = batch(rows, pad)

    d = model.config.hidden_size
    delta = torch.zeros(d, requires_grad=True)
    down = model.model.layers[layer].mlp.down_proj

    def add_delta(_m, _inp, out):
        out = out.clone()
        for r, p in enumerate(lookups):
            out[r, p] = out[r, p] + delta
        return out

    h = down.register_forward_hook(add_delta)
    opt = torch.optim.Adam([delta], lr=hp["v_lr"])
    init_norm = cur_v.norm()
    max_norm = hp["clamp_norm_factor"] * init_norm
    kl_init = None
    tr = torch.tensor([t[0] for t in terms])
    tp = torch.tensor([t[1] for t in terms])
    tt = torch.tensor([t[2] for t in terms])
    curve = []
    try:
        for step in range(hp["v_steps"]):
            opt.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask).logits
            lp = torch.log_softmax(logits[tr, tp].float(), -1)
            nll = -(lp[torch.arange(len(terms)), tt] * w).sum()
            kl_lp = torch.log_softmax(logits[kl_row, lookups[kl_row]].float(), -1)
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            kl = (kl_init.exp() * (kl_init - kl_lp)).sum()
            wd = hp["v_weight_decay"] * delta.norm() / init_norm**2
            loss = nll + hp["kl_factor"] * kl + wd
            curve.append({"nll": nll.item(), "loss": loss.item()})
            if nll.item() < 5e-2 or step + 1 == hp["v_steps"]:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                n = delta.norm()
                if n > max_norm:
                    delta.mul_(max_norm / n)
    finally:
        h.remove()
    v_star = cur_v + delta.detach()

    left = inv_cov @ k_star.double() if inv_cov is not None else k_star.double()
    left = (left / left.norm()).float()
    right = (v_star - cur_v) / torch.dot(cur_k, left)
    return {"u": right, "v": left, "k_star": k_star, "v_star": v_star, "steps": curve}


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--dump", required=True, help="the directory `emend edit --dump` wrote")
    ap.add_argument("--out", help="fixture to write")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of the edit")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())

    info = json.load(open(os.path.join(a.dump, "edit.json")))
    req, hp, layer = info["request"], info["hparams"], info["hparams"]["layer"]
    templates = info["templates"]
    d, fname = os.path.split(os.path.abspath(a.gguf))
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=fname, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = smollm_tokenizer_from_gguf(a.gguf)

    inv = None
    if hp.get("mom2_adjustment", True):
        c = load_file(info["stats_file"])["mom2"].double()
        n = c.shape[0]
        # emend's ridge: 1e-6 of the mean diagonal, so both invert the same matrix.
        c = c + torch.eye(n, dtype=torch.float64) * max(1e-6 * c.diagonal().mean().item(), 1e-12)
        inv = torch.linalg.inv(c)

    times, out = [], None
    for _ in range(max(a.repeat, 1)):
        t0 = time.perf_counter()
        out = rome(model, tok, req, templates, layer, hp, inv)
        times.append(time.perf_counter() - t0)

    ours = load_file(os.path.join(a.dump, "step-0.safetensors"))
    # Format version 2 (`delta.{i}.{layer}.{linear}.{part}`); version 1 dumps had `{i}.{layer}.{part}`.
    at = f"delta.0.{layer}.mlp.down" if f"delta.0.{layer}.mlp.down.u" in ours else f"0.{layer}"
    u = ours[f"{at}.u"].flatten()
    v = ours[f"{at}.v"].flatten()
    # cos(u1 v1ᵀ, u2 v2ᵀ) = cos(u1, u2) · cos(v1, v2) for rank-one matrices.
    cos_delta = cosine(u, out["u"]) * cosine(v, out["v"])
    report = {
        "cosine_delta": cos_delta,
        "cosine_u": cosine(u, out["u"]),
        "cosine_v": cosine(v, out["v"]),
        "norm_ratio": float(u.norm() * v.norm() / (out["u"].norm() * out["v"].norm())),
        "reference_seconds": times,
        "reference_median_seconds": statistics.median(times),
        "reference_steps": len(out["steps"]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(json.dumps(report, indent=1))
    if a.out:
        fixture = {
            "about": "scripts/rome_reference.py: an independent PyTorch ROME on the default model "
            "with emend's templates and statistics; tests/rome_reference.rs checks emend against it",
            "request": req,
            "hparams": hp,
            "templates": templates,
            "stats": info["stats"],
            "reference": {k: [round(x, 7) for x in out[k].tolist()] for k in ("u", "v", "k_star", "v_star")},
            "reference_steps": out["steps"],
            "report": report,
        }
        with open(a.out, "w") as f:
            json.dump(fixture, f)
            f.write("\n")


if __name__ == "__main__":
    main()
