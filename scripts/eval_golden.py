#!/usr/bin/env python3
"""Golden prompt strings from the real lm-evaluation-harness for emend's eval tasks.

Renders the first requests of each task exactly as lm-eval 0.4.13 builds them (its own task
YAMLs, `include`d, with only the dataset location overridden to local files read through the
`json` builder), and writes tests/fixtures/eval/prompts.json, which tests/eval_prompts.rs
compares with emend's rendering. No hub access: HF_DATASETS_OFFLINE=1.

    python3 -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip install "lm-eval==0.4.13"
    /tmp/lmeval-venv/bin/python scripts/eval_golden.py [--shared ../shared]

Where the local files are not in the layout lm-eval's Hugging Face dataset has, they are
converted here first (field renames only; the converted rows are listed per task in
`conversions` in the fixture). Few-shot sampling is lm-eval's own: `first_n` for MMLU and BBH,
`random.Random(1234)` (the default `fewshot_random_seed`) for GSM8K, drawn in document order.
"""
import argparse
import ast
import csv
import json
import os
import pathlib
import re
import sys
import tempfile

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager, get_task_dict  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
TASKS_DIR = pathlib.Path(lm_eval.__file__).parent / "tasks"
LIMIT = 3


def jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def wikitext_pages(raw):
    """The page split of EleutherAI/wikitext_document_level (a new page at each top-level
    heading). Re-implemented here: that dataset's loading script is on the hub."""
    pages, lines = [], []
    for line in raw.split("\n"):
        r = line.replace("= = =", "===").replace("= =", "==").strip()
        if r.startswith("= ") and r.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    page = "\n".join(lines)
    if page.strip():
        pages.append(page)
    return pages


