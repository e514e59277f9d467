#!/usr/bin/env python3
"""The peer for `emend bench-eval`: lm-evaluation-harness (HF backend, f32, CPU) on the same
task slices, timed per task, reading the same local files (scripts/eval_golden.py's configs).

    /tmp/ref/bin/pip install "lm-eval==0.4.13" torch==2.9.1 transformers==5.5.4 gguf==0.17.1 accelerate
    /tmp/ref/bin/python scripts/bench_eval_peer.py --gguf PATH --tasks mmlu,lambada_openai \\
        --limit 5 > target/eval-peer.json

`--limit` is per task as in lm-eval (per subject for MMLU). MMLU runs 5-shot (emend's default;
lm-eval's own default is 0). The model is loaded once, before any timing.
"""
import argparse
import json
import os
import pathlib
import resource
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from eval_golden import ROOT, local_tasks  # noqa: E402
from eval_reference import hf_dir  # noqa: E402

import lm_eval  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--tasks", default="mmlu,lambada_openai")
    ap.add_argument("--limit", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shared", default=os.environ.get("EMEND_SHARED_DIR", str(ROOT.parent / "shared")))
    args = ap.parse_args()
    # lm-eval prints progress notes ("bootstrapping for stddev: …") on stdout: keep stdout for
    # the JSON report alone.
    report, sys.stdout = sys.stdout, sys.stderr
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="emend-peer-"))
    specs, ymls = local_tasks(args.shared, tmp)
    model_dir = hf_dir(args.gguf, str(tmp / "hf"))
    lm = HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=args.batch_size)
    tm = TaskManager(include_path=str(ymls))
    out = {
        "peer": f"lm-evaluation-harness {lm_eval.__version__}, HF backend (torch {torch.__version__}, "
        f"transformers {transformers.__version__}, f32, CPU, batch_size {args.batch_size})",
        "limit": args.limit,
        "threads": torch.get_num_threads(),
        "tasks": {},
    }
    for task in args.tasks.split(","):
        if task == "mmlu":
            names = sorted(f"golden_{n}" for n in specs if n.startswith("mmlu_"))
            fewshot = 5
        else:
            names = [f"golden_{task}"]
            fewshot = None
        t0, c0 = time.perf_counter(), cpu_seconds()
        res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=args.limit,
                                      num_fewshot=fewshot, log_samples=True)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        docs = [s for n in names for s in res["samples"][n]]
        metrics = {}
        for m in ("acc", "acc_norm", "perplexity"):
            vals = [float(s[m]) for s in docs if m in s and not isinstance(s[m], (list, tuple))]
            if vals:
                metrics[m] = sum(vals) / len(vals)
        if task == "lambada_openai":
            metrics["perplexity"] = res["results"][names[0]]["perplexity,none"]
        out["tasks"][task] = {"wall_s": wall, "cpu_s": cpu, "docs": len(docs),
                              "requests": sum(len(s["resps"]) for s in docs), "metrics": metrics}
        print(task, out["tasks"][task], file=sys.stderr)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out, indent=1), file=report)


if __name__ == "__main__":
    main()
