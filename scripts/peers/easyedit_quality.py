#!/usr/bin/env python3
"""EasyEdit's own ROME / MEMIT / PMET / AlphaEdit / KN / FT-M / GRACE / WISE on the CounterFact records emend
benchmarks, each record edited alone on the unedited model; prints (and writes with --out) the
JSON report that `emend bench-quality --peer FILE` reads.

    python easyedit_quality.py --method KN --n 50 --out /tmp/easyedit-quality/kn.json
    python easyedit_quality.py --method PMET --n 10 --out /tmp/easyedit-quality/pmet.json
    python easyedit_quality.py --method AlphaEdit --n 10 --out /tmp/easyedit-quality/alphaedit.json
    python easyedit_quality.py --method GRACE --n 50 --out /tmp/easyedit-quality/grace.json
    python easyedit_quality.py --method WISE --n 10 --out /tmp/easyedit-quality/wise.json

Reuses the shared driver /work/shared/peers/easyeditor_edit.py (imported, not copied): the
"llama-<dir>" symlink that sends BaseEditor down its llama branch, use_local_corpus (EasyEdit's
layer_stats reads the local Wikipedia corpus instead of the Hub), build_inputs (EasyEdit's edit()
arguments from the flattened counterfact-edit.json), the metric averaging.

One fresh model per edit: BaseEditor.edit(..., sequential_edit=False). In
easyeditor/editors/editor.py (edit_requests) every request is applied with
apply_algo(copy=False, return_orig_weights=True) and, after its post-edit evaluation,
editors/utils.py restore_after_edit(editor, edited_model, weights_copy) undoes it:
  * ROME, MEMIT, PMET, AlphaEdit, FT: weights_copy is {parameter name: clone of the weights
    before the update}, copied back into editor.model with copy_to_param;
  * KN (in CALLABLE_RESTORE_ALGS): weights_copy is the unpatch_fn of
    KnowledgeNeurons.modify_weights, which writes back the saved down_proj columns.
The pre-edit metrics of all records are computed first, on the unedited model. This driver also
checks it: before every apply_algo call (and once after the last edit) it compares every
parameter and the module tree with a snapshot of the unedited model ("restore_check").
AlphaEdit keeps a module-level key cache (cache_c, the keys of earlier edits that later ones must
preserve) that restore_after_edit does not touch; the driver passes EasyEdit's own
reset_cache=True to every AlphaEdit call so that each edit starts from an empty cache, as a fresh
process would.

Covariance (ROME with mom2_adjustment, MEMIT, PMET, AlphaEdit): by default (--stats-windows 128)
the cache files that easyedit_stats.py --windows 128 writes: EasyEdit's SecondMoment of the
down_proj input over emend's sample (the first mom2_n_samples 128-token windows of the local
Wikipedia extract). --stats-windows 0 lets EasyEdit's layer_stats sample whole articles instead.

    python easyedit_stats.py --windows 128 --layers 3,4,5,6,7 --n-samples 1000   # once, ~4 min

PMET: EasyEdit's BaseEditor leaves PMET on left padding for llama-named models while its
compute_zs assumes right padding (NaN update, see the report notes); --padding-side right
overrides that from the driver.

Edit time: wall seconds of each apply_algo call (the algorithm alone, not EasyEdit's pre/post
evaluation); edit_s_median leaves out the first call (context templates, covariance loading,
AlphaEdit's null-space projection).
"""
import argparse
import contextlib
import hashlib
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_PEERS = os.environ.get("SHARED_PEERS") or os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "peers"))
sys.path.insert(0, SHARED_PEERS)
import easyeditor_edit as drv  # noqa: E402  (sets HF_*_OFFLINE=1 on import)

CACHE = drv.CACHE
DEFAULT_RECORDS = os.path.normpath(os.path.join(SHARED_PEERS, "..", "data", "counterfact", "counterfact-edit.json"))

