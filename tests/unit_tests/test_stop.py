import pytest

from langchain_mlx._stop import StopMatcher


def feed(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = "".join(m.push(p) for p in pieces) + m.flush()
    return out, m.stopped


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        (["Hello", " Obs", "erv", "ation: x"], "Hello "),  # spans three segments
        (["Observation:"], ""),  # at the very start
        (["a", "bObservation:c"], "ab"),  # inside one segment, with text after
        (["Obs", "cure"], "Obscure"),  # a false start is released
        (["Obs"], "Obs"),  # a partial match at the end is released by flush
    ],
)
def test_stop_string_across_segments(pieces: list[str], expected: str) -> None:
    out, _ = feed(["Observation:"], pieces)
    assert out == expected
    assert "Observation:" not in out


def test_earliest_of_several_stops_wins() -> None:
    out, stopped = feed(["END", "\n\n"], ["one\n", "\ntwo END"])
    assert (out, stopped) == ("one", True)


def test_text_is_released_as_soon_as_it_cannot_start_a_stop() -> None:
    m = StopMatcher(["xyz"])
    assert m.push("abx") == "ab"  # 'x' held back
    assert m.push("q") == "xq"


def test_no_stops_passes_through_and_multibyte_intact() -> None:
    out, stopped = feed([], ["café ", "東京 ", "🚀"])
    assert (out, stopped) == ("café 東京 🚀", False)


def test_nothing_after_stop() -> None:
    m = StopMatcher(["."])
    assert m.push("Paris. More") == "Paris"
    assert m.push("text") == ""
    assert m.flush() == ""
