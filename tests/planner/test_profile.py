"""Profile format: validation, round trip, interpolation."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from splitserve.planner import profile as profile_mod
from splitserve.planner.profile import Profile, ProfileError, load_profile, save_profile

from .factories import analytic_profile, analytic_profile_dict


def itl_formula(b, ctx):
    return 10.0 + 0.1 * b + 0.05 * b * ctx / 1000.0


def test_round_trip(tmp_path, profile):
    path = tmp_path / "p.json"
    save_profile(profile, path)
    again = load_profile(path)
    assert again.to_dict() == profile.to_dict()
    assert again.kv_capacity_tokens == 400_000
    assert again.max_decode_batch == 256


def test_prefill_interpolation(profile):
    # On grid, between points (linear in isl), clamped below, extended above.
    assert profile.prefill_ttft_ms(1024) == pytest.approx(20 + 1024 / 20)
    assert profile.prefill_ttft_ms(3000) == pytest.approx(20 + 3000 / 20)
    assert profile.prefill_ttft_ms(16384) == pytest.approx(20 + 16384 / 20)
    assert profile.prefill_ttft_ms(10) == pytest.approx(profile.prefill_ttft_ms(128))
    assert profile.prefill_tok_s(3000) == pytest.approx(20000)
    arr = profile.prefill_ttft_ms(np.array([512.0, 2048.0]))
    assert np.allclose(arr, [20 + 512 / 20, 20 + 2048 / 20])


@pytest.mark.parametrize("b,ctx", [(1, 256), (10, 3100), (100, 3000), (64, 4096), (200, 1500), (3, 100)])
def test_decode_itl_is_exact_for_bilinear_profile(profile, b, ctx):
    # ITL is bilinear in (batch, context), so interpolation (including the extension of
    # beyond-capacity cells along context, and the clamp below the smallest context) is exact
    # except for the clamp.
    expected = itl_formula(b, max(ctx, 256))
    assert profile.decode_itl_ms(b, ctx) == pytest.approx(expected)


def test_decode_unservable_points(profile):
    assert math.isinf(profile.decode_itl_ms(300, 256))  # above the largest measured batch
    assert math.isinf(profile.decode_itl_ms(200, 4096))  # 819200 tokens > KV capacity
    assert profile.decode_tok_s(200, 4096) == 0.0
    assert profile.decode_tok_s(0, 1024) == 0.0


def test_decode_tok_s_on_grid_and_below_first_batch(profile):
    assert profile.decode_tok_s(16, 1024) == pytest.approx(16 * 1000 / itl_formula(16, 1024))
    # below the first measured batch: linear to zero
    assert profile.decode_tok_s(0.5, 1024) == pytest.approx(0.5 * 1000 / itl_formula(1, 1024))


def test_max_decode_batch_meeting_itl(profile):
    # ctx 1000: itl = 10 + 0.15 b <= 25  ->  b <= 100
    assert profile.max_decode_batch_meeting_itl(25.0, 1000) == 100
    # KV-limited: 400000 // 3100 = 129 sequences, whose ITL (42.9 ms) meets 50 ms
    assert profile.max_decode_batch_meeting_itl(50.0, 3100) == 129
    # batch 1 misses the target
    assert profile.max_decode_batch_meeting_itl(5.0, 1000) == 0
    # a context that does not fit even once
    assert profile.max_decode_batch_meeting_itl(1e9, 500_000) == 0


def _broken(mutate):
    doc = analytic_profile_dict()
    mutate(doc)
    return doc


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda d: d.update(version=2), "version"),
        (lambda d: d["metadata"].pop("machine"), "metadata.machine"),
        (lambda d: d["metadata"].update(kv_capacity_tokens=-1), "metadata.kv_capacity_tokens"),
        (lambda d: d["prefill"].update(isl=[128, 64, 512, 1024, 2048, 4096]), "prefill.isl"),
        (lambda d: d["prefill"].update(ttft_ms=[1.0, 2.0]), "prefill.ttft_ms"),
        (lambda d: d["prefill"]["tok_s"].__setitem__(0, -5), "prefill.tok_s[0]"),
        (lambda d: d["decode"]["itl_ms"][0].__setitem__(0, None), "decode.itl_ms[0][0]"),
        (lambda d: d["decode"]["tok_s"][5].__setitem__(4, 1.0), "decode.tok_s[5][4]"),
        (lambda d: d["decode"]["itl_ms"].pop(), "decode.itl_ms"),
        (lambda d: d["decode"].update(context="many"), "decode.context"),
    ],
)
def test_validation_names_the_field(mutate, field):
    with pytest.raises(ProfileError) as exc:
        Profile.from_dict(_broken(mutate))
    assert field in str(exc.value)


def test_row_beyond_capacity_everywhere_is_rejected():
    doc = analytic_profile_dict(batch=(1, 4, 2000), kv_capacity_tokens=400_000)
    with pytest.raises(ProfileError, match="fits no context"):
        Profile.from_dict(doc)


def test_missing_default_profile_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(profile_mod, "default_profile_path", lambda: tmp_path / "absent.json")
    with pytest.raises(ProfileError, match="splitserve profile"):
        load_profile(None)
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "other.json")


def test_unreadable_profile(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(path)


def test_from_dict_does_not_alias_input():
    doc = analytic_profile_dict()
    before = copy.deepcopy(doc)
    p = Profile.from_dict(doc)
    p.metadata["model"] = "changed"
    assert doc == before
    assert json.loads(json.dumps(p.to_dict()))["version"] == 1


def test_analytic_factory_is_consistent():
    p = analytic_profile(itl_per_seq_ms=1.0)
    assert p.decode_itl_ms(4, 1024) == pytest.approx(10 + 4.0 + 0.05 * 4 * 1.024)
