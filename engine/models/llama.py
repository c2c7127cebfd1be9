"""Llama-family decoder over a flattened token batch and the paged KV cache.

Covers Llama 2/3 (RoPE scaling), Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm), SmolLM:
RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings. q/k/v and gate/up
projections are fused at load for fewer, larger GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention.base import AttentionBackend, AttentionMetadata
from ..config import ModelConfig
from ..native import (PreparedDecode, load_layer_ops, load_layer_ops_f32, load_layer_stack,
                      load_small_gemm)
from ..quant import Q4_1Weight, Q8_0Weight, QuantLinear, a8_kernel
from .rope import RotaryEmbedding


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: statistics in float32, scale applied in the input dtype."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class Linear:
    """y = x @ W.T (+ b). On CPU in bfloat16 the weight is packed once for the native
    small-GEMM kernel (engine/csrc/small_gemm.c: ~1.7x oneDNN for decode-sized batches on
    this CPU, never slower up to prefill sizes), or where that cannot be built, for oneDNN
    (~2x the generic path for small batches); float32 keeps F.linear so parity tests compare
    like with like."""

    __slots__ = ("weight", "bias", "packed", "gemm", "out_features")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias
        self.packed = None
        self.gemm = None
        self.out_features = weight.shape[0]
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
            return
        gemm = load_small_gemm() if weight.shape[1] % 2 == 0 else None
        if gemm is not None:
            self.gemm, self.packed = gemm, gemm.pack(weight)
            self.bias = None if bias is None else bias.contiguous()
        elif _mkldnn_bf16_linear_ok():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        else:
            return
        self.weight = None  # the packed copy is the one used; don't keep both

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemm is not None:
            if x.stride(-1) != 1:
                x = x.contiguous()
            return self.gemm(x, self.packed, self.out_features, self.bias,
                             torch.get_num_threads())
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _mkldnn_bf16_linear_ok() -> bool:
    """oneDNN's packed bfloat16 linear runs here: torch has the ops and the CPU the
    instructions it needs (AVX512BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only CPU such as AMD
    Zen 3 has neither, and _reorder_linear_weight raises there)."""
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available()
            and all(hasattr(mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise",
                                                   "_is_mkldnn_bf16_supported"))):
        return False
    return bool(mkldnn._is_mkldnn_bf16_supported())


class _Layer:
    __slots__ = ("input_norm", "post_norm", "qkv", "o", "q_norm", "k_norm", "gate_up", "down")


class LlamaForCausalLM:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 max_positions: int, int8_activations: bool = False) -> None:
        """int8_activations (`--quantization w4a8`, float32 or bfloat16 on CPU): every Q4_1
        projection runs the int8-activation kernel at any batch, with no dense copy."""
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.rope = RotaryEmbedding(cfg, max_positions, dtype, device)
        self.layers: list[_Layer] = []
        self.embed: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        self.lm_head: torch.Tensor | None = None
        #: "dense" (every weight in dtype), "quantized" (GGUF Q4_1 / Q8_0 matrices kept so
        #: for small steps, engine/quant.py) or "w4a8" (int8_activations).
        self.weight_format = "dense"
        self.int8_activations = int8_activations
        #: On CPU, the layer's elementwise steps as native calls (or None where not built).
        loader = {torch.bfloat16: load_layer_ops, torch.float32: load_layer_ops_f32}.get(dtype)
        self.ops = loader() if device.type == "cpu" and loader is not None else None

    def load_weights(self, sd: dict[str, torch.Tensor]) -> None:
        """Take HF-named tensors; fuses and casts them. Raises KeyError naming a missing one."""
        cfg = self.cfg

        def raw(name: str) -> torch.Tensor | Q4_1Weight | Q8_0Weight:
            if name not in sd:
                raise KeyError(f"missing weight {name!r} in the checkpoint")
            return sd[name]

        def take(name: str) -> torch.Tensor:
            w = raw(name)
            if isinstance(w, (Q4_1Weight, Q8_0Weight)):
                w = w.dequantize()
            return w.to(device=self.device, dtype=self.dtype).contiguous()

        def quantized(parts: list, bias: torch.Tensor | None, dense: Linear):
            """The parts (row-stacked) kept quantized on CPU where a kernel runs them, with
            `dense` for big steps; else `dense`."""
            kinds = {type(p) for p in parts}
            if (self.device.type != "cpu" or len(kinds) != 1
                    or kinds.pop() not in (Q4_1Weight, Q8_0Weight)
                    or not QuantLinear.supported(parts[0].FORMAT, self.dtype)):
                return dense
            if self.weight_format == "dense":
                self.weight_format = "quantized"
            return QuantLinear(type(parts[0]).cat(parts), bias, self.dtype, dense)

        def linear(names: list[str], bias: torch.Tensor | None = None):
            """One (fused) projection from the row-stacked weights `names`."""
            parts = [raw(n) for n in names]
            if self.int8_activations and all(isinstance(p, Q4_1Weight) for p in parts):
                self.weight_format = "w4a8"
                return QuantLinear(Q4_1Weight.cat(parts), bias, self.dtype,
                                   native=a8_kernel(self.dtype))
            dense = Linear(torch.cat([take(n) for n in names]).contiguous(), bias)
            return quantized(parts, bias, dense)

        self.embed = take("model.embed_tokens.weight")
        self.norm = take("model.norm.weight")
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        self.lm_head = quantized([raw(head)], None,
                                 Linear(self.embed if cfg.tie_word_embeddings else take(head)))
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            layer = _Layer()
            layer.input_norm = take(p + "input_layernorm.weight")
            layer.post_norm = take(p + "post_attention_layernorm.weight")
            a = p + "self_attn."
            qkv_b = (
                torch.cat([take(a + "q_proj.bias"), take(a + "k_proj.bias"),
                           take(a + "v_proj.bias")]).contiguous()
                if cfg.attention_bias else None
            )
            layer.qkv = linear([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
                               qkv_b)
            layer.o = linear([a + "o_proj.weight"])
            layer.q_norm = take(a + "q_norm.weight") if cfg.qk_norm else None
            layer.k_norm = take(a + "k_norm.weight") if cfg.qk_norm else None
            m = p + "mlp."
            layer.gate_up = linear([m + "gate_proj.weight", m + "up_proj.weight"])
            layer.down = linear([m + "down_proj.weight"])
            self.layers.append(layer)
        if self.int8_activations and self.weight_format != "w4a8":
            raise ValueError("--quantization w4a8 runs Q4_1 weights (a GGUF file's); this "
                             "checkpoint has none")
        self._plan_stack()

    def _plan_stack(self) -> None:
        """Where every projection runs a native quantized kernel (float32 on CPU, RoPE in
        the layer ops), a decode step's layers run as one native call (native.LayerStack):
        the plan, and the most rows it takes (the kernels' own limits)."""
        self.stack, self.stack_plan, self.stack_rows = None, None, 0
        stack = load_layer_stack() if (self.dtype == torch.float32 and self.ops is not None
                                       and not self.cfg.qk_norm) else None
        if stack is None:
            return
        rows, layers = float("inf"), []
        for layer in self.layers:
            lins = [layer.qkv, layer.o, layer.gate_up, layer.down]
            args = [lin.native_args() if isinstance(lin, QuantLinear) else None for lin in lins]
            if any(a is None for a in args):
                return
            rows = min([rows] + [lin.rows_on_the_kernel for lin in lins])
            layers.append((layer.input_norm, layer.post_norm, *args))
        cfg = self.cfg
        self.stack_plan = stack.plan(
            layers, self.norm, self.ops, self.rope.cos, self.rope.sin,
            (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
             cfg.intermediate_size), cfg.rms_norm_eps)
        self.stack, self.stack_rows = stack, rows

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                attn: AttentionBackend, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] → final hidden states [T, hidden]."""
        cfg = self.cfg
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = nh * d, nkv * d
        eps = cfg.rms_norm_eps
        inter = cfg.intermediate_size
        ops = self.ops
        native_rope = ops is not None and not cfg.qk_norm  # q and k rotated in place in qkv
        if native_rope and positions.numel() and int(positions.max()) >= self.rope.cos.shape[0]:
            raise IndexError("a position is past the rotary tables (max_model_len)")
        cos, sin = (None, None) if native_rope else self.rope.tables(positions)
        h = F.embedding(input_ids, self.embed)
        T = h.shape[0]
        if (self.stack is not None and isinstance(meta.backend_state, PreparedDecode)
                and T <= self.stack_rows):  # decodes only: the layers in one native call
            return self.stack(self.stack_plan, h, positions, meta.backend_state)
        delta = None  # what the previous block adds to the residual stream
        for li, layer in enumerate(self.layers):
            h, x = self._add_norm(h, delta, layer.input_norm)
            qkv = layer.qkv(x)
            v = qkv[:, q_size + kv_size :].view(T, nkv, d)
            if layer.q_norm is not None:
                q = rms_norm(qkv[:, :q_size].view(T, nh, d), layer.q_norm, eps)
                k = rms_norm(qkv[:, q_size : q_size + kv_size].view(T, nkv, d), layer.k_norm, eps)
                q = self.rope.apply(q, cos, sin)
                k = self.rope.apply(k, cos, sin)
            elif native_rope:
                ops.rope_(qkv, nh + nkv, d, positions, self.rope.cos, self.rope.sin)
                q = qkv[:, :q_size].view(T, nh, d)
                k = qkv[:, q_size : q_size + kv_size].view(T, nkv, d)
            else:  # q and k side by side: one rotation for both
                qk = self.rope.apply(qkv[:, : q_size + kv_size].view(T, nh + nkv, d), cos, sin)
                q, k = qk[:, :nh], qk[:, nh:]
            o = attn.forward(li, q, k, v, kv_cache, meta)
            h, x = self._add_norm(h, layer.o(o), layer.post_norm)
            gu = layer.gate_up(x)
            x = ops.silu_mul(gu) if ops is not None else F.silu(gu[:, :inter]) * gu[:, inter:]
            delta = layer.down(x)
        return self._add_norm(h, delta, self.norm)[1]

    def _add_norm(self, h: torch.Tensor, delta: torch.Tensor | None,
                  weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream plus `delta`, and its RMSNorm (one native call on CPU, which
        updates h in place)."""
        if self.ops is not None:
            return h, self.ops.add_rms_norm(h, delta, weight, self.cfg.rms_norm_eps)
        if delta is not None:
            h = h + delta
        return h, rms_norm(h, weight, self.cfg.rms_norm_eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, hidden] → float32 logits [B, vocab]."""
        return self.lm_head(hidden).float()
