import pytest

from langchain_mlx._settings import GenerationSettings, canonical_settings


def test_community_names_map_to_settings() -> None:
    raw = {
        "temp": 0.7,
        "max_tokens": 12,
        "top_p": 0.9,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "repetition_context_size": 30,
        "verbose": True,
    }
    s = GenerationSettings().with_overrides(canonical_settings(raw, where="x"))
    assert (s.temperature, s.max_tokens, s.top_p, s.min_p) == (0.7, 12, 0.9, 0.05)
    assert (s.repetition_penalty, s.repetition_context_size) == (1.1, 30)


def test_unknown_setting_is_rejected_with_the_accepted_names() -> None:
    with pytest.raises(
        ValueError, match=r"unknown generation setting 'tempreature'.*temperature"
    ):
        canonical_settings({"tempreature": 1.0}, where="ChatMLX call")


def test_removed_formatter_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="stream"):
        canonical_settings({"formatter": print}, where="pipeline_kwargs")


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"max_tokens": 0},
        {"top_p": 0},
        {"min_p": 2},
        {"top_k": -1},
        {"repetition_penalty": 0},
        {"timeout": 0},
    ],
)
def test_out_of_range_values_fail_early(bad: dict) -> None:
    with pytest.raises(ValueError):
        GenerationSettings().with_overrides(bad)


def test_stop_accepts_a_string_or_list() -> None:
    assert GenerationSettings().with_overrides({"stop": "x"}).stop == ("x",)
    assert GenerationSettings().with_overrides({"stop": ["a", "b"]}).stop == ("a", "b")
    with pytest.raises(TypeError):
        GenerationSettings().with_overrides({"stop": [1]})


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": 2.5},
        {"max_tokens": True},
        {"top_k": 1.5},
        {"seed": "abc"},
        {"temperature": "0.7"},
        {"repetition_context_size": 1.0},
    ],
)
def test_wrong_types_are_rejected_with_the_setting_named(bad: dict) -> None:
    name = next(iter(bad))
    with pytest.raises(TypeError, match=name):
        GenerationSettings().with_overrides(bad)
