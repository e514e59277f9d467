#!/usr/bin/env python3
"""The peer for `emend bench`: the same workload with HF transformers (f32, CPU).

Loads the default GGUF model the way transformers does (dequantised to f32), then measures
prefill (B x T prompt, logits of the last position only) and greedy decode steps with the KV
cache, for each batch size; prints JSON with the keys `emend bench --peer` reads.

    /tmp/ref/bin/python scripts/bench_hf.py --gguf ~/.cache/emend/models/SmolLM2-135M-Instruct.Q4_1.gguf > /tmp/peer.json
"""
import argparse
import json
import os
import resource
import statistics
import time

import torch
import transformers


def prompt(b, t, vocab):
    return torch.tensor([(1000 + (i * 7919) % (vocab - 2000)) for i in range(b * t)]).view(b, t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    a = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    d, f = os.path.split(os.path.abspath(a.gguf))
    loads = []
    for _ in range(a.runs):
        s = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
        loads.append(time.perf_counter() - s)
    vocab = model.config.vocab_size
    out = {}
    with torch.inference_mode():
        for b in [int(x) for x in a.batches.split(",")]:
            ids = prompt(b, a.prompt_tokens, vocab)
            model(ids, logits_to_keep=1)
            times = []
            for _ in range(a.runs):
                s = time.perf_counter()
                model(ids, logits_to_keep=1)
                times.append(time.perf_counter() - s)
            out[f"prefill_b{b}_tokens_per_s"] = b * a.prompt_tokens / statistics.median(times)
            times = []
            for _ in range(a.runs):
                r = model(ids, use_cache=True, logits_to_keep=1)
                past, logits = r.past_key_values, r.logits[:, -1]
                s = time.perf_counter()
                for _ in range(a.decode_tokens):
                    nxt = logits.argmax(-1, keepdim=True)
                    r = model(nxt, past_key_values=past, use_cache=True)
                    past, logits = r.past_key_values, r.logits[:, -1]
                times.append(time.perf_counter() - s)
            out[f"decode_b{b}_tokens_per_s"] = b * a.decode_tokens / statistics.median(times)
    print(json.dumps({
        "engine": f"transformers {transformers.__version__} (torch {torch.__version__}, f32)",
        "load_seconds": statistics.median(loads),
        "throughput": out,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": threads,
    }))


if __name__ == "__main__":
    main()
