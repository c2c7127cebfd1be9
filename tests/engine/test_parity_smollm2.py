"""Greedy parity with transformers on the real default model (SmolLM2-135M GGUF, float32).

The engine runs all prompts concurrently as one batch, with a small token budget (chunked
prefill), a shared system prompt (prefix-cache hits after the first request) and a small
block size; transformers runs each prompt alone from the same GGUF.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from splitserve.engine.config import EngineConfig  # noqa: E402
from splitserve.engine.engine import Engine  # noqa: E402
from splitserve.engine.model_loader import load_tokenizer, resolve_model  # noqa: E402
from splitserve.engine.sampling_params import SamplingParams  # noqa: E402

SYSTEM = (
    "You are a careful assistant. Answer briefly and precisely, using plain words. "
    "If you do not know something, say so instead of guessing."
)
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is.",
    "List three prime numbers.",
    "Why is the sky blue? Give the physical reason in two sentences.",
    "Translate 'good morning' into Spanish.",
    "def fibonacci(n):",
    "Summarize the plot of a story where a robot learns to paint, in detail, covering the "
    "beginning, the middle and the end, with the names of the characters and places.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("smollm2-135m"))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    out = []
    for i, q in enumerate(QUESTIONS):
        if i == 6:  # one raw completion prompt, no template
            out.append(tokenizer.encode(q))
            continue
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
        out.append(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    return [list(p) if not hasattr(p, "keys") else list(p["input_ids"]) for p in out]


@pytest.fixture(scope="module")
def reference(prompts):
    import transformers

    src = resolve_model("smollm2-135m")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(src.path.parent), gguf_file=src.path.name, dtype=torch.float32
    ).eval()
    refs = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0, output_scores=True,
                              return_dict_in_generate=True)
        refs.append((out.sequences[0, len(p):].tolist(), [s[0] for s in out.scores]))
    return refs


def test_greedy_parity_batched_chunked_prefix_cached(prompts, reference):
    assert min(len(p) for p in prompts) >= 5 and max(len(p) for p in prompts) > 64
    eng = Engine(EngineConfig(dtype="float32", block_size=16, max_num_batched_tokens=96,
                              max_num_seqs=16, num_kv_blocks=256, progress=False))
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"p{i}", p, params)
    got = {f"p{i}": [] for i in range(len(prompts))}
    cached = {}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id].extend(o.new_token_ids)
            cached[o.request_id] = o.num_cached_tokens
    assert sum(cached.values()) > 0, "expected prefix-cache hits on the shared system prompt"
    assert eng.pool.num_free_blocks == eng.pool.num_blocks

    failures = []
    for i, (p, (ref, scores)) in enumerate(zip(prompts, reference)):
        out = got[f"p{i}"]
        if out != ref:
            j = next(k for k in range(NEW_TOKENS) if out[k] != ref[k])
            top2 = scores[j].float().topk(2)
            failures.append(
                f"prompt {i}: first mismatch at new token {j}: engine {out[j]} vs reference "
                f"{ref[j]}; reference top-2 logits {top2.values.tolist()} (ids "
                f"{top2.indices.tolist()}), margin {float(top2.values[0] - top2.values[1]):.2e}"
            )
    assert not failures, "\n".join(failures)
