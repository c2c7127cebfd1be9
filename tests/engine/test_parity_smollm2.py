"""Greedy parity with transformers on the real default model (SmolLM2-135M GGUF, float32).

The engine runs all prompts concurrently as one batch, with a small token budget (chunked
prefill), a shared system prompt (prefix-cache hits after the first request) and a small
block size; transformers runs each prompt alone from the same GGUF.
"""

from __future__ import annotations

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.sampling_params import SamplingParams
from tests.helpers.parity import NEW_TOKENS, explain_mismatches


def test_greedy_parity_batched_chunked_prefix_cached(parity_prompts, parity_reference):
    prompts = parity_prompts
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
    failures = explain_mismatches([got[f"p{i}"] for i in range(len(prompts))], parity_reference)
    assert not failures, "\n".join(failures)
