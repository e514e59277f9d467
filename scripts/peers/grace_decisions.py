#!/usr/bin/env python3
"""GRACE's hit/miss decisions, emend against EasyEdit, on the same CounterFact records.

    emend bench-quality --methods grace --records 50 --out grace.jsonl
    python easyedit_quality.py --method GRACE --n 50 --out grace-easyedit.json
    python grace_decisions.py grace.jsonl grace-easyedit.json

emend's side is each record's `scope` diagnostic (the distance from the rephrasing's and the
neighbourhood prompt's key at the prompt's last token to the edit's entry, and whether it is
within the radius); EasyEdit's is what easyedit_quality.py logged from GRACEAdapter at the first
forward of each generate call of its evaluation, five per record in its order: rewrite (twice:
accuracy, F1), rephrase (twice), neighbourhood.
"""
import json
import sys


def main(emend_path: str, easyedit_path: str) -> int:
    em = [json.loads(line) for line in open(emend_path, encoding="utf-8")]
    ee = json.load(open(easyedit_path, encoding="utf-8"))["grace_decisions"]
    if len(ee) != 5 * len(em):
        raise SystemExit(f"{len(ee)} EasyEdit decisions for {len(em)} records (expected 5 per record)")
    agree = total = 0
    worst = 0.0
    for i, r in enumerate(em):
        d = ee[5 * i:5 * i + 5]
        scope = r["diagnostics"]["scope"]
        pairs = [(r["post"]["reliability"] == 1.0, d[0]["hit"])]
        for ours, theirs in ((scope["rephrase"][0], d[2]), (scope["locality"][0], d[4])):
            pairs.append((ours["in_scope"], theirs["hit"]))
            worst = max(worst, abs(ours["distance"] - theirs["distance"]))
        agree += sum(a == b for a, b in pairs)
        total += len(pairs)
    print(f"records {len(em)}: hit/miss decisions agree {agree}/{total}; "
          f"largest key-distance difference {worst:.4f}")
    return 0 if agree == total else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
