"""Decision questions as prompts and answer tokens, and answers from log-probs. Pure.

The surface (`decisions.py`) asks this module three things:

- `question_messages`: the conversation for one question about a state. The
  state comes first (so every question on it shares its rendering as a token
  prefix), the question last, in a user turn; the answer is the model's next
  turn. A string state and a JSON state (objects and arrays, messages in them
  written as chat-template dicts) become the text of that user turn; a message
  state stays a conversation, with the question as a final user turn.
- `AnswerTokens`: which tokens spell each answer: every single-token spelling
  of yes and no (any case, with or without a leading space) for a `Noul`; each
  label, then the end-of-turn marker, for a `Choice` and a `Score` (so a label
  that is the beginning of another, `tech` and `technical`, is told apart).
- `noul_answer`, `choice_answer`, `score_answer`: answers from log-probabilities.

No mlx here; the unit tests call these functions directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from langchain_core.decisions import (
    Box,
    Choice,
    ChoiceAnswer,
    Noul,
    NoulAnswer,
    Question,
    Score,
    ScoreAnswer,
)
from langchain_core.messages import BaseMessage, HumanMessage, is_data_content_block

from langchain_mlx._json import json_ready
from langchain_mlx._messages import UnsupportedContentError, message_to_dict

DEFAULT_JUDGE_PROMPT = (
    "You are a careful, impartial judge. Read the input, then answer the question "
    "about it with exactly one of the allowed answers and nothing else."
)

_YES_NO = ("yes", "no")
_MEDIA_TYPES = frozenset(
    {"image", "image_url", "audio", "input_audio", "video", "file", "input_image"}
)
# Two questions that differ in their first character: the tokens every
# rendering of a state shares with both are the state's prefix.
PROBE_QUESTIONS = ("A?", "Z?")


# -- the state --------------------------------------------------------------


def is_message_state(state: Any) -> bool:
    """Whether `state` is a message or a non-empty sequence of messages only."""
    if isinstance(state, BaseMessage):
        return True
    return (
        isinstance(state, Sequence)
        and not isinstance(state, str)
        and bool(state)
        and all(isinstance(m, BaseMessage) for m in state)
    )


def state_text(state: Any) -> str:
    """A string or JSON state as the text the model reads.

    Raises:
        UnsupportedContentError: a media block (image, audio, file) is in it.
        ValueError: a value has no JSON form.
        TypeError: the state is not a string, object or array.

    """
    if isinstance(state, str):
        return state
    if state is None or isinstance(state, (int, float, bool)):
        msg = (
            f"the decision state is a {type(state).__name__}; pass a string, "
            "messages, or a JSON object or array"
        )
        raise TypeError(msg)
    return json.dumps(_json_state(state, "state"), ensure_ascii=False)


def _compact_message(message: dict[str, Any]) -> dict[str, Any]:
    """A chat-template message dict without what only the template needs."""
    out = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}
    calls = message.get("tool_calls")
    if calls:
        out["tool_calls"] = [
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in calls
        ]
    return out


def _json_state(value: Any, path: str) -> Any:
    """`value` as JSON: messages as chat-template dicts, media refused."""
    if isinstance(value, BaseMessage):
        return _compact_message(message_to_dict(value, where=path))
    if isinstance(value, Mapping):
        _refuse_media(value, path)
        return {str(k): _json_state(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_json_state(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return json_ready(value, "the decision state", path)


def _refuse_media(block: Mapping[str, Any], path: str) -> None:
    kind = block.get("type")
    if kind in _MEDIA_TYPES or is_data_content_block(dict(block)):
        msg = (
            f"{path} is a content block of type {kind!r}; this model takes text "
            "only. Describe the content in text, or use a multimodal model."
        )
        raise UnsupportedContentError(msg)


def content_text(content: Any, where: str) -> str:
    """Question instructions or criteria (text or JSON) as text."""
    if isinstance(content, str):
        return content
    return json.dumps(_json_state(content, where), ensure_ascii=False)


# -- the question -------------------------------------------------------------


def refuse_box(name: str) -> NoReturn:
    """Raise the error for a `Box` question."""
    msg = (
        f"question {name!r} is a Box: locating regions in images needs a "
        "vision model; MLXDecisionModel runs text models (ask Noul, Choice "
        "or Score questions)"
    )
    raise ValueError(msg)


def question_text(name: str, question: Question) -> str:
    """The words of a question, ending with what to answer.

    Raises:
        ValueError: a `Box` question (text models cannot locate in images).
        UnsupportedContentError: media in the instructions or criteria.

    """
    if isinstance(question, Box):
        refuse_box(name)
    where = f"question {name!r}"
    lines = [content_text(question.instructions, f"{where}.instructions")]
    if isinstance(question, Noul):
        criteria = question.criteria
        for word, described in (
            ("yes", criteria.true if criteria else None),
            ("no", criteria.false if criteria else None),
        ):
            if described is not None:
                text = content_text(described, f"{where}.criteria")
                lines.append(f"Answer {word} if: {text}")
        lines.append("Answer with one word: yes or no.")
    elif isinstance(question, Choice):
        lines.append("Options:")
        for label, described in question.criteria.items():
            text = content_text(described, f"{where}.criteria.{label}")
            lines.append(
                f"- {label}: {text}" if described is not None else f"- {label}"
            )
        lines.append("Answer with the name of one option only.")
    else:
        lines.append("Levels:")
        for level, described in enumerate(question.criteria):
            lines.append(f"{level}: {content_text(described, f'{where}.criteria')}")
        last = len(question.criteria) - 1
        lines.append(f"Answer with one level number only, from 0 to {last}.")
    return "\n".join(lines)


def question_messages(
    state: Any, question: str, *, prepared_text: str | None = None
) -> list[BaseMessage]:
    """The conversation asking `question` (text) about `state`.

    `prepared_text`: `state_text(state)` already computed (a string or JSON state).
    """
    if is_message_state(state):
        history = [state] if isinstance(state, BaseMessage) else list(state)
        return [
            *history,
            HumanMessage(f"Question about the conversation above:\n{question}"),
        ]
    text = state_text(state) if prepared_text is None else prepared_text
    return [HumanMessage(f"Input:\n{text}\n\nQuestion:\n{question}")]


# -- answer tokens -------------------------------------------------------------


def spelling_ids(tokenizer: Any, word: str) -> list[int]:
    """Every single token that spells `word` (lower, Title, UPPER; leading space)."""
    found: list[int] = []
    for spelled in {word.lower(), word.title(), word.upper()}:
        for text in (spelled, " " + spelled):
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            if len(ids) == 1 and ids[0] not in found:
                found.append(ids[0])
    return sorted(found)


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn in the chat template.

    Found by rendering an assistant turn and reading the token after its text
    (`<|im_end|>` in ChatML, `<end_of_turn>` in Gemma's); the tokenizer's EOS
    when the template says nothing after it.
    """
    marker = "\u2063decision\u2063"
    try:
        text = str(
            tokenizer.apply_chat_template(
                [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": marker},
                ],
                tokenize=False,
            )
        )
    except Exception:  # no template, or one that refuses this turn
        text = ""
    tail = text.split(marker, 1)[1] if marker in text else ""
    ids = list(tokenizer.encode(tail, add_special_tokens=False)) if tail.strip() else []
    if ids:
        return int(ids[0])
    return int(tokenizer.eos_token_id)