# method -> (EasyEdit hparams class, default YAML, emend's method name, needs covariance)
METHODS = {
    "ROME": ("ROMEHyperParams", os.path.join(HERE, "hparams", "ROME-smollm2-135m.yaml"), "rome", True),
    "MEMIT": ("MEMITHyperParams", os.path.join(HERE, "hparams", "MEMIT-smollm2-135m.yaml"), "memit", True),
    "PMET": ("PMETHyperParams", os.path.join(HERE, "hparams", "PMET-smollm2-135m.yaml"), "pmet", True),
    "AlphaEdit": ("AlphaEditHyperParams", os.path.join(HERE, "hparams", "AlphaEdit-smollm2-135m.yaml"), "alphaedit", True),
    "KN": ("KNHyperParams", os.path.join(HERE, "hparams", "KN-smollm2-135m.yaml"), "kn", False),
    "FT-M": ("FTHyperParams", os.path.join(HERE, "hparams", "FT-M-smollm2-135m.yaml"), "ft-m", False),
    "GRACE": ("GraceHyperParams", os.path.join(HERE, "hparams", "GRACE-smollm2-135m.yaml"), "grace", False),
    "WISE": ("WISEHyperParams", os.path.join(HERE, "hparams", "WISE-smollm2-135m.yaml"), "wise", False),
}


def wise_loc_prompts(records_path, n):
    """WISE's out-of-scope training prompts as EasyEdit's examples/run_wise_editing.py makes them:
    the train split's locality prompt and answer, one per edit (CounterFact's counterfact-train.json
    beside the records)."""
    train = json.load(open(os.path.join(os.path.dirname(records_path), "counterfact-train.json")))[:n]
    return [r["locality_prompt"] + " " + r["locality_ground_truth"] for r in train]


def record_grace_decisions(decisions):
    """Wraps EasyEdit's GRACEAdapter.forward to log, for each prompt the evaluation generates from,
    whether the codebook hit at the prompt's last token (the first forward of GRACE.generate)."""
    from easyeditor.models.grace import GRACE as grace_mod

    adapter = grace_mod.GRACEAdapter
    orig_forward = adapter.forward

    def forward(self, *args):
        first = (not self.training) and self.key_id == -1 and "keys" in self.__dict__
        out = orig_forward(self, *args)
        if first and args[0].shape[0] == 1:
            query = args[0][:, args[0].shape[1] - 1, :]
            dists = grace_mod.cdist_float32(self.keys, query).view(-1)
            d, i = dists.min(0)
            decisions.append({"hit": bool(d <= self.epsilons[i].view(-1)[0]), "distance": float(d),
                              "entry": int(i), "tokens": int(args[0].shape[1])})
        return out

    adapter.forward = forward


def weights_snapshot(model):
    import torch

    with torch.no_grad():
        return {k: v.detach().clone() for k, v in model.named_parameters()}


def diff_from(model, snap):
    """(max |w - w0| over all parameters, names of parameters that differ, module tree unchanged?)"""
    import torch

    worst, changed = 0.0, []
    with torch.no_grad():
        params = dict(model.named_parameters())
        if set(params) != set(snap):
            return float("inf"), sorted(set(params) ^ set(snap)), False
        for k, v in params.items():
            if torch.equal(v.detach(), snap[k]):
                continue
            changed.append(k)
            d = (v.detach() - snap[k]).abs()
            # NaN/inf weights (a failed update) count as an infinite difference
            worst = max(worst, float("inf") if not torch.isfinite(d).all() else float(d.max()))
    return worst, changed, True


