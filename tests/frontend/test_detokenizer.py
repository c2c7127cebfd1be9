"""Incremental detokenization equals a full decode, also with characters split over tokens."""

import random

import pytest

from splitserve.frontend.detokenizer import IncrementalDetokenizer

from .fakes import FakeHFTokenizer, fake_tokenizer

SAMPLES = ["héllo wörld", "日本語のテキスト", "emoji 🙂🚀 mix", "plain ascii", "Ωmega ∑ ∞ ≠"]


def stream(tok, ids, chunk_sizes):
    d = IncrementalDetokenizer(tok)
    pieces = []
    i = 0
    for n in chunk_sizes:
        if i >= len(ids):
            break
        pieces.append(d.add(ids[i : i + n]))
        i += n
    if i < len(ids):
        pieces.append(d.add(ids[i:]))
    pieces.append(d.flush())
    return pieces


@pytest.mark.parametrize("text", SAMPLES)
def test_one_token_at_a_time_never_emits_broken_characters(text):
    tok = fake_tokenizer()
    ids = tok.encode(text)
    pieces = stream(tok, ids, [1] * len(ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("seed", range(10))
def test_random_batches_equal_full_decode(seed):
    rng = random.Random(seed)
    tok = fake_tokenizer()
    text = "".join(rng.choice(SAMPLES) for _ in range(4))
    ids = tok.encode(text)
    sizes = [rng.randint(1, 5) for _ in range(len(ids))]
    assert "".join(stream(tok, ids, sizes)) == tok.decode(ids)


def test_incomplete_character_at_end_is_flushed_as_replacement():
    tok = fake_tokenizer()
    ids = tok.encode("ok 日")[:-1]  # cut the last byte of 日
    pieces = stream(tok, ids, [1] * len(ids))
    assert "".join(pieces) == tok.decode(ids)
    assert pieces[-1].endswith("\ufffd")


def test_special_tokens_are_skipped():
    tok = fake_tokenizer()
    ids = tok.encode("hi") + [FakeHFTokenizer.eos_token_id]
    assert "".join(stream(tok, ids, [1, 1, 1])) == "hi"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    try:
        from splitserve.frontend.tokenizer import load_frontend_tokenizer

        return load_frontend_tokenizer("smollm2-135m")[0]
    except Exception as exc:  # noqa: BLE001 - the default model package is optional
        pytest.skip(f"default model not available: {exc}")


def test_real_bpe_tokenizer_multibyte_split(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "Hello 日本語 🙂 world — naïve café"
    ids = tok.encode(text, add_special_tokens=False)
    # This tokenizer splits 日 and 🙂 over several byte tokens.
    assert any(tok.token_text(i) == "\ufffd" for i in ids)
    pieces = stream(tok, ids, [1] * len(ids))
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    # raw bytes of the tokens reassemble the UTF-8 text exactly
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
