"""The performance profile the planner reads: format, validation, interpolation.

A profile is one JSON file measured on real hardware by `splitserve profile`:

```json
{
  "version": 1,
  "metadata": {"model": "smollm2-135m", "dtype": "bfloat16", "threads": 2,
               "block_size": 16, "machine": "…", "device": "cpu",
               "kv_capacity_tokens": 65536, "created_at": "…"},
  "prefill": {"isl": [128, 512, 2048], "ttft_ms": […], "tok_s": […]},
  "decode": {"batch": [1, 8, 32], "context": [256, 1024, 4096],
             "itl_ms": [[…], […], […]], "tok_s": [[…], […], […]]}
}
```

- `prefill`: for each input length (no prefix reuse) the time to first token of one
  request on an idle replica, and the replica's prefill throughput (prompt tokens per
  second) at that length.
- `decode`: a grid over concurrency (rows, `batch`) and context length (columns,
  `context`): inter-token latency and decode throughput (generated tokens per second of
  the whole replica). A cell whose `batch × context` exceeds `kv_capacity_tokens` cannot be
  measured and is `null`; every other cell must hold a number.

Interpolation is piecewise linear. Prefill: below the smallest input length the first
point is used (conservative), above the largest the last segment is extended. Decode:
context below the grid is clamped, above it the last segment is extended; a `null` cell
(beyond KV capacity) is filled for interpolation by extending its row along context; a
batch above the largest measured one, or `batch × context` above the KV capacity, is not
servable: ITL is `inf` and throughput `0`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Version of the profile file format this module reads and writes.
PROFILE_FORMAT_VERSION = 1

#: Where commands look for a profile when `--profile` is not given (relative to the package).
DEFAULT_PROFILE_NAME = "smollm2-135m-cpu.json"

#: Metadata keys every profile must carry.
REQUIRED_METADATA = ("model", "dtype", "threads", "block_size", "machine", "kv_capacity_tokens")


class ProfileError(ValueError):
    """A profile file that is missing, unreadable or inconsistent; the message names the field."""


def default_profile_path() -> Path:
    """`planner/profiles/smollm2-135m-cpu.json` inside the installed package (may not exist)."""
    return Path(__file__).resolve().parent / "profiles" / DEFAULT_PROFILE_NAME


def resolve_profile_path(path: str | Path | None) -> Path:
    """The profile to use: `path` if given, else the default; raises ProfileError if absent."""
    p = Path(path) if path else default_profile_path()
    if not p.is_file():
        if path:
            raise ProfileError(f"profile file {p} does not exist")
        raise ProfileError(
            f"no default profile at {p}: measure one with `splitserve profile --json FILE` "
            "on the target hardware and pass it with --profile FILE"
        )
    return p


def _float_list(value: Any, where: str, *, allow_null: bool = False) -> list[float]:
    if not isinstance(value, list) or not value:
        raise ProfileError(f"{where}: expected a non-empty list of numbers")
    out: list[float] = []
    for i, v in enumerate(value):
        if v is None and allow_null:
            out.append(math.nan)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ProfileError(f"{where}[{i}]: expected a positive finite number, got {v!r}")
        out.append(float(v))
    return out


def _increasing(values: list[float], where: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if np.any(np.diff(arr) <= 0):
        raise ProfileError(f"{where}: values must be strictly increasing, got {values}")
    return arr


def _extend_row(row: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """Fill trailing NaNs of one decode row by extending its last measured segment."""
    valid = np.flatnonzero(~np.isnan(row))
    out = row.copy()
    last = valid[-1]
    if valid.size == 1:
        out[last + 1 :] = row[last]
        return out
    prev = valid[-2]
    slope = (row[last] - row[prev]) / (axis[last] - axis[prev])
    out[last + 1 :] = row[last] + slope * (axis[last + 1 :] - axis[last])
    return out


def _interp_extend(x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """np.interp, clamped on the left and extending the last segment on the right."""
    y = np.interp(x, xs, ys)
    if xs.size >= 2:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        right = x > xs[-1]
        if np.any(right):
            y = np.where(right, ys[-1] + slope * (x - xs[-1]), y)
    return y


@dataclass(frozen=True, eq=False)
class Profile:
    """A validated profile; build it with `Profile.from_dict` / `load_profile`."""

    #: Model, dtype, threads, block size, machine, KV capacity, and anything else recorded.
    metadata: dict[str, Any]
    #: Prefill input lengths (tokens), strictly increasing.
    prefill_isl: np.ndarray
    #: TTFT of one request on an idle replica at each input length (ms).
    prefill_ttft: np.ndarray
    #: Prefill throughput of one replica at each input length (prompt tokens/s).
    prefill_tps: np.ndarray
    #: Decode concurrency axis (requests in the running batch), strictly increasing.
    decode_batch: np.ndarray
    #: Decode context-length axis (tokens), strictly increasing.
    decode_context: np.ndarray
    #: ITL grid [batch, context] (ms); NaN where beyond KV capacity.
    decode_itl: np.ndarray
    #: Decode throughput grid [batch, context] (generated tokens/s per replica); NaN likewise.
    decode_tps: np.ndarray
    #: Grids with the beyond-capacity cells filled by extension (interpolation only).
    _itl_filled: np.ndarray = field(repr=False, default=None)  # type: ignore[assignment]
    _tps_filled: np.ndarray = field(repr=False, default=None)  # type: ignore[assignment]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Any) -> "Profile":
        """Validate a parsed profile document; raises ProfileError naming the bad field."""
        if not isinstance(data, dict):
            raise ProfileError("profile: expected a JSON object")
        version = data.get("version")
        if version != PROFILE_FORMAT_VERSION:
            raise ProfileError(f"version: expected {PROFILE_FORMAT_VERSION}, got {version!r}")
        meta = data.get("metadata")
        if not isinstance(meta, dict):
            raise ProfileError("metadata: expected an object")
        for key in REQUIRED_METADATA:
            if key not in meta:
                raise ProfileError(f"metadata.{key}: missing")
        kv_cap = meta["kv_capacity_tokens"]
        if isinstance(kv_cap, bool) or not isinstance(kv_cap, int) or kv_cap <= 0:
            raise ProfileError(f"metadata.kv_capacity_tokens: expected a positive integer, got {kv_cap!r}")

        pre = data.get("prefill")
        if not isinstance(pre, dict):
            raise ProfileError("prefill: expected an object")
        isl = _increasing(_float_list(pre.get("isl"), "prefill.isl"), "prefill.isl")
        ttft = np.asarray(_float_list(pre.get("ttft_ms"), "prefill.ttft_ms"))
        ptps = np.asarray(_float_list(pre.get("tok_s"), "prefill.tok_s"))
        for name, arr in (("ttft_ms", ttft), ("tok_s", ptps)):
            if arr.size != isl.size:
                raise ProfileError(f"prefill.{name}: {arr.size} values for {isl.size} input lengths")

        dec = data.get("decode")
        if not isinstance(dec, dict):
            raise ProfileError("decode: expected an object")
        batch = _increasing(_float_list(dec.get("batch"), "decode.batch"), "decode.batch")
        ctx = _increasing(_float_list(dec.get("context"), "decode.context"), "decode.context")
        grids = {}
        for name in ("itl_ms", "tok_s"):
            rows = dec.get(name)
            if not isinstance(rows, list) or len(rows) != batch.size:
                raise ProfileError(f"decode.{name}: expected {batch.size} rows (one per batch size)")
            grid = np.empty((batch.size, ctx.size))
            for i, row in enumerate(rows):
                vals = _float_list(row, f"decode.{name}[{i}]", allow_null=True)
                if len(vals) != ctx.size:
                    raise ProfileError(f"decode.{name}[{i}]: {len(vals)} values for {ctx.size} context lengths")
                grid[i] = vals
            grids[name] = grid
        fits = batch[:, None] * ctx[None, :] <= kv_cap
        for name, grid in grids.items():
            missing = np.argwhere(np.isnan(grid) & fits)
            if missing.size:
                i, j = missing[0]
                raise ProfileError(
                    f"decode.{name}[{i}][{j}]: null, but batch {batch[i]:g} × context {ctx[j]:g} "
                    f"fits the KV capacity ({kv_cap} tokens)"
                )
            extra = np.argwhere(~np.isnan(grid) & ~fits)
            if extra.size:
                i, j = extra[0]
                raise ProfileError(
                    f"decode.{name}[{i}][{j}]: batch {batch[i]:g} × context {ctx[j]:g} exceeds the KV "
                    f"capacity ({kv_cap} tokens); such cells must be null"
                )
            # Each row must have a measured prefix (nulls only at the end of the row).
            for i in range(batch.size):
                if np.isnan(grid[i, 0]):
                    raise ProfileError(
                        f"decode.{name}[{i}]: batch {batch[i]:g} fits no context length; drop the row"
                    )
        return cls(
            metadata=dict(meta),
            prefill_isl=isl,
            prefill_ttft=ttft,
            prefill_tps=ptps,
            decode_batch=batch,
            decode_context=ctx,
            decode_itl=grids["itl_ms"],
            decode_tps=grids["tok_s"],
        )

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"Profile(model={m.get('model')!r}, machine={m.get('machine')!r}, "
            f"isl {self.prefill_isl[0]:g}..{self.prefill_isl[-1]:g}, batch {self.decode_batch[0]:g}.."
            f"{self.decode_batch[-1]:g}, context {self.decode_context[0]:g}..{self.decode_context[-1]:g}, "
            f"kv {self.kv_capacity_tokens})"
        )

    def __post_init__(self) -> None:
        itl = np.vstack([_extend_row(r, self.decode_context) for r in self.decode_itl])
        tps = np.vstack([_extend_row(r, self.decode_context) for r in self.decode_tps])
        object.__setattr__(self, "_itl_filled", itl)
        object.__setattr__(self, "_tps_filled", np.maximum(tps, 0.0))

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (inverse of from_dict)."""

        def grid(g: np.ndarray) -> list[list[float | None]]:
            return [[None if math.isnan(v) else float(v) for v in row] for row in g]

        return {
            "version": PROFILE_FORMAT_VERSION,
            "metadata": dict(self.metadata),
            "prefill": {
                "isl": [float(v) for v in self.prefill_isl],
                "ttft_ms": [float(v) for v in self.prefill_ttft],
                "tok_s": [float(v) for v in self.prefill_tps],
            },
            "decode": {
                "batch": [float(v) for v in self.decode_batch],
                "context": [float(v) for v in self.decode_context],
                "itl_ms": grid(self.decode_itl),
                "tok_s": grid(self.decode_tps),
            },
        }

    # ------------------------------------------------------------------ properties
    @property
    def kv_capacity_tokens(self) -> int:
        """KV cache capacity of one decode replica (tokens)."""
        return int(self.metadata["kv_capacity_tokens"])

    @property
    def max_decode_batch(self) -> int:
        """Largest measured decode concurrency (the engine's running-batch limit)."""
        return int(self.decode_batch[-1])

    # ------------------------------------------------------------------ prefill
    def prefill_ttft_ms(self, isl: float | np.ndarray) -> float | np.ndarray:
        """TTFT (ms) of one request of `isl` prompt tokens on an idle prefill replica."""
        x = np.asarray(isl, dtype=np.float64)
        y = _interp_extend(x, self.prefill_isl, self.prefill_ttft)
        y = np.maximum(y, self.prefill_ttft.min() * 1e-3)
        return float(y) if y.ndim == 0 else y

    def prefill_tok_s(self, isl: float | np.ndarray) -> float | np.ndarray:
        """Prefill throughput (prompt tokens/s) of one replica for prompts of `isl` tokens."""
        x = np.asarray(isl, dtype=np.float64)
        y = _interp_extend(x, self.prefill_isl, self.prefill_tps)
        y = np.maximum(y, self.prefill_tps.min() * 1e-3)
        return float(y) if y.ndim == 0 else y

    # ------------------------------------------------------------------ decode
    def _decode_interp(self, grid: np.ndarray, batch: Any, ctx: Any) -> np.ndarray:
        b = np.asarray(batch, dtype=np.float64)
        c = np.asarray(ctx, dtype=np.float64)
        b, c = np.broadcast_arrays(b, c)
        bax, cax = self.decode_batch, self.decode_context
        # context: clamp left, extend right (per row), then linear along batch.
        if cax.size >= 2:
            j = np.clip(np.searchsorted(cax, c, side="right") - 1, 0, cax.size - 2)
            c_cl = np.maximum(c, cax[0])
            wc = (c_cl - cax[j]) / (cax[j + 1] - cax[j])
            # rows evaluated at this context, for the two bracketing batch rows
        else:
            j = np.zeros(c.shape, dtype=np.int64)
            wc = np.zeros(c.shape)
        if bax.size >= 2:
            i = np.clip(np.searchsorted(bax, b, side="right") - 1, 0, bax.size - 2)
            b_cl = np.maximum(b, bax[0])
            wb = np.clip((b_cl - bax[i]) / (bax[i + 1] - bax[i]), 0.0, 1.0)
        else:
            i = np.zeros(b.shape, dtype=np.int64)
            wb = np.zeros(b.shape)

        def row_at(ii: np.ndarray) -> np.ndarray:
            if cax.size < 2:
                return grid[ii, 0]
            return grid[ii, j] + wc * (grid[ii, j + 1] - grid[ii, j])

        lo = row_at(i)
        hi = row_at(np.minimum(i + 1, bax.size - 1))
        return lo + wb * (hi - lo)

    def _servable(self, b: np.ndarray, c: np.ndarray) -> np.ndarray:
        return (b <= self.decode_batch[-1] + 1e-9) & (b * np.maximum(c, 1.0) <= self.kv_capacity_tokens)

    def decode_itl_ms(self, batch: Any, ctx: Any) -> Any:
        """ITL (ms) of a replica running `batch` requests at mean context `ctx`; inf if unservable."""
        b = np.asarray(batch, dtype=np.float64)
        c = np.asarray(ctx, dtype=np.float64)
        b, c = np.broadcast_arrays(b, c)
        y = self._decode_interp(self._itl_filled, b, c)
        y = np.maximum(y, self._itl_filled.min() * 1e-3)
        y = np.where(self._servable(b, c), y, np.inf)
        return float(y) if y.ndim == 0 else y

    def decode_tok_s(self, batch: Any, ctx: Any) -> Any:
        """Decode throughput (tokens/s per replica) at `batch` × `ctx`; 0 if unservable.

        Below the smallest measured batch the throughput scales linearly to 0 at batch 0.
        """
        b = np.asarray(batch, dtype=np.float64)
        c = np.asarray(ctx, dtype=np.float64)
        b, c = np.broadcast_arrays(b, c)
        y = self._decode_interp(self._tps_filled, b, c)
        b0 = self.decode_batch[0]
        y = np.where(b < b0, y * np.maximum(b, 0.0) / b0, y)
        y = np.where(self._servable(b, c), np.maximum(y, 0.0), 0.0)
        return float(y) if y.ndim == 0 else y

    def max_decode_batch_for_context(self, ctx: float) -> int:
        """Largest integer batch that fits the KV capacity and the measured grid at `ctx`."""
        by_kv = int(self.kv_capacity_tokens // max(float(ctx), 1.0))
        return max(0, min(self.max_decode_batch, by_kv))

    def max_decode_batch_meeting_itl(self, itl_ms: float, ctx: float) -> int:
        """Largest batch b such that every batch 1..b meets `itl_ms` at context `ctx` (0: none)."""
        cap = self.max_decode_batch_for_context(ctx)
        if cap <= 0:
            return 0
        bs = np.arange(1, cap + 1, dtype=np.float64)
        ok = np.asarray(self.decode_itl_ms(bs, float(ctx))) <= itl_ms
        if not ok[0]:
            return 0
        bad = np.flatnonzero(~ok)
        return int(cap if bad.size == 0 else bad[0])


def load_profile(path: str | Path | None = None) -> Profile:
    """Read and validate a profile file (`None`: the default path); raises ProfileError."""
    p = resolve_profile_path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{p}: cannot read profile: {exc}") from exc
    try:
        return Profile.from_dict(data)
    except ProfileError as exc:
        raise ProfileError(f"{p}: {exc}") from exc


def save_profile(profile: Profile, path: str | Path) -> None:
    """Write `profile` as JSON (what `splitserve profile --json` produces)."""
    Path(path).write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
