"""Small synthetic profiles for planner tests (never shipped as a real profile).

`analytic_profile` evaluates simple closed forms on a grid, so tests can hand-compute what
the interpolation and the SLO math must return:

- prefill: ttft_ms(isl) = ttft_base + isl / prefill_tok_s * 1000, throughput constant;
- decode: itl_ms(b, ctx) = itl_base + itl_per_seq * b + itl_per_ktok * b * ctx / 1000,
  tok_s = b * 1000 / itl_ms; cells with b * ctx > kv_capacity are null.

Run as a script to write one (for `splitserve simulate --profile` experiments), optionally
overriding closed-form parameters:
    .venv/bin/python tests/planner/factories.py /tmp/synthetic-profile.json
    .venv/bin/python tests/planner/factories.py /tmp/cpu-like.json prefill_tok_s=4000 \
        ttft_base_ms=30 itl_base_ms=15 itl_per_seq_ms=0.3 itl_per_ktok_ms=0.1 kv_capacity_tokens=100000
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

DEFAULT_ISL = (128, 512, 1024, 2048, 4096, 8192)
DEFAULT_BATCH = (1, 4, 16, 64, 128, 256)
DEFAULT_CONTEXT = (256, 1024, 2048, 4096, 8192)


def analytic_profile_dict(
    *,
    ttft_base_ms: float = 20.0,
    prefill_tok_s: float = 20000.0,
    itl_base_ms: float = 10.0,
    itl_per_seq_ms: float = 0.1,
    itl_per_ktok_ms: float = 0.05,
    kv_capacity_tokens: int = 400_000,
    isl: Sequence[float] = DEFAULT_ISL,
    batch: Sequence[float] = DEFAULT_BATCH,
    context: Sequence[float] = DEFAULT_CONTEXT,
    machine: str = "synthetic (tests/planner/factories.py)",
) -> dict[str, Any]:
    """A profile document from closed forms (see the module docstring)."""
    ttft = [ttft_base_ms + x / prefill_tok_s * 1000.0 for x in isl]
    itl: list[list[float | None]] = []
    tps: list[list[float | None]] = []
    for b in batch:
        row_i: list[float | None] = []
        row_t: list[float | None] = []
        for c in context:
            if b * c > kv_capacity_tokens:
                row_i.append(None)
                row_t.append(None)
                continue
            v = itl_base_ms + itl_per_seq_ms * b + itl_per_ktok_ms * b * c / 1000.0
            row_i.append(v)
            row_t.append(b * 1000.0 / v)
        itl.append(row_i)
        tps.append(row_t)
    return {
        "version": 1,
        "metadata": {
            "model": "synthetic",
            "dtype": "bfloat16",
            "threads": 1,
            "block_size": 16,
            "machine": machine,
            "device": "synthetic",
            "kv_capacity_tokens": int(kv_capacity_tokens),
        },
        "prefill": {"isl": list(isl), "ttft_ms": ttft, "tok_s": [prefill_tok_s] * len(isl)},
        "decode": {"batch": list(batch), "context": list(context), "itl_ms": itl, "tok_s": tps},
    }


def analytic_profile(**kwargs: Any):
    """A validated `Profile` from `analytic_profile_dict(**kwargs)`."""
    from splitserve.planner.profile import Profile

    return Profile.from_dict(analytic_profile_dict(**kwargs))


def write_profile(path: str | Path, **kwargs: Any) -> Path:
    """Write `analytic_profile_dict(**kwargs)` to `path` as JSON."""
    p = Path(path)
    p.write_text(json.dumps(analytic_profile_dict(**kwargs), indent=2))
    return p


if __name__ == "__main__":
    overrides = {}
    for arg in sys.argv[2:]:
        key, _, value = arg.partition("=")
        overrides[key] = int(value) if key == "kv_capacity_tokens" else float(value)
    out = write_profile(sys.argv[1] if len(sys.argv) > 1 else "synthetic-profile.json", **overrides)
    print(out)