def local_tasks(shared, tmp):
    """Writes lm-eval task YAMLs (`golden_<name>`) that include lm-eval's own configs and read
    the local files; returns `({name: spec}, yaml dir)`."""
    data = pathlib.Path(shared) / "data"
    fixture_data = ROOT / "tests/fixtures/eval/data"
    conv = tmp / "data"
    conv.mkdir()
    ymls = tmp / "tasks"
    ymls.mkdir()

    # name -> (included yaml, splits {split: file}, num_fewshot or None, emend task, subtask)
    specs = {}

    def spec(name, include, files, num_fewshot=None, emend=None, subtask=None, extra="", fmt="json"):
        specs[name] = dict(num_fewshot=num_fewshot, emend=emend or name, subtask=subtask)
        df = "".join(f"    {k}: {json.dumps(str(v))}\n" for k, v in files.items())
        # Splits the local data does not have (e.g. train of PIQA) must not be loaded.
        for split in ("training", "validation"):
            key = "train" if split == "training" else split
            if key not in files:
                extra += f"{split}_split: null\n"
        (ymls / f"{name}.yaml").write_text(
            f"include: {json.dumps(str(include))}\n"
            f"task: golden_{name}\n"
            "tag: []\n"
            f"dataset_path: {fmt}\n"
            "dataset_name: null\n"
            "dataset_kwargs:\n  data_files:\n" + df + extra
        )

    spec("lambada_openai", TASKS_DIR / "lambada/lambada_openai.yaml",
         {"test": data / "lambada/lambada_test.jsonl"})
    raw = (data / "wikitext2/wiki.test.raw").read_text(encoding="utf-8")
    spec("wikitext", TASKS_DIR / "wikitext/wikitext.yaml",
         {"test": jsonl(conv / "wikitext.jsonl", [{"page": p} for p in wikitext_pages(raw)])})
    for name, f in [("arc_easy", "Easy"), ("arc_challenge", "Challenge")]:
        spec(name, TASKS_DIR / f"arc/{name}.yaml",
             {"test": data / f"arc/ARC-{f}-test.jsonl", "train": data / f"arc/ARC-{f}-train.jsonl",
              "validation": data / f"arc/ARC-{f}-validation.jsonl"})
    labels = (data / "piqa/valid-labels.lst").read_text().split()
    piqa = [dict(d, label=int(l)) for d, l in zip(read_jsonl(data / "piqa/valid.jsonl"), labels)]
    spec("piqa", TASKS_DIR / "piqa/piqa.yaml", {"validation": jsonl(conv / "piqa.jsonl", piqa)})
    sciq = json.loads((data / "sciq/test.json").read_text(encoding="utf-8"))
    spec("sciq", TASKS_DIR / "sciq/sciq.yaml", {"test": jsonl(conv / "sciq.jsonl", sciq)})
    hs = read_jsonl(fixture_data / "hellaswag/hellaswag_val.jsonl")
    # The Hugging Face copy stores the label as a string.
    hs = [dict(d, label=str(d["label"])) for d in hs]
    spec("hellaswag", TASKS_DIR / "hellaswag/hellaswag.yaml",
         {"validation": jsonl(conv / "hellaswag.jsonl", hs)})
    for line in sorted((TASKS_DIR / "mmlu/default").glob("mmlu_*.yaml")):
        subject = line.stem[len("mmlu_"):]

        def mmlu_rows(split):
            with open(data / f"mmlu/{split}/{subject}_{split}.csv", encoding="utf-8", newline="") as f:
                return [{"question": r["question"], "subject": subject,
                         "choices": [r[f"choice{i}"] for i in range(4)], "answer": int(r["answer"])}
                        for r in csv.DictReader(f)]

        spec(f"mmlu_{subject}", line,
             {"test": jsonl(conv / f"mmlu_{subject}_test.jsonl", mmlu_rows("test")),
              "dev": jsonl(conv / f"mmlu_{subject}_dev.jsonl", mmlu_rows("dev"))},
             num_fewshot=5, emend="mmlu", subtask=subject)
    spec("commonsense_qa", TASKS_DIR / "commonsense_qa/default.yaml",
         {"validation": data / "commonsense_qa/dev_rand_split.jsonl"})
    mc = json.loads((data / "truthful_qa/mc_task.json").read_text(encoding="utf-8"))
    tqa = [{"question": d["question"],
            "mc1_targets": {"choices": list(d["mc1_targets"]), "labels": list(d["mc1_targets"].values())},
            "mc2_targets": {"choices": list(d["mc2_targets"]), "labels": list(d["mc2_targets"].values())}}
           for d in mc]
    tqa_file = jsonl(conv / "truthfulqa.jsonl", tqa)
    spec("truthfulqa_mc1", TASKS_DIR / "truthfulqa/truthfulqa_mc1.yaml", {"validation": tqa_file})
    spec("truthfulqa_mc2", TASKS_DIR / "truthfulqa/truthfulqa_mc2.yaml", {"validation": tqa_file})
    spec("gsm8k", TASKS_DIR / "gsm8k/gsm8k.yaml",
         {"test": data / "gsm8k/test.jsonl", "train": data / "gsm8k/train.jsonl"})
    for y in sorted((TASKS_DIR / "bbh/cot_fewshot").glob("*.yaml")):
        if y.name.startswith("_"):
            continue
        ex = json.loads((data / f"bbh/data/{y.stem}.json").read_text(encoding="utf-8"))["examples"]
        spec(f"bbh_{y.stem}", y, {"test": jsonl(conv / f"bbh_{y.stem}.jsonl", ex)},
             emend="bbh", subtask=y.stem)

    def trivia(path):
        rows = []
        with open(path, encoding="utf-8", newline="") as f:
            for r in csv.reader(f, delimiter="\t"):
                if r:
                    rows.append({"question": r[0], "answer": {"aliases": ast.literal_eval(r[1])}})
        return rows

    spec("triviaqa", TASKS_DIR / "triviaqa/default.yaml",
         {"validation": jsonl(conv / "triviaqa.jsonl", trivia(data / "triviaqa/topics.dpr.trivia.test.txt"))})
    spec("toxigen", TASKS_DIR / "toxigen/toxigen.yaml",
         {"test": data / "toxigen/annotated/test-00000-of-00001.parquet"}, fmt="parquet")

    return specs, ymls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.environ.get("EMEND_SHARED_DIR", str(ROOT.parent / "shared")))
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/eval/prompts.json"))
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="emend-golden-"))
    specs, ymls = local_tasks(args.shared, tmp)
    tm = TaskManager(include_path=str(ymls))
    out = {
        "_comment": "Generated by scripts/eval_golden.py with lm-eval " + lm_eval.__version__
        + ": the first requests lm-eval builds for each task (its YAML configs, local files). "
        "wikitext's page split is re-implemented in the script (the document-level dataset script "
        "is on the hub), so only the detokenized text is lm-eval's. hellaswag reads the "
        "hand-written file in tests/fixtures/eval/data; toxigen the annotated split's Parquet export. MMLU and BBH: the first request(s) of "
        "every subject/task; few-shot sampling is lm-eval's own (first_n for MMLU and BBH, "
        "random.Random(1234) for GSM8K).",
        "lm_eval_version": lm_eval.__version__,
        "tasks": {},
    }
    for name, s in specs.items():
        limit = 1 if s["subtask"] else LIMIT
        td = get_task_dict([f"golden_{name}"], tm)
        task = td[f"golden_{name}"]
        if s["num_fewshot"] is not None:
            task.set_config(key="num_fewshot", value=s["num_fewshot"])
        task.set_fewshot_seed(seed=1234)
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        docs = {}
        for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
            if inst.request_type == "generate_until":
                ctx, kw = inst.arguments
                req = {"kind": "generate_until", "context": ctx, "until": list(kw["until"]),
                       "max_gen_toks": kw.get("max_gen_toks", 256)}
            elif inst.request_type == "loglikelihood_rolling":
                req = {"kind": "loglikelihood_rolling", "text": inst.arguments[0]}
            else:
                ctx, cont = inst.arguments
                req = {"kind": "loglikelihood", "context": ctx, "continuation": cont}
            docs.setdefault(inst.doc_id, []).append(req)
        out["tasks"][name] = {
            "emend_task": s["emend"],
            "subtask": s["subtask"],
            "num_fewshot": task.config.num_fewshot or 0,
            "version": str((task.config.metadata or {}).get("version")),
            "docs": [{"doc_id": d, "requests": r} for d, r in sorted(docs.items())],
        }
        print(f"{name}: {len(docs)} docs", file=sys.stderr)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
