#!/usr/bin/env python3
"""Pre-compute EasyEdit's covariance ("mom2") cache files for several layers in ONE pass.

EasyEdit's layer_stats (easyeditor/models/rome/layer_stats.py) computes the second moment
of one module's input per call, running the model up to that layer (Trace(stop=True)) over
`mom2_n_samples` documents; PMET and AlphaEdit call it once per edited layer, so five layers
cost five passes over the corpus. This script produces the same cache files with a single
pass: the same EasyEdit pieces (TokenizedDataset with maxlen = max_position_embeddings,
tally/make_loader with batch_size 100, random_sample=1 (seed 1), length_collation(3 * npos),
flatten_masked_batch over the module INPUT, runningstats.SecondMoment in `mom2_dtype`,
save_cached_state with {"sample_size": n}), but with nethook.TraceDict over all layers at
once, stopping after the deepest one. The statistics are the same numbers EasyEdit's
layer_stats would compute (same documents, same batches, same forward up to each layer);
--check-layer-stats compares one layer against EasyEdit's own layer_stats on a few samples.

The file names are exactly layer_stats' own:
  <stats-dir>/<model_name>/<ds_name>_stats/<layer>_<precision>_mom2_<n>.npz
with model_name = model.config._name_or_path (the "llama-<dir>" symlink name the quality
driver gives BaseEditor), so EasyEdit finds them and skips its own computation.

    python easyedit_stats.py --layers 3,4,5,6,7 --n-samples 1000
"""
import argparse
import contextlib
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_PEERS = os.environ.get("SHARED_PEERS") or os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "peers"))
sys.path.insert(0, SHARED_PEERS)
import easyeditor_edit as drv  # noqa: E402  (the shared EasyEdit driver: corpus loader, defaults)

CACHE = drv.CACHE


