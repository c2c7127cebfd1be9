"""`--kv-cache-dtype`: the flag through to the engine and its workers, what it accepts and
refuses, and the cache it builds (kernels and numerics: test_cpu_attention.py,
test_cpu_prefill_attention.py, test_parity_smollm2.py)."""

from __future__ import annotations

import argparse

import pytest
import torch

from splitserve.engine.cli import add_engine_args, engine_config_from_args
from splitserve.engine.config import EngineConfig
from splitserve.engine.kv_dtype import to_cache_dtype
from splitserve.engine.model_runner import kv_block_bytes, resolve_kv_cache_dtype
from splitserve.engine.sampling_params import SamplingParams
from splitserve.runtime.engine_args import engine_argv

from .factories import tiny_engine, tiny_model_config

CPU, F32, BF16, FP8 = torch.device("cpu"), torch.float32, torch.bfloat16, torch.float8_e4m3fn


def test_auto_is_the_models_dtype_and_narrower_is_allowed_on_cpu():
    assert resolve_kv_cache_dtype("auto", F32, CPU) == F32
    assert resolve_kv_cache_dtype("auto", BF16, CPU) == BF16
    assert resolve_kv_cache_dtype("bfloat16", F32, CPU) == BF16
    assert resolve_kv_cache_dtype("bfloat16", BF16, CPU) == BF16
    assert resolve_kv_cache_dtype("float32", F32, CPU) == F32
    assert resolve_kv_cache_dtype("fp8", F32, CPU) == FP8
    assert resolve_kv_cache_dtype("fp8_e4m3", F32, CPU) == FP8
    assert resolve_kv_cache_dtype("fp8", BF16, CPU) == FP8


def test_other_pairs_and_mixed_on_gpu_are_refused():
    with pytest.raises(ValueError, match="float32 under a bfloat16 model: use auto"):
        resolve_kv_cache_dtype("float32", BF16, CPU)
    with pytest.raises(ValueError, match="bfloat16 under a float16 model: use auto"):
        resolve_kv_cache_dtype("bfloat16", torch.float16, CPU)
    with pytest.raises(ValueError, match="CPU only"):
        resolve_kv_cache_dtype("bfloat16", F32, torch.device("cuda"))
    assert resolve_kv_cache_dtype("bfloat16", BF16, torch.device("cuda")) == BF16
    # a float16 model has no kernels over a narrower cache; every choice is named
    with pytest.raises(ValueError, match="fp8 under a float16 model: use auto.*bfloat16 or fp8 "
                                         "under a float32 model, or fp8 under a bfloat16 model"):
        resolve_kv_cache_dtype("fp8", torch.float16, CPU)
    for model in (F32, BF16):
        with pytest.raises(ValueError, match="CPU only"):
            resolve_kv_cache_dtype("fp8", model, torch.device("cuda"))


def test_unknown_dtype_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be auto\|float32\|bfloat16\|fp8"):
        EngineConfig(kv_cache_dtype="int8")


def test_the_flag_reaches_the_engine_config_and_the_workers_argv():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    for name in ("bfloat16", "fp8"):
        args = p.parse_args(["--kv-cache-dtype", name])
        assert engine_config_from_args(args).kv_cache_dtype == name
        argv = engine_argv(args)
        assert argv[argv.index("--kv-cache-dtype") + 1] == name
    assert engine_config_from_args(p.parse_args([])).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["--kv-cache-dtype", "int8"])


def test_narrower_caches_hold_more_blocks_of_a_budget_and_free_them_all():
    """bfloat16 twice float32's blocks, float8 four times; each generates and frees all."""
    cfg = tiny_model_config()
    budget = 64 * kv_block_bytes(cfg, 4, F32)
    engines = {kv: tiny_engine(cfg, num_kv_blocks=None, kv_cache_memory=budget,
                               kv_cache_dtype=kv) for kv in ("auto", "bfloat16", "fp8")}
    for kv, dtype, blocks in (("auto", F32, 64), ("bfloat16", BF16, 128), ("fp8", FP8, 256)):
        eng = engines[kv]
        assert eng.runner.kv_cache.dtype == dtype
        assert eng.pool.num_blocks == blocks
        assert eng.runner.kv_cache.nbytes == engines["auto"].runner.kv_cache.nbytes
        outs = eng.generate([[5, 6, 7, 8, 9] * 7, [3, 4]],
                            SamplingParams(max_tokens=9, ignore_eos=True))
        assert [len(o) for o in outs] == [9, 9]
        assert eng.pool.num_free_blocks == eng.pool.num_blocks


def test_float8_keeps_values_past_its_range_finite():
    """The cache saturates at +-448, infinities included (a NaN key would poison every
    later score of its request)."""
    x = torch.tensor([1000.0, -1e6, 448.0, 470.0, 0.3, -2.0**-9, float("inf")])
    got = to_cache_dtype(x, FP8).float()
    assert got.tolist() == [448.0, -448.0, 448.0, 448.0, 0.3125, -2.0**-9, 448.0]


def test_native_float8_rounding_is_torchs_bit_for_bit():
    """The C rounding (layer stack and kernels) against torch's: every float8 value, each
    midpoint between neighbours (ties to even) and a hair either side, subnormals, zeros,
    values past the range, and a million random magnitudes."""
    import ctypes

    from splitserve.engine import native

    lib = native.load_library("paged_decode")
    if lib is None:
        pytest.skip("no C compiler here")
    fn = lib.splitserve_round_fp8_e4m3
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    finite = codes[torch.isfinite(codes)].unique()  # 0 and -0 are one value
    mids = (finite[1:].double() + finite[:-1].double()) / 2
    gen = torch.Generator().manual_seed(0)
    rand = torch.randn(1 << 20, generator=gen) * torch.exp2(torch.randint(-12, 10, (1 << 20,),
                                                                          generator=gen))
    x = torch.cat([finite, mids.float(), torch.nextafter(mids.float(), torch.tensor(1e9)),
                   torch.nextafter(mids.float(), torch.tensor(-1e9)),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 449.0, -479.0, 1e30, float("nan")]),
                   rand])
    out = torch.empty(x.shape, dtype=torch.uint8)
    fn(x.data_ptr(), out.data_ptr(), x.numel())
    want = to_cache_dtype(x, FP8).view(torch.uint8)
    nan = torch.isnan(x)
    assert torch.equal(out[~nan], want[~nan])
    assert torch.isnan(out[nan].view(FP8).float()).all()
