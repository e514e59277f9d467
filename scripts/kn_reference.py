#!/usr/bin/env python3
"""EasyEdit's KN attribution on the default model, to cross-check emend's Rust KN.

Runs EasyEdit's own `KnowledgeNeurons.get_scores` (zjunlp/EasyEdit, the peers' snapshot) with
its llama code path on the peers' HF model (the GGUF dequantised to f32, CPU) for one prompt and
a one-token true answer, at 1 step (EasyEdit's llama setting, the gradient at the zero baseline)
and at 4 steps (integrated gradients over 0, 1/3, 2/3, 1 of the activation), and writes the
fixture `tests/kn_reference.rs` checks emend against: the 20 highest-scoring neurons with their
scores, the largest score and how many neurons pass EasyEdit's adaptive threshold of 0.2.

The answer is given with its leading space (" Paris"): EasyEdit encodes the answer as given, and
emend attributes the token the model predicts after the prompt, which is " Paris". Run from the
repository root with the peers' venv (`bash ../shared/peers/setup.sh`):

    ~/.cache/emend-peers/venv/bin/python scripts/kn_reference.py --out tests/fixtures/kn_reference.json
"""
import argparse
import json
import os
import sys

CACHE = os.environ.get("PEERS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "emend-peers")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("PEERS_MODEL") or os.path.join(CACHE, "smollm2-135m-instruct-hf"))
    ap.add_argument("--easyedit", default=os.environ.get("EASYEDIT_DIR") or os.path.join(CACHE, "EasyEdit"))
    ap.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    ap.add_argument("--answer", default=" Paris")
    ap.add_argument("--steps", default="1,4")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    sys.path.insert(0, a.easyedit)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The module alone: `import easyeditor` pulls every editor and its dependencies.
    kn_dir = os.path.join(a.easyedit, "easyeditor", "models", "kn", "knowledge_neurons")
    sys.path.insert(0, kn_dir)
    from knowledge_neurons.knowledge_neurons import KnowledgeNeurons

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    kn = KnowledgeNeurons(model, tok, model_type="llama", device="cpu")
    answer_ids = tok.encode(a.answer)
    if len(answer_ids) != 1:
        raise SystemExit(f"{a.answer!r} is {len(answer_ids)} tokens; the cross-check takes one")
    runs = []
    for steps in [int(s) for s in a.steps.split(",")]:
        scores = kn.get_scores(a.prompt, a.answer, batch_size=steps, steps=steps, pbar=False)
        flat = scores.flatten()
        top = torch.topk(flat, 20)
        ff = scores.shape[1]
        mx = float(flat.max())
        runs.append({
            "steps": steps,
            "max_score": mx,
            "above_0_2": int((flat > 0.2 * mx).sum()),
            "top": [
                {"layer": int(i) // ff, "neuron": int(i) % ff, "score": float(s)}
                for s, i in zip(top.values, top.indices)
            ],
        })
        print(f"steps {steps}: max {mx:.5f}, {runs[-1]['above_0_2']} above 0.2·max, top {runs[-1]['top'][:3]}", file=sys.stderr)
    commit_file = os.path.join(a.easyedit, ".easyedit-commit")
    commit = open(commit_file).read().strip() if os.path.exists(commit_file) else None
    out = {
        "about": "EasyEdit's KnowledgeNeurons.get_scores (llama path) on the default model; scripts/kn_reference.py",
        "easyedit_commit": commit,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "prompt": a.prompt,
        "answer": a.answer,
        "answer_token": answer_ids[0],
        "runs": runs,
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
