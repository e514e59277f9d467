#!/usr/bin/env python3
"""Reference scores from the real lm-evaluation-harness (HF backend) on the default model.

Converts the default GGUF to a transformers directory (f32 weights; the tokenizer rebuilt from
the GGUF metadata, see DESIGN.md for why transformers' own conversion is wrong), then runs
lm-eval 0.4.13 on the first LIMIT documents of each task, with the same local task configs as
scripts/eval_golden.py, and writes tests/fixtures/eval/reference_scores.json: the aggregate
metrics and, per document, the log-likelihood of every choice, which tests/eval_reference.rs
compares with emend's engine on a few documents.

    /tmp/lmeval-venv/bin/pip install "lm-eval==0.4.13" torch==2.9.1 transformers==5.5.4 gguf==0.17.1 accelerate
    /tmp/lmeval-venv/bin/python scripts/eval_reference.py --gguf PATH [--limit 50]
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
from lm_eval.tasks import TaskManager  # noqa: E402

from eval_golden import ROOT, local_tasks  # noqa: E402
from reference_tokenizer import smollm_tokenizer_from_gguf  # noqa: E402

TASKS = ["lambada_openai", "arc_easy", "piqa", "sciq"]


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--shared", default=os.environ.get("EMEND_SHARED_DIR", str(ROOT.parent / "shared")))
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/eval/reference_scores.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="emend-ref-"))
    _, ymls = local_tasks(args.shared, tmp)
    model_dir = hf_dir(args.gguf, str(tmp / "hf"))
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32,device=cpu",
        tasks=[f"golden_{t}" for t in TASKS],
        task_manager=TaskManager(include_path=str(ymls)),
        limit=args.limit,
        batch_size=1,
        log_samples=True,
    )
    sha = hashlib.sha256(pathlib.Path(args.gguf).read_bytes()).hexdigest()
    out = {
        "_comment": "Made by scripts/eval_reference.py: lm-eval's HF backend (f32, CPU) on the "
        "default model, first `limit` documents of each task, local data files, lm-eval's own "
        "task configs. `docs[i].lls` are lm-eval's per-choice log-likelihoods.",
        "lm_eval_version": lm_eval.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "model_sha256": sha,
        "limit": args.limit,
        "tasks": {},
    }
    for t in TASKS:
        r = res["results"][f"golden_{t}"]
        metrics = {k.split(",")[0]: v for k, v in r.items() if "," in k and "stderr" not in k}
        docs = []
        for s in sorted(res["samples"][f"golden_{t}"], key=lambda s: s["doc_id"]):
            docs.append({
                "doc_id": s["doc_id"],
                "lls": [float(x[0][0]) if isinstance(x[0], (list, tuple)) else float(x[0]) for x in s["resps"]],
                "is_greedy": [bool(x[0][1]) if isinstance(x[0], (list, tuple)) else None for x in s["resps"]],
                **{m: float(s[m]) if not isinstance(s[m], (list, tuple)) else float(s[m][0])
                   for m in ("acc", "acc_norm") if m in s},
            })
        out["tasks"][t] = {"metrics": metrics, "docs": docs}
        print(t, metrics, file=sys.stderr)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
