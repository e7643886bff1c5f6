"""`MLXDecisionModel`: typed decisions from a local model's own distribution.

Flow, by function::

    invoke/ainvoke/batch (BaseDecisionModel: callbacks, tracing, usage)
      -> _classify / _aclassify
           _plan: each question's words (_decisions.question_text), the
                  conversation asking it (_decisions.question_messages),
                  rendered by _messages.render_prompt (the chat template;
                  message text never becomes control tokens); the tokens all
                  renderings of the state share are its prefix
           Engine.call / Engine.acall(scoring.score)    (the model's MLX thread)
                  prefix: prefilled once, kept in the prefix cache;
                  questions: one batch; labels: teacher-forced, one batch each
           _response: _decisions.noul_answer / choice_answer / score_answer,
                      usage (input tokens, of which read from the KV cache)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from langchain_core.decisions import (
    BaseDecisionModel,
    Choice,
    ClassifierResponse,
    Noul,
    Question,
    Score,
    State,
)
from langchain_core.messages import SystemMessage
from pydantic import ConfigDict, Field, PrivateAttr, model_validator
from typing_extensions import Self, override

from langchain_mlx._decisions import (
    DEFAULT_JUDGE_PROMPT,
    PROBE_QUESTIONS,
    AnswerTokens,
    answer_tokens,
    choice_answer,
    end_of_turn_id,
    is_message_state,
    noul_answer,
    question_messages,
    question_text,
    score_answer,
    state_text,
)
from langchain_mlx._messages import render_prompt
from langchain_mlx.chat_models import ChatMLX
from langchain_mlx.engine.engine import Engine
from langchain_mlx.engine.prefix_cache import common_length
from langchain_mlx.engine.scoring import Scores, ScoringQuestion, score
from langchain_mlx.llms import MLXPipeline
from langchain_mlx.models.prepare import DEFAULT_MODEL


@dataclass(frozen=True)
class _Plan:
    """One request, rendered: the shared prefix and each question's tokens."""

    names: list[str]
    questions: list[Question]
    answers: list[AnswerTokens]
    prompts: list[list[int]]
    prefix: list[int]

    def scoring(self) -> list[ScoringQuestion]:
        start = len(self.prefix)
        return [
            ScoringQuestion(prompt[start:], a.candidates, a.continuations)
            for prompt, a in zip(self.prompts, self.answers, strict=True)
        ]


