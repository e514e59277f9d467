#!/usr/bin/env python3
"""Reference scores from the real lm-evaluation-harness (HF backend) on the default model.

Converts the default GGUF to a transformers directory (f32 weights; the tokenizer rebuilt from
the GGUF metadata, see DESIGN.md for why transformers' own conversion is wrong), then runs
lm-eval 0.4.13 on a fixed slice of each task (`PLAN`: the first documents, per subtask for MMLU
and BBH), with the same local task configs as scripts/eval_golden.py, and writes
tests/fixtures/eval/reference_scores.json: the aggregate metrics and, per document, what the
harness's model answered to every request (per-choice log-likelihoods, the rolling
log-likelihood of a page, the generated text and its filtered answers), which
tests/eval_reference.rs compares with emend's engine.

    /tmp/lmeval-venv/bin/pip install -r scripts/requirements-reference.txt
    /tmp/lmeval-venv/bin/python scripts/eval_reference.py --gguf PATH [--tasks gsm8k,bbh]

`--tasks` re-runs only those tasks and keeps the others already in the fixture.
"""
import argparse
import hashlib
import json
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import lm_eval  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from eval_golden import ROOT, local_tasks  # noqa: E402
from reference_tokenizer import smollm_tokenizer_from_gguf  # noqa: E402

# emend task -> documents (per subtask for the MMLU and BBH groups). Generation tasks are
# the slowest on the peer (greedy decoding up to 256 tokens), hence their shorter slices;
# hellaswag has only the hand-written 3-document file of tests/fixtures.
PLAN = {
    "lambada_openai": 50,
    "arc_easy": 50,
    "arc_challenge": 50,
    "piqa": 50,
    "sciq": 50,
    "hellaswag": 3,
    "commonsense_qa": 50,
    "truthfulqa_mc1": 50,
    "truthfulqa_mc2": 50,
    "toxigen": 20,
    "wikitext": 5,
    "mmlu": 1,
    "triviaqa": 50,
    "gsm8k": 10,
    "bbh": 1,
}


def hf_dir(gguf, out):
    d, f = os.path.split(os.path.abspath(gguf))
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=smollm_tokenizer_from_gguf(gguf),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tok.save_pretrained(out)
    # The golden check of DESIGN.md: digits split, no BOS.
    assert tok("The 2024 Eiffel Tower!")["input_ids"] == [504, 216, 34, 32, 34, 36, 414, 46682, 18669, 17]
    return out


def num(x):
    return float(x[0] if isinstance(x, (list, tuple)) else x)


def doc_record(kind, samples):
    """One document's answers from its logged samples (one sample per filter)."""
    s = samples[0]
    d = {"doc_id": s["doc_id"]}
    if kind in ("loglikelihood", "multiple_choice"):
        d["lls"] = [num(x[0]) for x in s["resps"]]
        d["is_greedy"] = [bool(x[0][1]) for x in s["resps"]]
        for m in ("acc", "acc_norm"):
            if m in s:
                d[m] = num(s[m])
    elif kind == "loglikelihood_rolling":
        d["ll"] = num(s["resps"][0][0])
    else:
        d["text"] = s["resps"][0][0]
        d["filtered"] = {x["filter"]: x["filtered_resps"][0] for x in samples}
        d["exact_match"] = {x["filter"]: num(x["exact_match"]) for x in samples}
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--tasks", default=",".join(PLAN), help="comma-separated emend task names")
    ap.add_argument("--shared", default=os.environ.get("EMEND_SHARED_DIR", str(ROOT.parent / "shared")))
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/eval/reference_scores.json"))
    args = ap.parse_args()
    wanted = args.tasks.split(",")
    unknown = [t for t in wanted if t not in PLAN]
    if unknown:
        sys.exit(f"unknown tasks {unknown}; known: {list(PLAN)}")
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="emend-ref-"))
    specs, ymls = local_tasks(args.shared, tmp)
    tm = TaskManager(include_path=str(ymls))
    lm = HFLM(pretrained=hf_dir(args.gguf, str(tmp / "hf")), dtype="float32", device="cpu", batch_size=1)
    sha = hashlib.sha256(pathlib.Path(args.gguf).read_bytes()).hexdigest()
    path = pathlib.Path(args.out)
    out = json.loads(path.read_text()) if path.exists() else {"tasks": {}}
    if out.get("model_sha256", sha) != sha:
        out["tasks"] = {}
    out.update({
        "_comment": "Made by scripts/eval_reference.py: lm-eval's HF backend (f32, CPU, batch 1) on "
        "the default model, the first `limit` documents of each task (per subject for MMLU and BBH), "
        "local data files, lm-eval's own task configs. Per document: `lls`/`is_greedy` per choice "
        "(loglikelihood tasks), `ll` (rolling), or the generated `text` with its `filtered` answer "
        "and `exact_match` per filter (generation tasks). Group metrics (mmlu, bbh) are the mean "
        "over all their documents.",
        "lm_eval_version": lm_eval.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "model_sha256": sha,
    })
    out.pop("limit", None)
    for task in wanted:
        names = [n for n, s in specs.items() if s["emend"] == task]
        fewshot = {specs[n]["num_fewshot"] for n in names} - {None}
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=[f"golden_{n}" for n in names],
            task_manager=tm,
            limit=PLAN[task],
            num_fewshot=fewshot.pop() if fewshot else None,
            log_samples=True,
        )
        docs, per_doc = [], {}
        for n in names:
            kind = res["configs"][f"golden_{n}"]["output_type"]
            by_doc = {}
            for s in res["samples"][f"golden_{n}"]:
                by_doc.setdefault(s["doc_id"], []).append(s)
            for doc_id in sorted(by_doc):
                d = doc_record(kind, by_doc[doc_id])
                if specs[n]["subtask"]:
                    d["subtask"] = specs[n]["subtask"]
                docs.append(d)
            for k, v in res["results"][f"golden_{n}"].items():
                if "," in k and "stderr" not in k and isinstance(v, (int, float)):
                    name = k.split(",")[0] if k.split(",")[1] == "none" else k
                    per_doc.setdefault(name, []).append((v, len(by_doc)))
        # A single task's metric as lm-eval aggregates it; a group's, weighted by documents.
        metrics = {k: sum(v * n for v, n in xs) / sum(n for _, n in xs) for k, xs in per_doc.items()}
        out["tasks"][task] = {"limit": PLAN[task], "metrics": metrics, "docs": docs}
        print(task, metrics, file=sys.stderr)
        path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
