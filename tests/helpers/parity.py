"""The parity prompt set and its transformers reference (greedy, float32, SmolLM2 GGUF).

The reference is computed once per test session (tests/conftest.py) and shared by the
engine parity test and the disaggregated-serving parity test.
"""

from __future__ import annotations

import os

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


def parity_prompts(tokenizer) -> list[list[int]]:
    """Token ids: chat-templated prompts sharing a system prompt, and one raw completion."""
    out = []
    for i, q in enumerate(QUESTIONS):
        if i == 6:
            out.append(list(tokenizer.encode(q)))
            continue
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out.append(list(tokenizer.encode(text, add_special_tokens=False)))
    return out


def transformers_reference(prompts: list[list[int]]):
    """[(greedy new token ids, per-step logits)] from transformers on the same GGUF."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    from splitserve.engine.model_loader import resolve_model

    src = resolve_model("smollm2-135m")
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


def first_mismatches(got: list[list[int]], refs) -> list[tuple]:
    """(prompt, new-token index, our token, the reference's top-2 ids, their logit margin)
    at the first mismatch of each prompt whose tokens differ; the last three are None when
    only the lengths differ."""
    out = []
    for i, (ours, (ref, scores)) in enumerate(zip(got, refs)):
        if ours == ref:
            continue
        j = next((k for k in range(min(len(ours), len(ref))) if ours[k] != ref[k]),
                 min(len(ours), len(ref)))
        if j >= len(scores) or j >= len(ours):
            out.append((i, j, None, None, None))
            continue
        top2 = scores[j].float().topk(2)
        out.append((i, j, ours[j], top2.indices.tolist(), float(top2.values[0] - top2.values[1])))
    return out


def explain_mismatches(got: list[list[int]], refs) -> list[str]:
    """One line per prompt whose tokens differ, with the reference's top-2 logit margin at
    the first mismatch (a near-tie shows as a tiny margin)."""
    failures = []
    for i, j, ours, top2, margin in first_mismatches(got, refs):
        if top2 is None:
            failures.append(f"prompt {i}: length differs at new token {j}")
            continue
        failures.append(f"prompt {i}: first mismatch at new token {j}: got {ours} vs "
                        f"reference {top2[0]}; reference top-2 ids {top2}, margin {margin:.2e}")
    return failures
