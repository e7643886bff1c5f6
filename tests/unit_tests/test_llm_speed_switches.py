"""`MLXPipeline` takes the per-call speed switches `ChatMLX` takes."""

from __future__ import annotations

from langchain_mlx import MLXPipeline
from tests.costs import fixed_costs

PROMPT = "one two three four five six seven eight " * 6


def test_speed_switches_per_call(tiny_model_path: str) -> None:
    llm = MLXPipeline(model_id=tiny_model_path, pipeline_kwargs={"max_tokens": 24})

    def run(**switches: object) -> tuple[str, dict[str, object]]:
        generation = llm.generate([PROMPT], temperature=0.0, **switches)
        chunk = generation.generations[0][0]
        return chunk.text, dict(chunk.generation_info or {})

    with fixed_costs(llm.engine):  # drafts decided the same whatever the load
        text, info = run()
        assert info["drafted_tokens"]  # prompt lookup is on by default
        for switches in (
            {"prompt_lookup": False},
            {"num_draft_tokens": 0},
            {"prompt_lookup": False, "fast_forward": False},
        ):
            plain, plain_info = run(**switches)
            assert plain_info["drafted_tokens"] == 0, switches
            assert plain == text  # greedy output does not depend on speculation
        assert llm.invoke(PROMPT, temperature=0.0, prompt_lookup=False) == text
