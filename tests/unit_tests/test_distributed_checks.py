"""Sharding checks that need no second rank: modes, shapes, what can be shared."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from langchain_mlx import ChatMLX
from langchain_mlx.engine.distributed import check_mode, shareable_request
from langchain_mlx.engine.drafts import StepCosts
from langchain_mlx.engine.types import GenerationSettings, Request
from langchain_mlx.models.sharding import (
    _parts,
    check_shardable,
    sharding_modes,
    uneven_split,
)

SMOLLM2 = {"model_type": "llama", "num_attention_heads": 9,
           "num_key_value_heads": 3, "num_hidden_layers": 30}  # fmt: skip


def test_mlx_lm_sharding_modes_by_architecture() -> None:
    assert sharding_modes("llama") == ("tensor",)
    assert sharding_modes("qwen2") == ("tensor", "pipeline")
    assert sharding_modes("no-such-model") == ()


def test_tensor_sharding_needs_a_key_value_head_per_rank() -> None:
    check_shardable(SMOLLM2, "tensor", 3, "smollm2")  # mlx-lm's: 3 + 1 heads each
    check_shardable(SMOLLM2, "tensor", 2, "smollm2")  # by head groups: 6+2, 3+1
    assert uneven_split(SMOLLM2, 2)
    assert not uneven_split(SMOLLM2, 3)  # even: mlx-lm's own split
    with pytest.raises(ValueError, match=r"9 attention heads and 3 key-value") as e:
        check_shardable(SMOLLM2, "tensor", 4, "smollm2")
    assert "possible: 1, 2, 3" in str(e.value)
    qwen = {"model_type": "qwen2", "num_attention_heads": 14, "num_key_value_heads": 2}
    with pytest.raises(ValueError, match="same number of each") as e:
        check_shardable(qwen, "tensor", 3, "qwen")  # only llama splits unevenly
    assert "possible: 1, 2" in str(e.value)
    assert "distributed='pipeline'" in str(e.value)


def test_head_group_parts_cover_everything_once() -> None:
    assert _parts(3, 2) == [(0, 2), (2, 3)]
    assert _parts(1536, 2) == [(0, 768), (768, 1536)]
    assert _parts(7, 3) == [(0, 3), (3, 5), (5, 7)]


def test_a_mode_the_architecture_lacks_names_the_ones_it_has() -> None:
    with pytest.raises(ValueError, match=r"it can shard it by 'tensor'"):
        check_shardable(SMOLLM2, "pipeline", 2, "smollm2")
    with pytest.raises(ValueError, match="at least one layer per rank"):
        check_shardable({**SMOLLM2, "model_type": "qwen2"}, "pipeline", 40, "q")


def test_unknown_mode() -> None:
    check_mode("tensor")
    check_mode(None)
    with pytest.raises(ValueError, match="'tensor', 'pipeline' or None"):
        check_mode("data")
    with pytest.raises(ValidationError):
        ChatMLX(model="x", distributed="data")  # type: ignore[arg-type]


def test_unmeasured_step_costs_decide_alike_whatever_the_clock() -> None:
    a, b = StepCosts(measured=False), StepCosts(measured=False)
    a.record("lookup", 3, 10.0)  # ignored: ranks' clocks differ
    assert a.best_draft("lookup", 0, 6, 0.9) == b.best_draft("lookup", 0, 6, 0.9)
    assert a.best_draft("lookup", 0, 6, 0.9) > 0  # drafts that are accepted pay
    assert a.best_draft("lookup", 0, 6, 0.05) == 0  # drafts that miss do not


def test_what_cannot_be_sent_to_other_ranks_is_refused() -> None:
    settings = GenerationSettings()
    plain = Request(prompt_ids=[1, 2], settings=settings)
    assert shareable_request(plain) == (plain, None)
    with pytest.raises(ValueError, match="custom logits processors"):
        shareable_request(
            Request(
                prompt_ids=[1], settings=settings, logits_processors=[lambda t, x: x]
            )
        )


def test_outside_mlx_launch_a_distributed_model_loads_normally(
    tiny_model_path: str,
) -> None:
    chat = ChatMLX(model=tiny_model_path, distributed="tensor", max_tokens=3)
    assert chat.llm is not None
    assert chat.llm.engine.sharded is None
    assert chat.invoke("Hi").usage_metadata is not None


def test_the_grammar_spec_rebuilds_the_same_constraint(tiny_model_path: str) -> None:
    from langchain_mlx._constraints import (
        ConstraintCompiler,
        constraint_from_spec,
        json_schema_grammar,
    )
    from langchain_mlx.llms import MLXPipeline

    tokenizer = MLXPipeline.from_model_id(tiny_model_path).tokenizer
    grammar = json_schema_grammar({"type": "object", "properties": {
        "a": {"enum": ["x", "y"]}}, "required": ["a"]})  # fmt: skip
    original = ConstraintCompiler.for_tokenizer(tokenizer).processor(grammar, "s")
    copy = constraint_from_spec(tokenizer, original.spec)
    assert copy.spec == original.spec
    copy.sync([1, 2])
    original.sync([1, 2])
    assert copy.forced_tokens() == original.forced_tokens()
    assert json.loads(json.dumps(list(original.spec)))[1] == "s"
