"""`--kv-cache-dtype`: the flag through to the engine and its workers, what it accepts and
refuses, and the cache it builds (kernels and numerics: test_cpu_attention.py,
test_cpu_prefill_attention.py, test_parity_smollm2.py)."""

from __future__ import annotations

import argparse

import pytest
import torch

from splitserve.engine.cli import add_engine_args, engine_config_from_args
from splitserve.engine.config import EngineConfig
from splitserve.engine.model_runner import kv_block_bytes, resolve_kv_cache_dtype
from splitserve.engine.sampling_params import SamplingParams
from splitserve.runtime.engine_args import engine_argv

from .factories import tiny_engine, tiny_model_config

CPU, F32, BF16 = torch.device("cpu"), torch.float32, torch.bfloat16


def test_auto_is_the_models_dtype_and_narrower_is_allowed_on_cpu():
    assert resolve_kv_cache_dtype("auto", F32, CPU) == F32
    assert resolve_kv_cache_dtype("auto", BF16, CPU) == BF16
    assert resolve_kv_cache_dtype("bfloat16", F32, CPU) == BF16
    assert resolve_kv_cache_dtype("bfloat16", BF16, CPU) == BF16
    assert resolve_kv_cache_dtype("float32", F32, CPU) == F32


def test_other_pairs_and_mixed_on_gpu_are_refused():
    with pytest.raises(ValueError, match="float32 under a bfloat16 model: use auto"):
        resolve_kv_cache_dtype("float32", BF16, CPU)
    with pytest.raises(ValueError, match="bfloat16 under a float16 model: use auto"):
        resolve_kv_cache_dtype("bfloat16", torch.float16, CPU)
    with pytest.raises(ValueError, match="CPU only"):
        resolve_kv_cache_dtype("bfloat16", F32, torch.device("cuda"))
    assert resolve_kv_cache_dtype("bfloat16", BF16, torch.device("cuda")) == BF16


def test_unknown_dtype_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be auto\|float32\|bfloat16"):
        EngineConfig(kv_cache_dtype="fp8")


def test_the_flag_reaches_the_engine_config_and_the_workers_argv():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(["--kv-cache-dtype", "bfloat16"])
    assert engine_config_from_args(args).kv_cache_dtype == "bfloat16"
    argv = engine_argv(args)
    assert argv[argv.index("--kv-cache-dtype") + 1] == "bfloat16"
    assert engine_config_from_args(p.parse_args([])).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["--kv-cache-dtype", "int8"])


def test_a_bfloat16_cache_holds_twice_the_blocks_of_a_budget_and_frees_them_all():
    cfg = tiny_model_config()
    budget = 64 * kv_block_bytes(cfg, 4, F32)
    engines = {kv: tiny_engine(cfg, num_kv_blocks=None, kv_cache_memory=budget,
                               kv_cache_dtype=kv) for kv in ("auto", "bfloat16")}
    assert engines["auto"].runner.kv_cache.dtype == F32
    assert engines["bfloat16"].runner.kv_cache.dtype == BF16
    assert engines["auto"].pool.num_blocks == 64
    assert engines["bfloat16"].pool.num_blocks == 128
    assert engines["bfloat16"].runner.kv_cache.nbytes == engines["auto"].runner.kv_cache.nbytes
    eng = engines["bfloat16"]
    outs = eng.generate([[5, 6, 7, 8, 9] * 7, [3, 4]], SamplingParams(max_tokens=9, ignore_eos=True))
    assert [len(o) for o in outs] == [9, 9]
    assert eng.pool.num_free_blocks == eng.pool.num_blocks
