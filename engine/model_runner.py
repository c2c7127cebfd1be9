"""Turns a SchedulerOutput into tensors (token ids, positions, cache slots, block tables),
runs the model and samples. Owns the weights and the KV cache tensor; makes no policy
decisions."""

from __future__ import annotations

import logging

import torch

from .attention import build_metadata, get_backend
from .config import EngineConfig, ModelConfig
from .hugepages import zeros_huge
from .kv_dtype import FP8
from .native import dtype_name
from .models import LlamaForCausalLM
from .outputs import TokenLogprob
from .sampler import Sampler
from .scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: --kv-cache-dtype names beyond the model dtypes'
_KV_DTYPES = {**_DTYPES, "fp8": FP8, "fp8_e4m3": FP8}


def cpu_has_fast_bf16() -> bool:
    """True when the CPU advertises bf16 matrix/vector units (AMX-BF16 or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" or cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_kv_cache_dtype(name: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype for `--kv-cache-dtype name` and the model's dtype: auto is the
    model's; the other pairs are a bfloat16 or float8 e4m3 cache under a float32 model and
    a float8 cache under a bfloat16 model, on CPU (the CPU backends read it back widened)."""
    if name == "auto":
        return dtype
    kv = _KV_DTYPES[name]
    if kv == dtype:
        return kv
    model = dtype_name(dtype)
    if not ((dtype == torch.float32 and kv in (torch.bfloat16, FP8))
            or (dtype == torch.bfloat16 and kv == FP8)):
        raise ValueError(f"--kv-cache-dtype {name} under a {model} model: use auto (the "
                         "model's dtype), bfloat16 or fp8 under a float32 model, or fp8 "
                         "under a bfloat16 model")
    if device.type != "cpu":
        raise ValueError(f"--kv-cache-dtype {name} under a {model} model runs on CPU only "
                         "(on GPU use auto)")
    return kv


def keep_quantized(config: EngineConfig) -> bool:
    """Whether to load a GGUF file's Q4_1 (and Q8_0) matrices quantized (see
    EngineConfig.quantization)."""
    from .quant import QuantLinear

    if config.quantization == "none":
        return False
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device) if device.type == "cpu" else None
    if config.quantization == "w4a8":
        check_w4a8(device, dtype)
        return True
    if device.type != "cpu" or not QuantLinear.supported("q4_1", dtype):
        if config.quantization == "q4_1":
            raise ValueError("quantization q4_1 runs on CPU only (a 4-bit CPU kernel: ours in "
                             "bfloat16 or float32, or torch's int4 kernel)")
        return False
    # auto: in bfloat16 (either kernel beats dense bf16 at decode), and in float32 where
    # ours runs (torch's int4 kernel loses to dense float32: 7 vs 14 tok/s single-stream on
    # an AVX2 EPYC).
    from .quant import native_kernel

    return (config.quantization == "q4_1" or dtype == torch.bfloat16
            or native_kernel(dtype) is not None)


def check_w4a8(device: torch.device, dtype: torch.dtype | None) -> None:
    """Raise ValueError (one line naming the flag) where `--quantization w4a8` cannot run."""
    if device.type != "cpu":
        raise ValueError("--quantization w4a8 runs on CPU only (on GPU use auto)")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"--quantization w4a8 runs a float32 or bfloat16 model, not "
                         f"{dtype_name(dtype)}")
    from .quant import a8_kernel

    if a8_kernel(dtype) is None:
        raise ValueError("--quantization w4a8 needs its AVX2/FMA/F16C kernel "
                         "(engine/csrc/quant_gemm_a8.c), which did not build or run here")


#: The CPU KV cache's size when --kv-cache-memory is not given.
DEFAULT_KV_CACHE_MEMORY = 1 << 30


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, config: EngineConfig, model_cfg: ModelConfig,
                 state_dict: dict[str, torch.Tensor], max_model_len: int) -> None:
        self.config = config
        self.model_cfg = model_cfg
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype, self.device)
        if config.quantization == "w4a8":
            check_w4a8(self.device, self.dtype)
        self.block_size = config.block_size
        self.model = LlamaForCausalLM(model_cfg, self.dtype, self.device, max_model_len,
                                      int8_activations=config.quantization == "w4a8")
        self.model.load_weights(state_dict)
        self.attn = get_backend(config.attention_backend, self.device, self.dtype)
        self.num_blocks = self._num_blocks()
        shape = (self.num_blocks, model_cfg.num_layers, 2, self.block_size,
                 model_cfg.num_kv_heads, model_cfg.head_dim)
        if self.device.type == "cpu":  # read at random every step: see engine/hugepages.py
            self.kv_cache = zeros_huge(shape, self.kv_dtype)
        else:
            self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.sampler = Sampler()
        logger.info(
            "model runner: %s on %s, %d KV blocks of %d tokens (%s, %.1f MiB), attention=%s, "
            "weights=%s", self.dtype, self.device, self.num_blocks, self.block_size,
            dtype_name(self.kv_dtype), self.kv_cache.nbytes / 2**20,
            self.attn.name, self.model.weight_format,
        )

    def _num_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = kv_block_bytes(self.model_cfg, self.block_size, self.kv_dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = int(total * cfg.gpu_memory_utilization) - used - (512 << 20)
        else:
            budget = cfg.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY
        n = budget // per_block
        if n < 1:
            raise ValueError(
                f"KV cache budget of {budget} bytes holds no block of {per_block} bytes; "
                "raise --kv-cache-memory / --gpu-memory-utilization"
            )
        return int(n)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[dict[str, int], dict[str, TokenLogprob]]:
        """Run one step; returns sampled token per request that reached its last known token."""
        # Decodes (one query token) first: the attention backend batches them.
        items = sorted(out.scheduled, key=lambda s: s.num_new_tokens != 1)
        ids: list[int] = []
        pos: list[int] = []
        logit_rows: list[int] = []
        sample_reqs = []
        for s in items:
            req = s.request
            ids.extend(req.all_token_ids[s.start : s.start + s.num_new_tokens])
            pos.extend(range(s.start, s.start + s.num_new_tokens))
            if s.samples:
                logit_rows.append(len(ids) - 1)
                sample_reqs.append(req)
        meta = build_metadata(
            [s.num_new_tokens for s in items],
            [s.start for s in items],
            [[b.block_id for b in s.request.blocks] for s in items],
            self.block_size,
            self.device,
        )
        dev = self.device
        self.attn.begin_step(meta, self.kv_cache, self.model_cfg.num_heads,
                             self.model_cfg.num_kv_heads, self.model_cfg.head_dim)
        hidden = self.model.forward(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            self.kv_cache, self.attn, meta,
        )
        if not sample_reqs:
            return {}, {}
        logits = self.model.compute_logits(hidden[torch.tensor(logit_rows, device=dev)])
        tokens, logprobs = self.sampler(logits.cpu() if dev.type != "cpu" else logits, sample_reqs)
        sampled = {r.request_id: t for r, t in zip(sample_reqs, tokens)}
        lps = {r.request_id: lp for r, lp in zip(sample_reqs, logprobs) if lp is not None}
        return sampled, lps
