"""engine/hugepages.py: the KV cache asks for transparent huge pages."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from splitserve.engine.hugepages import HUGE_PAGE, advise_huge_pages, zeros_huge

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The bracketed mode of THP on this kernel (always / madvise / never), or None."""
    try:
        m = re.search(r"\[(\w+)\]", THP.read_text())
    except OSError:
        return None
    return m.group(1) if m else None


def anon_huge_kb(addr: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that holds `addr`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m.group(1), 16) <= addr < int(m.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_zeros_huge_is_zeros_of_the_shape():
    t = zeros_huge((5, 3, 1 << 18), torch.bfloat16)
    assert t.shape == (5, 3, 1 << 18) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert not t.any()


def test_advises_only_whole_huge_pages_of_the_buffer():
    small = torch.empty(1000, dtype=torch.uint8)  # spans no aligned 2 MB page
    assert advise_huge_pages(small) == 0
    if not sys.platform.startswith("linux"):
        pytest.skip("madvise is Linux only")
    big = torch.empty(16 * HUGE_PAGE, dtype=torch.uint8)
    advised = advise_huge_pages(big)
    # the aligned interior: at most one huge page lost at each end
    assert 14 * HUGE_PAGE <= advised <= 16 * HUGE_PAGE
    assert advised % HUGE_PAGE == 0


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"),
                    reason="transparent huge pages are off on this kernel")
def test_zeros_huge_memory_is_in_huge_pages():
    t = zeros_huge((32 * HUGE_PAGE // 2,), torch.bfloat16)
    # Huge pages can run out (fragmented memory); most of 64 MB should still get them.
    assert anon_huge_kb(t.data_ptr() + 16 * HUGE_PAGE) >= 16 * HUGE_PAGE // 1024
