"""`dry-run` connector: records decisions (in memory and optionally as JSONL), changes nothing.

Each applied decision becomes "the current pool sizes", so the planner loop behaves as if
the change had happened at once.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import IO, Any

from splitserve.planner.types import Decision

log = logging.getLogger(__name__)


class DryRunConnector:
    """Pretends to apply decisions; `decisions` keeps them, `record_path` gets one JSON line each."""

    def __init__(
        self, *, prefill_replicas: int = 1, decode_replicas: int = 1, record_path: str | Path | None = None
    ) -> None:
        if prefill_replicas < 0 or decode_replicas < 0:
            raise ValueError("initial replica counts must be >= 0")
        self._current = (int(prefill_replicas), int(decode_replicas))
        self.decisions: list[Decision] = []
        self.record_path = Path(record_path) if record_path else None
        self._file: IO[str] | None = None
        if self.record_path is not None:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.record_path.open("a", encoding="utf-8")

    def current(self) -> tuple[int, int]:
        return self._current

    def apply(self, decision: Decision) -> None:
        before = self._current
        self._current = (decision.prefill_replicas, decision.decode_replicas)
        self.decisions.append(decision)
        record: dict[str, Any] = {"recorded_at": time.time(), "before": list(before), **decision.to_dict()}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        log.info(
            "dry-run: prefill %d -> %d, decode %d -> %d (%s)",
            before[0], self._current[0], before[1], self._current[1], decision.reason,
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
