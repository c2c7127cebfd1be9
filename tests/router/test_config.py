"""RouterConfig validation and its CLI flags."""

import argparse

import pytest

from splitserve.frontend.routing import add_router_args, router_config_from_args
from splitserve.router.config import RouterConfig


@pytest.mark.parametrize("kw", [
    {"mode": "fastest"},
    {"block_size": 0},
    {"block_size": 4.0},
    {"overlap_weight": -1.0},
    {"decode_overlap_weight": float("nan")},
    {"temperature": -0.1},
    {"temperature": float("inf")},
    {"max_active_blocks_frac": 0.0},
    {"max_active_blocks_frac": 1.5},
    {"max_queue": 0},
    {"retry_after_s": 0},
    {"approx_ttl_s": -1},
    {"stats_ttl_s": float("inf")},
    {"request_timeout_s": 0},
    {"approx_max_blocks": 0},
    {"resync_buffer_batches": -1},
])
def test_invalid_fields_raise(kw):
    with pytest.raises(ValueError):
        RouterConfig(**kw)


def test_defaults_are_valid_and_frozen():
    cfg = RouterConfig()
    assert cfg.mode == "kv" and cfg.temperature == 0.0
    with pytest.raises(AttributeError):
        cfg.mode = "random"  # type: ignore[misc]


def test_cli_flags_map_onto_fields():
    parser = argparse.ArgumentParser()
    add_router_args(parser)
    args = parser.parse_args(["--router-mode", "round-robin", "--router-temperature", "0.3",
                              "--router-max-active-blocks-frac", "0.8", "--router-max-queue", "7",
                              "--router-block-size", "32", "--router-seed", "5"])
    cfg = router_config_from_args(args)
    assert (cfg.mode, cfg.temperature, cfg.max_active_blocks_frac, cfg.max_queue,
            cfg.block_size, cfg.seed) == ("round-robin", 0.3, 0.8, 7, 32, 5)
    assert router_config_from_args(parser.parse_args([])) == RouterConfig()
    assert router_config_from_args(parser.parse_args([]), block_size=8).block_size == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["--router-mode", "nope"])
