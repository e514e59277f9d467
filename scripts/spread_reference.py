#!/usr/bin/env python3
"""An independent PyTorch MEMIT-family edit (PMET, AlphaEdit, MEMIT) on the default model, to
cross-check emend's Rust deltas.

Written from the papers' equations (MEMIT: Meng et al. 2023, eq. 14-15; PMET: Li et al. 2024,
with EasyEdit's 1/sqrt(layers left) share; AlphaEdit: Fang et al. 2025, eq. 12), on HF
transformers (GGUF dequantised to f32, CPU) with emend's inputs from `emend edit --dump DIR`:
the request, hyper-parameters, context templates and the key statistics files. For one request:

    z*  at the last layer (MEMIT, AlphaEdit: the residual leaving the block; PMET: the
        attention and MLP outputs optimised together, the MLP's kept), with rome_reference.py's
        optimiser (Adam on deltas added at the subject's last token, NLL over the templates, KL
        on "{subject} is a", decay |d|/|v|^2 per site, clamp, stop at NLL < 5e-2);
    then lowest layer first, on the model with the lower layers already updated:
        k   = mean over templates of the down projection's input at the subject's last token,
        r   = (z* - z) * share, z read on the plain prompt (share 1/left, PMET 1/sqrt(left)),
        X   = (lam C + k k^T)^-1 k                           (MEMIT, PMET; direct solve),
              (P k k^T + l2 I)^-1 P k, P = U0 U0^T           (AlphaEdit; U0: eigenvectors of C
                                                              with eigenvalues < threshold),
        dW  = r X^T.
It compares each layer's dW with emend's (cosine of the matrices) and writes the fixture
`tests/spread_reference.rs` checks emend against. Run from the repository root:

    ./target/debug/emend edit --method pmet --file tests/fixtures/rome_request.json \
        --templates T.json --hparams '{"mom2_samples":400}' --dump /tmp/pmet-dump
    ~/.cache/emend-peers/venv/bin/python scripts/spread_reference.py \
        --gguf ~/.cache/emend/models/SmolLM2-135M-Instruct.Q4_1.gguf --dump /tmp/pmet-dump \
        --out tests/fixtures/spread_reference_pmet.safetensors
"""
import argparse
import json
import os

import torch
import transformers
from safetensors.torch import load_file, save_file

from reference_tokenizer import smollm_tokenizer_from_gguf
from rome_reference import batch, continuation, cosine, locate


def read_at(model, module, ids, mask, at, output=True):
    """A module's output (or input) at (row, position) pairs."""
    got = {}

    def hook(_m, inp, out):
        x = out if output else inp[0]
        x = x[0] if isinstance(x, tuple) else x
        got["x"] = torch.stack([x[r, p] for r, p in at])

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        h.remove()
    return got["x"]


def site_module(model, layer, kind):
    blk = model.model.layers[layer]
    return {"residual": blk, "attn.out": blk.self_attn.o_proj, "mlp.out": blk.mlp.down_proj}[kind]


def optimise(model, tok, req, templates, layer, kinds, hp):
    """z* at `layer` for each site kind, optimised together; the values and the curve."""
    prompt, subject = req["prompt"], req["subject"]
    target_text = " " + req["target_new"].strip()
    pad = tok.token_to_id("<|im_end|>")
    located = [locate(tok, c, prompt, subject) for c in templates]
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
    mods = [site_module(model, layer, k) for k in kinds]
    init = [read_at(model, m, ids, mask, [(0, lookups[0])])[0] for m in mods]
    d = model.config.hidden_size
    deltas = [torch.zeros(d, requires_grad=True) for _ in kinds]

    def adder(delta):
        def add(_m, _inp, out):
            if isinstance(out, tuple):
                h = out[0].clone()
                for r, p in enumerate(lookups):
                    h[r, p] = h[r, p] + delta
                return (h,) + tuple(out[1:])
            out = out.clone()
            for r, p in enumerate(lookups):
                out[r, p] = out[r, p] + delta
            return out

        return add

    hooks = [m.register_forward_hook(adder(dl)) for m, dl in zip(mods, deltas)]
    opt = torch.optim.Adam(deltas, lr=hp["v_lr"])
    tr = torch.tensor([t[0] for t in terms])
    tp = torch.tensor([t[1] for t in terms])
    tt = torch.tensor([t[2] for t in terms])
    kl_init, curve = None, []
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
            loss = nll + hp["kl_factor"] * kl
            if step > 0:
                for dl, v in zip(deltas, init):
                    loss = loss + hp["v_weight_decay"] * dl.norm() / v.norm() ** 2
            curve.append({"nll": nll.item(), "loss": loss.item()})
            if nll.item() < 5e-2 or step + 1 == hp["v_steps"]:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                for dl, v in zip(deltas, init):
                    mx = hp["clamp_norm_factor"] * v.norm()
                    n = dl.norm()
                    if n > mx:
                        dl.mul_(mx / n)
    finally:
        for h in hooks:
            h.remove()
    return [v + dl.detach() for v, dl in zip(init, deltas)], curve