class MLXDecisionModel(BaseDecisionModel):
    """Answer typed questions about a state with a local MLX model's probabilities.

    A `langchain_core.decisions.BaseDecisionModel` on the same engine as
    `ChatMLX` for the same model (one copy of the weights per process). Nothing
    is generated: each answer is read from the model's distribution at the
    answer position, so a decision costs one prefill of the question.

    Setup:
        ```bash
        pip install -e ".[cpu]"   # Linux CPU; `pip install -e .` on Apple silicon
        langchain-mlx models prepare qwen2.5-coder-0.5b-instruct
        ```

    Key init args:
        model: str
            Prepared model name, local MLX folder or Hugging Face repo id
            (default: SmolLM2-135M-Instruct). Shares the engine of every
            `ChatMLX`/`MLXPipeline` on the same model.
        llm: MLXPipeline | ChatMLX | None
            An existing pipeline or chat model to decide with (its engine).
        judge_prompt: str | None
            The system turn for the decision prompts (a message state with
            its own system message keeps that one).

    Instantiate:
        ```python
        from langchain_mlx import ChatMLX, MLXDecisionModel

        judge = MLXDecisionModel(model="qwen2.5-coder-0.5b-instruct")
        # or on a chat model you already have (same engine, same weights):
        judge = MLXDecisionModel(llm=ChatMLX(model="qwen2.5-coder-0.5b-instruct"))
        ```

    Invoke:
        ```python
        from langchain_core.decisions import Choice, Noul, Score

        response = judge.invoke({
            "state": "Production is down for every customer since 9:00!",
            "questions": {
                "urgent": Noul(instructions="Is this message urgent?"),
                "team": Choice(
                    instructions="Which team should handle it?",
                    criteria={"engineering": "Outages and bugs.",
                              "billing": "Invoices and payments.",
                              "marketing": "Feedback and praise."},
                ),
                "severity": Score(
                    instructions="How severe is the problem?",
                    criteria=["No problem.", "Minor.", "Major.", "Critical."],
                ),
            },
        })
        response.nouls["urgent"].noul            # P(yes), e.g. 0.93
        response.choices["team"].choice          # 'engineering'
        response.scores["severity"].score        # the expected level, e.g. 2.4
        response.usage["input_token_details"]    # {'cache_read': ...}
        ```

    How answers are computed:
        - `Noul`: P(yes) is the probability of every single token that spells
          yes (yes, Yes, YES, with or without a leading space) at the answer
          position, renormalised over the yes and no spellings. `criteria`
          are written into the question ("Answer yes if: ...").
        - `Choice`: each label's probability is that of the model answering
          exactly that label and ending its turn (the label's tokens plus the
          end-of-turn token, teacher-forced in one batched pass from the
          question's KV state), renormalised over the labels. `choice` is the
          most probable label and `confidence` its probability.
        - `Score`: the rubric is numbered from 0 and each level scored like a
          `Choice` label (its number); `score` is the expected level,
          `confidence` the probability of the most probable level.
        - `Box`: `ValueError` (text models). Media blocks anywhere in the
          state or questions: `UnsupportedContentError`.

    State:
        A string; messages (rendered with the model's chat template, tool
        calls and tool results included, the question as a last user turn);
        or JSON objects and arrays (as JSON text; messages inside written as
        `{"role", "content", "tool_calls"}` objects).

    One state, many questions:
        The state is rendered first, so every question's prompt starts with
        the same tokens: they are prefilled once and kept in the engine's
        prefix cache (a later request on the same state reads them from
        there), and the questions run as one batch. Asking questions together
        or one at a time gives the same probabilities. `usage`:
        `input_tokens` counts every question's prompt and the answer tokens
        scored; `input_token_details["cache_read"]` those read from the KV
        cache instead of computed; `output_tokens` is 0.

    Async:
        `ainvoke` awaits the engine thread without blocking the event loop;
        `batch`/`abatch`, callbacks and tracing come from `BaseDecisionModel`.
    """

    model: str = DEFAULT_MODEL
    """Prepared model name, local MLX folder, or Hugging Face repo id."""
    llm: MLXPipeline | None = Field(default=None, exclude=True)
    """The pipeline whose engine answers (a `ChatMLX` passed here gives its own)."""
    judge_prompt: str | None = DEFAULT_JUDGE_PROMPT
    """System turn of the decision prompts (None: the chat template's default).
    A message state with a system message of its own keeps that one."""

    model_config = ConfigDict(
        extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True
    )

    _end_of_turn: int | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _chat_model_as_llm(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("llm"), ChatMLX):
            values = {**values, "llm": values["llm"].llm}
        return values

    @model_validator(mode="after")
    def _load(self) -> Self:
        # keyed by the model: re-validation reuses the one engine
        if self.llm is None:
            self.llm = MLXPipeline.from_model_id(self.model)
        elif "model" in self.model_fields_set and self.model != self.llm.model_id:
            msg = (
                f"model={self.model!r} but llm runs {self.llm.model_id!r}: pass one "
                "of them (model= to load a model, or llm= for a loaded one)"
            )
            raise ValueError(msg)
        else:
            self.model = self.llm.model_id
        return self

    @property
    @override
    def _provider(self) -> str:
        return "mlx"

    @property
    def engine(self) -> Engine:
        """The engine that runs the model (shared by every user of the model)."""
        assert self.llm is not None  # set by the validator
        return self.llm.engine

    # -- one request ------------------------------------------------------------

    @override
    def _classify(
        self, state: State, questions: dict[str, Question]
    ) -> ClassifierResponse:
        plan = self._plan(state, questions)
        return self._response(plan, self.engine.call(self._scorer(plan)))

    @override
    async def _aclassify(
        self, state: State, questions: dict[str, Question]
    ) -> ClassifierResponse:
        plan = self._plan(state, questions)
        return self._response(plan, await self.engine.acall(self._scorer(plan)))

    def _scorer(self, plan: _Plan) -> Callable[[], Scores]:
        engine = self.engine
        scoring = plan.scoring()
        return lambda: score(engine.model, engine.prefix_cache, plan.prefix, scoring)

    def _plan(self, state: State, questions: dict[str, Question]) -> _Plan:
        if not questions:
            msg = "no questions: pass at least one Noul, Choice or Score"
            raise ValueError(msg)
        names = list(questions)
        texts = [question_text(name, questions[name]) for name in names]
        tokenizer = self.engine.tokenizer
        if self._end_of_turn is None:
            self._end_of_turn = end_of_turn_id(tokenizer)
        answers = [
            answer_tokens(tokenizer, questions[n], self._end_of_turn) for n in names
        ]
        prepared = None if is_message_state(state) else state_text(state)
        system = SystemMessage(self.judge_prompt) if self.judge_prompt else None

        def render(question: str) -> list[int]:
            messages = question_messages(state, question, prepared_text=prepared)
            return render_prompt(tokenizer, messages, system_message=system)

        prompts = [render(text) for text in texts]
        first, second = (render(text) for text in PROBE_QUESTIONS)
        shared = common_length(first, second, len(first) - 1)
        for prompt in prompts:
            shared = common_length(first, prompt, min(shared, len(prompt) - 1))
        longest = max(
            len(p) + max((len(c) for c in a.continuations), default=0)
            for p, a in zip(prompts, answers, strict=True)
        )
        self.engine.check_fits(longest, 0)
        return _Plan(
            names, [questions[n] for n in names], answers, prompts, first[:shared]
        )

    def _response(self, plan: _Plan, scores: Scores) -> ClassifierResponse:
        answers: dict[str, Any] = {}
        asked = zip(plan.names, plan.questions, plan.answers, strict=True)
        for i, (name, question, tokens) in enumerate(asked):
            if isinstance(question, Noul):
                answers[name] = noul_answer(tokens, scores.candidates[i])
            elif isinstance(question, Choice):
                answers[name] = choice_answer(tokens, scores.continuations[i])
            elif isinstance(question, Score):
                answers[name] = score_answer(question, scores.continuations[i])
        prompt_tokens = sum(len(p) for p in plan.prompts)
        answer_tokens_fed = sum(
            len(c) - 1 for a in plan.answers for c in a.continuations
        )
        # every prompt but the first reads the state's prefix from the KV cache,
        # and the first reads what the prefix cache held of it
        cache_read = (len(plan.prompts) - 1) * len(plan.prefix) + scores.cached_tokens
        usage = {
            "input_tokens": prompt_tokens + answer_tokens_fed,
            "output_tokens": 0,
            "total_tokens": prompt_tokens + answer_tokens_fed,
            "input_token_details": {"cache_read": cache_read},
        }
        return ClassifierResponse(model=self.model, answers=answers, usage=usage)  # type: ignore[arg-type]
