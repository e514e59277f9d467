#!/usr/bin/env python3
"""Golden logits for emend's Rust tests, computed with HF transformers (f32, CPU).

Writes tests/fixtures/golden/<name>/ for:
  - tiny random-weight checkpoints made here with a fixed seed (llama, mistral with a sliding
    window, gpt2, gpt_neox): config.json + model.safetensors + tokenizer.json, small enough to
    commit, plus golden.json;
  - the default model (SmolLM2-135M-Instruct Q4_1 GGUF, dequantised by transformers): golden.json.
golden.json holds, for each of 3 prompts, the input ids and the top-10 next-token log-probs at
every position.

Run once, from the repository root (see scripts/requirements-reference.txt for the versions):
    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install -r scripts/requirements-reference.txt
    /tmp/ref/bin/python scripts/golden.py --gguf ~/.cache/emend/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import argparse
import json
import os

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

from reference_tokenizer import smollm_tokenizer_from_gguf

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "golden")
SEED = 1234
TINY_PROMPTS = [
    "Hello world, this is emend.",
    "The 2024 Eiffel Tower!",
    "def f(x):\n    return x * 2",
]
DEFAULT_PROMPTS = [
    "The capital of France is",
    "Knowledge editing rewrites single facts inside a language model without retraining.",
    "for i in range(10):\n    print(i)",
]


def byte_tokenizer():
    """Byte-level BPE with the 256 byte symbols and no merges: one token per byte."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def top10(logits):
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, idx = lp.topk(10, dim=-1)
    return [{"ids": i.tolist(), "logprobs": [round(v, 6) for v in x.tolist()]} for i, x in zip(idx, vals)]


def run_prompts(model, encode, prompts):
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = encode(p)
            logits = model(torch.tensor([ids])).logits[0]
            out.append({"prompt": p, "input_ids": ids, "top10_next": top10(logits)})
    return out


def tiny_configs():
    common = dict(vocab_size=257, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.1)
    return {
        "llama": transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                          rope_theta=10000.0, **common),
        "mistral": transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                              rope_theta=10000.0, sliding_window=8, **common),
        "gpt2": transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=257,
                                        initializer_range=0.1, tie_word_embeddings=True),
        "gpt_neox": transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True,
                                               **common),
    }


def make_tiny(name, cfg, tok):
    torch.manual_seed(SEED)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    # Non-trivial norms, so that weight-loading mistakes in them would show.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "ln" in n:
                p.add_(0.1 * torch.randn_like(p))
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "add_bos_token": False}, f, indent=1)
    for extra in ("generation_config.json",):
        p = os.path.join(d, extra)
        if os.path.exists(p):
            os.remove(p)
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids
    return run_prompts(model, encode, TINY_PROMPTS)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", help="the default model's GGUF file (skipped when absent)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "seed": SEED, "dtype": "float32"}
    tok = byte_tokenizer()
    for name, cfg in tiny_configs().items():
        cases = make_tiny(name, cfg, tok)
        with open(os.path.join(OUT, name, "golden.json"), "w") as f:
            json.dump({**meta, "model": f"tiny random {name}", "cases": cases}, f)
        print("wrote", name)
    if args.gguf:
        d, fname = os.path.split(os.path.abspath(args.gguf))
        model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=fname, dtype=torch.float32).eval()
        tok = smollm_tokenizer_from_gguf(args.gguf)
        encode = lambda s: tok.encode(s, add_special_tokens=False).ids
        cases = run_prompts(model, encode, DEFAULT_PROMPTS)
        os.makedirs(os.path.join(OUT, "smollm2"), exist_ok=True)
        with open(os.path.join(OUT, "smollm2", "golden.json"), "w") as f:
            json.dump({**meta, "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantised", "cases": cases}, f)
        print("wrote smollm2")


if __name__ == "__main__":
    main()