def link_model(model_dir, workdir):
    """Same symlink name as easyedit_quality.py / easyeditor_edit.py give BaseEditor."""
    link_name = "llama-" + os.path.basename(os.path.normpath(model_dir))
    for bad in ("t5", "gpt", "chatglm"):
        if bad in link_name.lower():
            link_name = "llama-smollm"
    os.symlink(model_dir, os.path.join(workdir, link_name))
    return link_name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="3,4,5,6,7")
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--module-tmp", default="model.layers.{}.mlp.down_proj")
    ap.add_argument("--ds-name", default="wikipedia", help="the mom2_dataset key in the hparams")
    ap.add_argument("--precision", default="float32", help="mom2_dtype")
    ap.add_argument("--model", default=os.environ.get("PEERS_MODEL") or os.path.join(CACHE, "smollm2-135m-instruct-hf"))
    ap.add_argument("--easyedit", default=os.environ.get("EASYEDIT_DIR") or os.path.join(CACHE, "EasyEdit"))
    ap.add_argument("--mom2-corpus", default=os.path.join(CACHE, "corpus", "wikipedia-aa.jsonl"))
    ap.add_argument("--stats-dir", default=os.path.join(CACHE, "stats"),
                    help="parent; files go under <stats-dir>/<corpus name>/ as in the drivers")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", type=int, default=0,
                    help="instead of EasyEdit's sampling of whole articles, use emend's statistic: the first "
                         "--n-samples windows of WINDOWS tokens (windows under 8 tokens skipped) of the corpus "
                         "documents in file order, batched in runs of up to 16 equal-length windows (no padding); "
                         "written under <stats-dir>/<corpus name>-w<WINDOWS>/ with the file name EasyEdit's "
                         "layer_stats looks for")
    ap.add_argument("--check-layer-stats", action="store_true",
                    help="also run EasyEdit's own layer_stats for the first layer into a scratch dir and compare")
    args = ap.parse_args()

    layers = [int(x) for x in args.layers.split(",")]
    model_dir = os.path.abspath(args.model)
    corpus_name = os.path.splitext(os.path.basename(args.mom2_corpus))[0]
    if args.windows:
        corpus_name += f"-w{args.windows}"
    stats_dir = os.path.join(os.path.abspath(args.stats_dir), corpus_name)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.abspath(args.easyedit))
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        import importlib

        import easyeditor  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ls_mod = importlib.import_module("easyeditor.models.rome.layer_stats")
        tokds = importlib.import_module("easyeditor.models.rome.tok_dataset")
        rs = importlib.import_module("easyeditor.util.runningstats")
        nethook = importlib.import_module("easyeditor.util.nethook")
        drv.use_local_corpus(args.mom2_corpus)

    workdir = tempfile.mkdtemp(prefix="easyedit-stats-")
    link_name = link_model(model_dir, workdir)
    os.chdir(workdir)
    with contextlib.redirect_stdout(sys.stderr):
        model = AutoModelForCausalLM.from_pretrained(link_name, torch_dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(link_name)
        tok.pad_token_id = tok.eos_token_id
    model.eval()
    nethook.set_requires_grad(False, model)

    npos = model.config.max_position_embeddings
    batch_tokens = npos * 3
    model_name = model.config._name_or_path.rsplit("/")[-1]
    dtype = getattr(torch, args.precision)

    def fname(layer_name, n):
        return os.path.join(stats_dir, model_name, f"{args.ds_name}_stats",
                            f"{layer_name}_{args.precision}_mom2_{n}.npz")

    names = [args.module_tmp.format(l) for l in layers]
    todo = [n for n in names if not os.path.exists(fname(n, args.n_samples))]
    print(f"[stats] {len(names) - len(todo)} of {len(names)} cached; computing {todo} over "
          f"{args.n_samples} documents in one pass", file=sys.stderr)

    t0 = time.perf_counter()
    n_windows = n_tokens = None
    if todo and args.windows:
        # emend's key statistic (src/engine/editing/stats.rs compute()): texts in order, each cut
        # into consecutive windows of `windows` tokens (no special tokens), windows < 8 tokens
        # skipped, the first n_samples windows; sorted by length, batched in runs of <= 16 equal
        # lengths. The moment is EasyEdit's SecondMoment of the down_proj input.
        texts = ls_mod.load_dataset("wikimedia/wikipedia", "20231101.en")["train"]["text"]
        seqs = []
        for t in texts:
            ids = tok.encode(t, add_special_tokens=False)
            for i in range(0, len(ids), args.windows):
                w = ids[i:i + args.windows]
                if len(w) >= 8:
                    seqs.append(w)
                if len(seqs) >= args.n_samples:
                    break
            if len(seqs) >= args.n_samples:
                break
        seqs.sort(key=lambda s: -len(s))
        batches, i = [], 0
        while i < len(seqs):
            j = i + 1
            while j < len(seqs) and j - i < 16 and len(seqs[j]) == len(seqs[i]):
                j += 1
            batches.append(seqs[i:j])
            i = j
        stats = {n: rs.CombinedStat(mom2=rs.SecondMoment()) for n in todo}
        n_tok = 0
        with torch.no_grad():
            for bi, b in enumerate(batches):
                ids = torch.tensor(b)
                with nethook.TraceDict(model, todo, retain_input=True, retain_output=False, stop=True) as tr:
                    model(input_ids=ids, attention_mask=torch.ones_like(ids))
                for n in todo:
                    feats = tr[n].input.reshape(-1, tr[n].input.size(-1)).to(dtype=dtype)
                    stats[n].add(feats)
                n_tok += ids.numel()
                if bi % 10 == 9 or bi == len(batches) - 1:
                    print(f"[stats] batch {bi + 1}/{len(batches)}: {n_tok} tokens, {time.perf_counter() - t0:.0f} s",
                          file=sys.stderr, flush=True)
        for n in todo:
            stats[n].to_(device="cpu")
            rs.save_cached_state(fname(n, args.n_samples), stats[n], {"sample_size": args.n_samples})
            print(f"[stats] wrote {fname(n, args.n_samples)}", file=sys.stderr)
        n_windows, n_tokens = len(seqs), n_tok
    elif todo:
        raw = ls_mod.load_dataset("wikimedia/wikipedia", "20231101.en")["train"]
        ds = tokds.TokenizedDataset(raw, tok, maxlen=npos)
        stats = {n: rs.CombinedStat(mom2=rs.SecondMoment()) for n in todo}
        loader = rs.make_loader(ds, sample_size=args.n_samples, batch_size=100,
                                collate_fn=tokds.length_collation(batch_tokens), pin_memory=True,
                                random_sample=1, num_workers=2)
        n_tok = 0
        with torch.no_grad():
            for bi, batch_group in enumerate(loader):
                for batch in batch_group:
                    with nethook.TraceDict(model, todo, retain_input=True, retain_output=False, stop=True) as tr:
                        model(**batch)
                    for n in todo:
                        feats = tokds.flatten_masked_batch(tr[n].input, batch["attention_mask"]).to(dtype=dtype)
                        stats[n].add(feats)
                    n_tok += int(batch["attention_mask"].sum())
                print(f"[stats] batch group {bi + 1}: {n_tok} tokens, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
        for n in todo:
            stats[n].to_(device="cpu")
            rs.save_cached_state(fname(n, args.n_samples), stats[n], {"sample_size": args.n_samples})
            print(f"[stats] wrote {fname(n, args.n_samples)}", file=sys.stderr)
    compute_s = time.perf_counter() - t0

    check = None
    if args.check_layer_stats:
        # EasyEdit's own layer_stats on a small sample vs. this script's one-pass version.
        k = 20
        with contextlib.redirect_stdout(sys.stderr):
            ref = ls_mod.layer_stats(model, tok, names[0], os.path.join(workdir, "ref"), args.ds_name,
                                     to_collect=["mom2"], sample_size=k, precision=args.precision)
        raw = ls_mod.load_dataset("wikimedia/wikipedia", "20231101.en")["train"]
        ds = tokds.TokenizedDataset(raw, tok, maxlen=npos)
        mine = {n: rs.CombinedStat(mom2=rs.SecondMoment()) for n in names[:2]}
        loader = rs.make_loader(ds, sample_size=k, batch_size=100, collate_fn=tokds.length_collation(batch_tokens),
                                pin_memory=True, random_sample=1, num_workers=2)
        with torch.no_grad():
            for batch_group in loader:
                for batch in batch_group:
                    with nethook.TraceDict(model, names[:2], retain_input=True, retain_output=False, stop=True) as tr:
                        model(**batch)
                    for n in names[:2]:
                        mine[n].add(tokds.flatten_masked_batch(tr[n].input, batch["attention_mask"]).to(dtype=dtype))
        a = ref.mom2.moment().float()
        b = mine[names[0]].mom2.moment().float().cpu()
        check = {"layer": names[0], "samples": k, "count_ref": int(ref.mom2.count), "count_one_pass": int(mine[names[0]].mom2.count),
                 "max_abs_diff": float((a - b).abs().max()), "max_abs": float(a.abs().max())}
        print(f"[stats] check vs EasyEdit layer_stats: {check}", file=sys.stderr)

    import json

    print(json.dumps({"stats_dir": stats_dir, "model_name": model_name, "layers": names,
                      "n_samples": args.n_samples, "windows": args.windows or None, "n_windows": n_windows,
                      "n_tokens": n_tokens, "computed": todo, "compute_s": round(compute_s, 1),
                      "check": check}), file=real_stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