def module_tree(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, choices=list(METHODS))
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--records", default=DEFAULT_RECORDS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the JSON report here (it is also the last stdout line)")
    ap.add_argument("--metrics-out", default=None, help="EasyEdit's full per-record metrics (JSON)")
    ap.add_argument("--hparams", default=None, help="YAML; default hparams/<METHOD>-smollm2-135m.yaml beside this script")
    ap.add_argument("--model", default=os.environ.get("PEERS_MODEL") or os.path.join(CACHE, "smollm2-135m-instruct-hf"))
    ap.add_argument("--easyedit", default=os.environ.get("EASYEDIT_DIR") or os.path.join(CACHE, "EasyEdit"))
    ap.add_argument("--mom2-corpus", default=os.path.join(CACHE, "corpus", "wikipedia-aa.jsonl"))
    ap.add_argument("--stats-dir", default=os.path.join(CACHE, "stats"))
    ap.add_argument("--stats-windows", type=int, default=128,
                    help="read the covariance that easyedit_stats.py --windows N wrote (emend's statistic: the first "
                         "mom2_n_samples windows of N tokens of the corpus) from <stats-dir>/<corpus>-wN/; 0: EasyEdit's "
                         "own sampling of whole articles (<stats-dir>/<corpus>/, computed by layer_stats if missing)")
    ap.add_argument("--padding-side", choices=["left", "right"], default=None,
                    help="override the tokenizer padding side BaseEditor chose (default: EasyEdit's choice)")
    ap.add_argument("--no-restore-check", action="store_true", help="skip the per-edit weight comparison")
    ap.add_argument("--keep-workdir", action="store_true")
    args = ap.parse_args()

    method = args.method
    cls_name, default_yaml, emend_name, needs_cov = METHODS[method]
    hparams_path = os.path.abspath(args.hparams or default_yaml)
    model_dir = os.path.abspath(args.model)
    records_path = os.path.abspath(args.records)
    if not os.path.isdir(os.path.join(args.easyedit, "easyeditor")):
        raise SystemExit(f"EasyEdit source not found at {args.easyedit}")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise SystemExit(f"model not found at {model_dir}")

    t_start = time.perf_counter()
    load1 = os.getloadavg()[0]
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.abspath(args.easyedit))
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        import easyeditor
        from easyeditor import BaseEditor

    hparams = getattr(easyeditor, cls_name).from_hparams(hparams_path)
    records = drv.load_records(records_path, args.n)
    layout, inputs = drv.build_inputs(records)
    if method == "WISE":
        inputs["loc_prompts"] = wise_loc_prompts(records_path, len(records))
    commit_file = os.path.join(args.easyedit, ".easyedit-commit")
    commit = open(commit_file).read().strip() if os.path.exists(commit_file) else None

    workdir = tempfile.mkdtemp(prefix="easyedit-quality-")
    link_name = "llama-" + os.path.basename(os.path.normpath(model_dir))
    for bad in ("t5", "gpt", "chatglm"):  # substrings that would send BaseEditor down another branch
        if bad in link_name.lower():
            link_name = "llama-smollm"
    os.symlink(model_dir, os.path.join(workdir, link_name))
    old_cwd = os.getcwd()
    os.chdir(workdir)
    hparams.model_name = link_name
    hparams.device = "cpu"

    notes = []
    corpus_info = None
    p_cache = None
    if needs_cov and (method != "ROME" or getattr(hparams, "mom2_adjustment", False)):
        corpus_name = os.path.splitext(os.path.basename(args.mom2_corpus))[0]
        if args.stats_windows:
            corpus_name += f"-w{args.stats_windows}"
        hparams.mom2_adjustment = True
        hparams.stats_dir = os.path.join(os.path.abspath(args.stats_dir), corpus_name)
        if args.stats_windows:
            want = [os.path.join(hparams.stats_dir, link_name, f"{hparams.mom2_dataset}_stats",
                                 f"{hparams.rewrite_module_tmp.format(l)}_{hparams.mom2_dtype}_mom2_{hparams.mom2_n_samples}.npz")
                    for l in hparams.layers]
            missing = [w for w in want if not os.path.exists(w)]
            if missing:
                raise SystemExit(f"covariance files missing (run easyedit_stats.py --windows {args.stats_windows} "
                                 f"--layers {','.join(map(str, hparams.layers))} --n-samples {hparams.mom2_n_samples}): {missing}")
        with contextlib.redirect_stdout(sys.stderr):
            n_docs = drv.use_local_corpus(args.mom2_corpus)
        corpus_info = {"corpus": os.path.basename(args.mom2_corpus),
                       "corpus_sha256": drv.sha256_of(args.mom2_corpus)[:16],
                       "corpus_documents": n_docs, "mom2_n_samples": hparams.mom2_n_samples}
        corpus_info["stats_dir"] = corpus_name
        if args.stats_windows:
            notes.append(f"covariance: EasyEdit's SecondMoment of the down_proj input over emend's sample, the first "
                         f"{hparams.mom2_n_samples} windows of {args.stats_windows} tokens of the local Wikipedia extract "
                         f"{os.path.basename(args.mom2_corpus)} in file order (precomputed by easyedit_stats.py --windows; "
                         f"the extract drops article titles, emend's reader keeps them, so the windows are not "
                         f"identical); EasyEdit's layer_stats would sample {hparams.mom2_n_samples} whole articles "
                         f"(~0.5 M tokens here; EasyEdit's configs: 100,000 articles of wikimedia/wikipedia)")
        else:
            notes.append(f"covariance: EasyEdit's layer_stats (SecondMoment of the down_proj input) over "
                         f"{hparams.mom2_n_samples} whole articles (truncated at 8192 tokens) sampled with seed 1 from "
                         f"the local {n_docs}-article Wikipedia extract {os.path.basename(args.mom2_corpus)} "
                         f"(EasyEdit: 100,000 articles of wikimedia/wikipedia 20231101.en; emend: 1,000 windows of "
                         f"128 tokens)")
    elif hasattr(hparams, "mom2_adjustment"):
        hparams.mom2_adjustment = False
        hparams.stats_dir = os.path.join(os.path.abspath(args.stats_dir), "unused")
    if method == "AlphaEdit":
        tag = hashlib.sha256(json.dumps([list(hparams.layers), hparams.nullspace_threshold, hparams.mom2_n_samples,
                                         hparams.rewrite_module_tmp]).encode()).hexdigest()[:12]
        p_cache = os.path.join(hparams.stats_dir, link_name, f"alphaedit_P_{tag}.pt")
        if os.path.exists(p_cache):
            hparams.P_loc = p_cache
        else:
            # EasyEdit computes P when P_loc is missing and saves it as ./null_space_project.pt
            # (whatever P_loc says); pointing P_loc there makes later calls load it instead of
            # recomputing it on every call. Copied to p_cache afterwards.
            hparams.P_loc = os.path.join(workdir, "null_space_project.pt")

    grace_decisions = []
    if method == "GRACE":
        record_grace_decisions(grace_decisions)
    restore_log = []   # per apply_algo call: state of the model just before the call
    edit_times, edit_cpu, written = [], [], []
    failure = None
    metrics = []
    load_s = wall_s = None
    final_check = None
    padding_side = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            t0 = time.perf_counter()
            editor = BaseEditor.from_hparams(hparams)
            load_s = time.perf_counter() - t0
            if args.padding_side:
                editor.tok.padding_side = args.padding_side
            padding_side = editor.tok.padding_side
            snap = None if args.no_restore_check else weights_snapshot(editor.model)
            tree0 = module_tree(editor.model)
            orig_apply = editor.apply_algo

            def timed_apply(*a, **k):
                if snap is not None:
                    worst, changed, same_params = diff_from(editor.model, snap)
                    restore_log.append({"call": len(edit_times), "max_abs_diff_before": worst,
                                        "params_differing_before": changed[:8],
                                        "module_tree_unchanged": same_params and module_tree(editor.model) == tree0})
                if method == "AlphaEdit":
                    k["reset_cache"] = True  # EasyEdit's own switch: empty key cache per edit
                t, c = time.perf_counter(), time.process_time()
                out = orig_apply(*a, **k)
                edit_times.append(time.perf_counter() - t)
                edit_cpu.append(time.process_time() - c)
                if snap is not None:
                    worst, changed, _ = diff_from(editor.model, snap)
                    written.append({"call": len(edit_times) - 1, "max_abs_update": worst, "params_written": changed})
                print(f"[peers] edit {len(edit_times)}/{args.n}: apply_algo {edit_times[-1]:.2f} s", file=sys.stderr, flush=True)
                return out

            editor.apply_algo = timed_apply
            t0 = time.perf_counter()
            metrics, _, _ = editor.edit(sequential_edit=False, **inputs, test_generation=False)
            wall_s = time.perf_counter() - t0
            if snap is not None:
                worst, changed, same_params = diff_from(editor.model, snap)
                final_check = {"max_abs_diff_after_last_restore": worst, "params_differing": changed[:8],
                               "module_tree_unchanged": same_params and module_tree(editor.model) == tree0}
    except Exception as e:  # EasyEdit failure: report it instead of crashing without a report
        failure = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                   "edits_done": len(edit_times)}
        print(failure["traceback"], file=sys.stderr)
    finally:
        if method == "AlphaEdit" and p_cache and not os.path.exists(p_cache):
            made = os.path.join(workdir, "null_space_project.pt")
            if os.path.exists(made):
                os.makedirs(os.path.dirname(p_cache), exist_ok=True)
                shutil.copy(made, p_cache)
        os.chdir(old_cwd)
        if args.keep_workdir:
            print(f"[peers] EasyEdit working directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if args.metrics_out and metrics:
        with open(args.metrics_out, "w", encoding="utf-8") as f:
            json.dump({"metrics": metrics, "written": written, "restore_log": restore_log}, f, indent=1, default=str)
            # (per-record file: may hold NaN for a failed edit; Python's json reads it back)

    # Restoration summary.
    restore_check = None
    if restore_log:
        bad = [r for r in restore_log if r["max_abs_diff_before"] != 0.0 or not r["module_tree_unchanged"]]
        if final_check and (final_check["max_abs_diff_after_last_restore"] != 0.0 or not final_check["module_tree_unchanged"]):
            bad.append({"call": "after last", **final_check})
        restore_check = {
            "calls_checked": len(restore_log),
            "all_started_from_unedited_model": not bad,
            "failures": bad[:5],
            "after_last_restore": final_check,
            "params_written_per_edit": sorted({p for w in written for p in w["params_written"]}),
            "edits_that_changed_no_weight": [w["call"] for w in written if not w["params_written"]],
            "edits_that_wrote_nan_or_inf": [w["call"] for w in written if w["max_abs_update"] == float("inf")],
        }
        if bad:
            notes.append(f"restore check FAILED for {len(bad)} call(s): an edit did not start from the unedited model")

    # Method-specific notes (what differs from emend's protocol).
    if method == "KN":
        notes.append("KN (EasyEdit knowledge_neurons): the attribution (integrated gradients over gate_proj outputs, "
                     "30 layers, steps=1 so the only point is the zero baseline) uses ground_truth tokenised by "
                     "tok.encode(ground_truth) and the edit adds the embedding of tok.encode(target_new): both WITHOUT a "
                     "leading space (e.g. 'English' not ' English'), while the evaluation scores prompt + ' ' + target; "
                     "for SmolLM2's byte-level BPE these are different tokens")
        notes.append("KN's edit (EasyEdit modify_weights, mode 'edit') changes the down_proj columns of the selected "
                     "neurons: minus 2x the embedding of the pre-edit argmax token (1x each for a multi-token target), "
                     "plus 1x the embedding of each target_new token")
    if method == "PMET":
        notes.append("PMET (EasyEdit pmet_main.execute_pmet) prefixes target_new with a space only when the model "
                     "name contains 'gpt'; for this llama-named model the z optimisation targets tok.encode('English') "
                     "(no leading space) while the evaluation scores prompt + ' ' + target")
        notes.append("PMET's z optimisation in EasyEdit also optimises an attention delta; with "
                     "rewrite_module_tmps = [mlp.down_proj] only the MLP update is written (EasyEdit's llama configs)")
    if method in ("PMET", "KN", "FT-M"):
        notes.append(f"tokenizer padding side during the edit: {padding_side} (BaseEditor sets right padding only for "
                     "ROME/MEMIT/EMMET/EAMET/R-ROME/AlphaEdit/CORE/SPHERE on llama-named models; PMET's compute_zs "
                     "places targets and lookup indices as if padding were on the right)")
    if args.padding_side:
        notes.append(f"tokenizer padding side set to {args.padding_side} by the driver (--padding-side), overriding "
                     "BaseEditor's choice"
                     + (": BaseEditor leaves PMET on left padding for this llama-named model, and EasyEdit's PMET "
                        "(compute_zs, rome/repr_tools) places lookup indices and targets as if padding were on the "
                        "right, so the bare '{}' template (the shortest prompt) reads a pad position: attention init "
                        "norm 0, weight decay 0/0 = NaN, NaN update in every edited layer (run without the override: "
                        "pmet-asshipped-n1.json)" if method == "PMET" else ""))
    if method == "AlphaEdit":
        notes.append("AlphaEdit: null-space projection P computed by EasyEdit's get_project from the local-corpus "
                     "covariance (threshold nullspace_threshold on its singular values), cached as "
                     + os.path.basename(p_cache or "?") + "; reset_cache=True on every call so no earlier edit's keys "
                     "enter the update (each edit alone)")
    if method == "GRACE":
        notes.append("GRACE (EasyEdit GRACE.py): evaluated by EasyEdit's vanilla generation (greedy generate of the "
                     "target's length, token match) as its evaluate.py does for GRACE, where emend teacher-forces; at "
                     "generation GRACE decides at the prompt's last token, then at each new token, as emend's "
                     "per-position rule does; EasyEdit's label_match compares the means of the label tensors")
        notes.append("GRACE adds a `values` parameter to the wrapped layer during the edit, so the per-edit weight "
                     "comparison lists every edit under edits_that_wrote_nan_or_inf (a changed parameter set counts as "
                     "an infinite difference); restore_check.all_started_from_unedited_model is what says each edit "
                     "started from the unedited model")
        notes.append("the evaluation encodes target_new without a leading space (tok.encode(target_new)) and compares "
                     "it with the generated tokens, which for SmolLM2's byte-level BPE are ' ' + target: its rewrite "
                     "accuracy counts only targets whose first token happens to agree")
    if method == "ROME" and not getattr(hparams, "mom2_adjustment", False):
        notes.append("ROME without covariance (mom2_adjustment false)")
    if method in ("ROME", "MEMIT", "PMET", "AlphaEdit"):
        notes.append("context templates: EasyEdit's own (generated once per process by the unedited model); emend uses 5")
    notes.append("metrics: EasyEdit compute_edit_quality (teacher-forced token accuracy of ' ' + target_new; "
                 "locality = share of post-edit argmax tokens equal to the pre-edit ones on locality_prompt "
                 "teacher-forced with ' ' + locality_ground_truth); success is not computed by EasyEdit")
    if args.threads == 1:
        notes.append("torch threads 1, nice 10, on a shared 2-core machine: wall times are inflated by other jobs")

    tail = edit_times[1:] if len(edit_times) > 1 else edit_times
    result = {
        "peer": "EasyEdit",
        "easyedit_commit": commit,
        "method": emend_name,
        "easyedit_method": method,
        "records": args.n,
        "records_file": os.path.basename(records_path),
        "records_layout": layout,
        "edits_done": len(edit_times),
        "reliability": drv.mean_metric(metrics, "post", "rewrite_acc") if not failure else None,
        "generalization": drv.mean_metric(metrics, "post", "rephrase_acc") if not failure else None,
        "locality": drv.mean_locality(metrics, "post") if not failure else None,
        "success": None,
        "pre": {"reliability": drv.mean_metric(metrics, "pre", "rewrite_acc") if not failure else None,
                "generalization": drv.mean_metric(metrics, "pre", "rephrase_acc") if not failure else None},
        "edit_s_median": round(statistics.median(tail), 3) if tail else None,
        "edit_s_all": [round(x, 3) for x in edit_times],
        "edit_cpu_s_all": [round(x, 3) for x in edit_cpu],
        "first_edit_s": round(edit_times[0], 3) if edit_times else None,
        "load_s": round(load_s, 2) if load_s is not None else None,
        "wall_s": round(wall_s, 2) if wall_s is not None else None,
        "total_s": round(time.perf_counter() - t_start, 2),
        "threads": torch.get_num_threads(),
        "hparams": os.path.basename(hparams_path),
        "layers": list(getattr(hparams, "layers", []) or []),
        "padding_side": padding_side,
        "mom2_source": corpus_info,
        "restore_check": restore_check,
        "grace_decisions": grace_decisions or None,
        "failure": failure,
        "model": os.path.basename(model_dir),
        "torch": torch.__version__,
        "loadavg_start_end": [round(load1, 2), round(os.getloadavg()[0], 2)],
        "notes": notes,
    }
    def finite(x):  # the report must be strict JSON (serde_json rejects NaN / Infinity)
        if isinstance(x, float) and x != x or x in (float("inf"), float("-inf")):
            return str(x)
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list):
            return [finite(v) for v in x]
        return x

    line = json.dumps(finite(result), allow_nan=False)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(line + "\n")
    print(line, file=real_stdout, flush=True)
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