@dataclass(frozen=True)
class AnswerTokens:
    """What to score for one question, and how to read the scores back."""

    candidates: list[int]
    """Noul: the tokens at the answer position (yes spellings, then no)."""
    yes_count: int
    """How many of `candidates` spell yes."""
    labels: list[str]
    """Choice: the labels; Score: the levels as text ("0", "1", ...)."""
    continuations: list[list[int]]
    """Each label's tokens followed by the end-of-turn token."""


def answer_tokens(tokenizer: Any, question: Question, end_of_turn: int) -> AnswerTokens:
    """The tokens that spell the answers of `question`."""
    if isinstance(question, Noul):
        yes, no = (spelling_ids(tokenizer, w) for w in _YES_NO)
        if not yes or not no:
            msg = (
                "this tokenizer spells neither 'yes' nor 'Yes' (or 'no') as one "
                "token, so a Noul cannot be read from the next-token distribution"
            )
            raise ValueError(msg)
        return AnswerTokens([*yes, *no], len(yes), [], [])
    if isinstance(question, Choice):
        labels = list(question.criteria)
    elif isinstance(question, Score):
        labels = [str(level) for level in range(len(question.criteria))]
    else:
        refuse_box("a Box")
    continuations = [
        [*tokenizer.encode(label, add_special_tokens=False), end_of_turn]
        for label in labels
    ]
    return AnswerTokens([], 0, labels, continuations)


# -- answers ---------------------------------------------------------------------


def logsumexp(values: Sequence[float]) -> float:
    """log(sum(exp(v))) without overflow; -inf for no values."""
    finite = [v for v in values if v != -math.inf]
    if not finite:
        return -math.inf
    top = max(finite)
    return top + math.log(sum(math.exp(v - top) for v in finite))


def normalised(log_scores: Sequence[float]) -> list[float]:
    """Probabilities proportional to exp(log_scores), summing to one."""
    total = logsumexp(log_scores)
    if total == -math.inf:  # nothing has any probability: uniform
        return [1.0 / len(log_scores)] * len(log_scores)
    return [math.exp(v - total) for v in log_scores]


def noul_answer(tokens: AnswerTokens, logprobs: Sequence[float]) -> NoulAnswer:
    """P(yes) = P(any yes spelling) / (P(any yes spelling) + P(any no spelling))."""
    yes = logsumexp(logprobs[: tokens.yes_count])
    no = logsumexp(logprobs[tokens.yes_count :])
    p_yes = normalised([yes, no])[0]
    return NoulAnswer(type="noul", noul=min(max(p_yes, 0.0), 1.0))


def choice_answer(tokens: AnswerTokens, logprobs: Sequence[float]) -> ChoiceAnswer:
    """Labels' sequence probabilities normalised; confidence = the chosen one's."""
    probs = normalised(logprobs)
    best = max(range(len(probs)), key=probs.__getitem__)
    return ChoiceAnswer(
        type="choice",
        choice=tokens.labels[best],
        probabilities=dict(zip(tokens.labels, probs, strict=True)),
        confidence=min(probs[best], 1.0),
    )


def score_answer(question: Score, logprobs: Sequence[float]) -> ScoreAnswer:
    """Levels' probabilities; score = the expected level; confidence = the top one's."""
    probs = normalised(logprobs)
    return ScoreAnswer(
        type="score",
        score=sum(level * p for level, p in enumerate(probs)),
        legend=dict(enumerate(question.criteria)),
        probabilities=dict(enumerate(probs)),
        confidence=min(max(probs), 1.0),
    )
