"""Stop-string matcher: never emits part of a stop string, finds the earliest match."""

import random

import pytest

from splitserve.frontend.stop import StopStringMatcher


def run(stops, pieces):
    m = StopStringMatcher(stops)
    out = []
    for p in pieces:
        text, matched = m.feed(p)
        out.append(text)
        if matched:
            return "".join(out), True
    out.append(m.flush())
    return "".join(out), False


def test_no_stop_passes_through():
    assert run([], ["ab", "cd"]) == ("abcd", False)


def test_match_inside_one_piece_excludes_stop():
    assert run(["STOP"], ["hello STOP world"]) == ("hello ", True)


def test_match_split_across_pieces_is_held_back():
    m = StopStringMatcher(["</end>"])
    assert m.feed("abc</") == ("abc", False)  # "</" could start the stop string
    assert m.feed("en") == ("", False)
    assert m.feed("d>tail") == ("", True)


def test_held_text_released_when_it_stops_looking_like_a_stop():
    m = StopStringMatcher(["xyz"])
    assert m.feed("abx") == ("ab", False)
    assert m.feed("q") == ("xq", False)
    assert m.flush() == ""


def test_flush_releases_held_prefix_at_natural_end():
    m = StopStringMatcher(["xyz"])
    assert m.feed("abxy") == ("ab", False)
    assert m.flush() == "xy"


def test_earliest_of_several_stops_wins():
    m = StopStringMatcher(["world", "lo w"])
    assert m.feed("hello world") == ("hel", True)
    assert m.matched == "lo w"


@pytest.mark.parametrize("seed", range(20))
def test_random_chunking_equals_whole_text(seed):
    rng = random.Random(seed)
    alphabet = "ab\n日"
    text = "".join(rng.choice(alphabet) for _ in range(60))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(2)]
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    expected = (text[:first], True) if first >= 0 else (text, False)
    cuts = sorted(rng.sample(range(1, len(text)), 10))
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    assert run(stops, pieces) == expected
