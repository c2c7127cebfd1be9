"""Greedy parity with transformers on the real default model (SmolLM2-135M GGUF, float32).

The engine runs all prompts concurrently as one batch, with a small token budget (chunked
prefill), a shared system prompt (prefix-cache hits after the first request) and a small
block size; transformers runs each prompt alone from the same GGUF.
"""

from __future__ import annotations

import pytest
import torch

from splitserve.engine import native
from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.model_runner import cpu_has_fast_bf16
from splitserve.engine.sampling_params import SamplingParams
from tests.helpers.parity import NEW_TOKENS, explain_mismatches, first_mismatches


def run_batched(prompts, **over) -> tuple[Engine, list[list[int]]]:
    """Every prompt at once, greedy, chunked prefill, prefix-cache hits (asserted); all
    blocks come back."""
    opts = dict(dtype="float32", block_size=16, max_num_batched_tokens=96, max_num_seqs=16,
                num_kv_blocks=256, progress=False)
    eng = Engine(EngineConfig(**{**opts, **over}))
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
    return eng, [got[f"p{i}"] for i in range(len(prompts))]


def test_greedy_parity_batched_chunked_prefix_cached(parity_prompts, parity_reference):
    assert min(len(p) for p in parity_prompts) >= 5 and max(len(p) for p in parity_prompts) > 64
    _, got = run_batched(parity_prompts)
    failures = explain_mismatches(got, parity_reference)
    assert not failures, "\n".join(failures)


#: Settings that move the logits a little, each with why and what was measured, the
#: reference's largest top-2 margin at which a prompt may leave it, and optionally how many
#: of the 8 prompts may leave it (default: half).
NEAR_EXACT = {
    # keys and values rounded to bfloat16 (2^-9 relative). Measured: 7 of the 8 prompts equal
    # for all 32 tokens, one leaving at token 30 for the runner-up, at a margin of 7e-3.
    "bf16-kv-cache": ({"kv_cache_dtype": "bfloat16"}, 0.1),
    # every Q4_1 GEMM's inputs rounded to int8 per group of 32 (~0.5 % of a GEMM's output).
    # Measured: 6 of 8 prompts equal for all 32 tokens; two leave for the runner-up, at
    # tokens 30 and 13, margins 7e-3 and 0.046.
    "w4a8": ({"quantization": "w4a8"}, 0.1),
    # both (the setting of the README's w4a8 bench figures). Measured: 5 of 8 equal; three
    # leave for the runner-up, at tokens 19, 13 and 24, margins 0.024, 0.046 and 0.29 (the
    # last: the raw completion prompt, "def fibonacci(n):").
    "w4a8-bf16-kv-cache": ({"quantization": "w4a8", "kv_cache_dtype": "bfloat16"}, 0.35),
    # keys and values rounded to float8 e4m3 (2^-4 relative, no scale). Measured: 4 of 8
    # equal; four leave for the runner-up, at tokens 19, 13, 13 and 13, margins 0.024,
    # 0.046, 0.21 and 0.14. Half already: one more allowed, so that another CPU's summation
    # order moving one more near-tie does not fail it (each departure is still checked).
    "fp8-kv-cache": ({"kv_cache_dtype": "fp8"}, 0.3, 5),
    # a bfloat16 model (weights, activations and cache; sums in float32), where the CPU has
    # bfloat16 units. Measured (AMD EPYC, Zen 4): 7 of 8 equal; one leaves at token 19,
    # margin 0.024.
    "bf16-model": ({"dtype": "bfloat16"}, 0.1),
    # and its Q4_1 GEMMs' inputs rounded to int8 (the bench's w4a8 setting). Measured: 5 of
    # 8 equal; three leave for the runner-up at tokens 0, 13 and 15, margins 0.14, 0.046
    # and 0.58 (the last: the raw completion prompt, whose runner-up is as plausible).
    "bf16-model-w4a8": ({"dtype": "bfloat16", "quantization": "w4a8"}, 0.7),
    # a bfloat16 model over a float8 cache. Measured: 5 of 8 equal; three leave for the
    # runner-up at tokens 0, 14 and 13, margins 0.14, 0.13 and 0.14.
    "bf16-model-fp8-kv-cache": ({"dtype": "bfloat16", "kv_cache_dtype": "fp8"}, 0.3),
}


@pytest.mark.parametrize("setting", NEAR_EXACT)
def test_near_exact_settings_depart_only_at_near_ties(setting, parity_prompts, parity_reference):
    """Greedy tokens may leave the exact reference only where its top two are nearly tied
    (the setting's margin), and then for its runner-up, on at most half the prompts (or
    the setting's count)."""
    over, max_margin, *count = NEAR_EXACT[setting]
    max_departures = count[0] if count else len(parity_prompts) // 2
    if "quantization" in over and native.load_quant_gemm_a8() is None:
        pytest.skip("the w4a8 kernel is not built here (no compiler or no AVX2/FMA/F16C)")
    if over.get("dtype") == "bfloat16" and not cpu_has_fast_bf16():
        pytest.skip("no bfloat16 units here (a bfloat16 model runs, ~10x slower than float32)")
    eng, got = run_batched(parity_prompts, **over)
    if "kv_cache_dtype" in over:
        assert eng.runner.kv_cache.dtype == {"bfloat16": torch.bfloat16,
                                             "fp8": torch.float8_e4m3fn}[over["kv_cache_dtype"]]
    if "quantization" in over:
        assert eng.runner.model.weight_format == "w4a8"
    if "dtype" in over:
        assert eng.runner.dtype == torch.bfloat16
    departures = first_mismatches(got, parity_reference)
    assert len(departures) <= max_departures, explain_mismatches(got, parity_reference)
    for i, j, ours, top2, margin in departures:
        assert top2 is not None and ours == top2[1] and margin < max_margin, \
            explain_mismatches(got, parity_reference)