def mean_key(model, tok, req, templates, layer):
    pad = tok.token_to_id("<|im_end|>")
    located = [locate(tok, c, req["prompt"], req["subject"]) for c in templates]
    ids, mask = batch([l[0] for l in located], pad)
    down = model.model.layers[layer].mlp.down_proj
    return read_at(model, down, ids, mask, [(r, l[1]) for r, l in enumerate(located)], output=False).mean(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--dump", required=True, help="the directory `emend edit --dump` wrote")
    ap.add_argument("--out", help="fixture to write (safetensors; the report beside it as .json)")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    info = json.load(open(os.path.join(a.dump, "edit.json")))
    method, req, hp, templates = info["method"], info["request"], info["hparams"], info["templates"]
    layers = hp["layers"]
    d, fname = os.path.split(os.path.abspath(a.gguf))
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=fname, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = smollm_tokenizer_from_gguf(a.gguf)
    covs = {}
    for layer, f in zip(layers, info["stats_files"]):
        covs[layer] = load_file(f)["mom2"].double()

    z_layer = layers[-1]
    kinds = ["attn.out", "mlp.out"] if method == "pmet" else ["residual"]
    written = "mlp.out" if method == "pmet" else "residual"
    zs, curve = optimise(model, tok, req, templates, z_layer, kinds, hp)
    z_star = zs[kinds.index(written)]
    plain_ids, plain_last = locate(tok, "{}", req["prompt"], req["subject"])
    pad = tok.token_to_id("<|im_end|>")
    p_ids, p_mask = batch([plain_ids], pad)
    originals, ours, report = {}, load_file(os.path.join(a.dump, "step-0.safetensors")), {}
    fixture = {}
    try:
        for i, layer in enumerate(layers):
            left = len(layers) - i
            k = mean_key(model, tok, req, templates, layer).double()
            z = read_at(model, site_module(model, z_layer, written), p_ids, p_mask, [(0, plain_last)])[0]
            share = 1 / left**0.5 if method == "pmet" else 1 / left
            r = ((z_star - z) * share).double()
            c = covs[layer]
            n = c.shape[0]
            if method == "alphaedit":
                evals, evecs = torch.linalg.eigh(c)
                u0 = evecs[:, evals < hp["nullspace_threshold"]]
                p = u0 @ u0.T
                x = torch.linalg.solve(p @ torch.outer(k, k) + hp["l2"] * torch.eye(n, dtype=torch.float64), p @ k)
            else:
                # emend's ridge on C: 1e-6 of the mean diagonal.
                c = c + torch.eye(n, dtype=torch.float64) * max(1e-6 * c.diagonal().mean().item(), 1e-12)
                x = torch.linalg.solve(hp["mom2_update_weight"] * c + torch.outer(k, k), k)
            w = model.model.layers[layer].mlp.down_proj.weight
            originals[layer] = w.detach().clone()
            with torch.no_grad():
                w += torch.outer(r, x).float()
            u_e = ours[f"delta.{i}.{layer}.mlp.down.u"].flatten().double()
            v_e = ours[f"delta.{i}.{layer}.mlp.down.v"].flatten().double()
            report[str(layer)] = {
                "cosine": cosine(u_e, r) * cosine(v_e, x),
                "norm_ratio": float(u_e.norm() * v_e.norm() / (r.norm() * x.norm())),
            }
            fixture[f"{layer}.u"] = r.float().contiguous()
            fixture[f"{layer}.v"] = x.float().contiguous()
    finally:
        with torch.no_grad():
            for layer, w0 in originals.items():
                model.model.layers[layer].mlp.down_proj.weight.copy_(w0)
    out = {
        "method": method,
        "layers": report,
        "min_cosine": min(v["cosine"] for v in report.values()),
        "reference_steps": len(curve),
        "z_star_norm": float(z_star.norm()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(json.dumps(out, indent=1))
    if a.out:
        save_file(fixture, a.out)
        meta = {
            "about": f"scripts/spread_reference.py: an independent PyTorch {method} on the default "
            "model with emend's templates and statistics; tests/spread_reference.rs checks emend against it",
            "request": req,
            "hparams": hp,
            "templates": templates,
            "report": out,
        }
        with open(a.out.removesuffix(".safetensors") + ".json", "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
