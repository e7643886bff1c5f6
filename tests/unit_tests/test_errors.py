"""Errors a user can act on: model loading, the cache folder, tools, settings, CLI.

Every message is checked for what a user needs: the path or value that was wrong,
what was expected and what to do. Broken model folders are copies of the tiny
random-weight model with one thing broken.
"""

from __future__ import annotations

import datetime
import decimal
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, TypedDict

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from pydantic import BaseModel, Field, model_validator

from langchain_mlx import cli
from langchain_mlx._messages import UnsupportedContentError, messages_to_dicts
from langchain_mlx._tools import format_tools
from langchain_mlx.engine.types import (
    ContextWindowExceededError,
    EngineStoppedError,
    GenerationSettings,
    ModelLoadError,
)
from langchain_mlx.models import prepare as _models
from langchain_mlx.models.prepare import (
    KNOWN_MODELS,
    ModelPreparationError,
    check_model_folder,
    load_model,
    prepare_model,
    prepare_tokenizer,
)
from langchain_mlx.models.store import cache_dir

# ---------------------------------------------------------------- broken folders

Mutation = Callable[[Path], None]


def _config(folder: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((folder / "config.json").read_text())
    return config


def _set_config(folder: Path, **changes: Any) -> None:
    config = _config(folder) | changes
    (folder / "config.json").write_text(json.dumps(config))


def _drop_config_key(key: str) -> Mutation:
    def mutate(folder: Path) -> None:
        config = _config(folder)
        del config[key]
        (folder / "config.json").write_text(json.dumps(config))

    return mutate


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def _remove(*names: str) -> Mutation:
    def mutate(folder: Path) -> None:
        for name in names:
            (folder / name).unlink()

    return mutate


def _write(name: str, data: bytes | str) -> Mutation:
    def mutate(folder: Path) -> None:
        target = folder / name
        if isinstance(data, bytes):
            target.write_bytes(data)
        else:
            target.write_text(data)

    return mutate


def _sharded_with_missing_shard(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
        },
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _bad_dtype(folder: Path) -> None:
    """A header that passes the size check but names a dtype MLX does not know."""
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["model.norm.weight"]["dtype"] = "Q9"
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(raw) == length
    weights.write_bytes(data[:8] + raw + data[8 + length :])


@pytest.fixture
def broken(tiny_model_path: str, tmp_path: Path) -> Callable[[Mutation], Path]:
    """Return a copy of the tiny model folder with `mutate` applied."""

    def make(mutate: Mutation) -> Path:
        folder = tmp_path / "model"
        shutil.copytree(tiny_model_path, folder)
        mutate(folder)
        return folder

    return make


# Problems found by the cheap folder check (no mlx, before mlx_lm.load).
FOLDER_CASES = {
    "no config.json": (
        _remove("config.json"),
        ["has no config.json", "mlx_lm.convert"],
    ),
    "empty config.json": (_write("config.json", "  \n"), ["config.json is empty"]),
    "config.json not JSON": (
        _write("config.json", '{"model_type": "llama",'),
        ["config.json is not valid JSON", "line 1", "copy config.json again"],
    ),
    "config.json an array": (
        _write("config.json", "[1, 2]"),
        ["must hold a JSON object, got an array"],
    ),
    "no model_type": (
        _drop_config_key("model_type"),
        ["has no 'model_type'", '"llama"', "Add it"],
    ),
    "model_type not a string": (
        lambda f: _set_config(f, model_type=7),
        ["invalid (7) 'model_type'"],
    ),
    "no weights": (
        _remove("model.safetensors"),
        ["has no weights (model*.safetensors", "convert the model again"],
    ),
    "weights under another name": (
        lambda f: (f / "model.safetensors").rename(f / "weights.safetensors"),
        ["weights named weights.safetensors", "only files named model*.safetensors"],
    ),
    "only PyTorch weights": (
        lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"),
        ["has no weights", "pytorch_model.bin", "mlx_lm.convert"],
    ),
    "truncated weights": (
        _truncate,
        ["model.safetensors is truncated", "interrupted download", "again"],
    ),
    "garbage weights": (
        _write("model.safetensors", b"not a safetensors file at all" * 10),
        ["not a valid safetensors file", "corrupt"],
    ),
    "empty weights": (
        _write("model.safetensors", b""),
        ["model.safetensors is not a valid safetensors file: it is empty"],
    ),
    "missing shard": (
        _sharded_with_missing_shard,
        ["missing weight file(s) model-00002-of-00002.safetensors", "index.json"],
    ),
    "no tokenizer files": (
        _remove("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"),
        ["has no tokenizer files", "copy them from the original model"],
    ),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_broken_folder_is_a_model_load_error(
    case: str, broken: Callable[[Mutation], Path]
) -> None:
    mutate, phrases = FOLDER_CASES[case]
    folder = broken(mutate)
    for check in (check_model_folder, load_model):
        with pytest.raises(ModelLoadError) as info:
            check(str(folder))
        message = str(info.value)
        assert str(folder) in message
        for phrase in phrases:
            assert phrase in message
    assert isinstance(info.value, OSError)  # as transformers: not wrapped by pydantic


# Problems only mlx_lm.load finds: wrapped, the cause chained.
LOAD_CASES = {
    "architecture mlx-lm lacks": (
        lambda f: _set_config(f, model_type="zzz-not-a-model"),
        ["model_type 'zzz-not-a-model'", "does not support", "upgrade mlx-lm"],
        False,
    ),
    "custom model code": (
        lambda f: _set_config(f, model_file="modeling.py"),
        ["model_file 'modeling.py'", "does not run code"],
        False,
    ),
    "more layers than weights": (
        lambda f: _set_config(f, num_hidden_layers=3),
        [
            "do not match its config.json",
            "9 parameter(s) the config describes are not in the weights",
            "model.layers.2.",
            "and 6 more",
            "restore the config.json",
        ],
        True,
    ),
    "fewer layers than weights": (
        lambda f: _set_config(f, num_hidden_layers=1),
        ["the weights hold 9 parameter(s) the config does not describe"],
        True,
    ),
    "wrong hidden size": (
        lambda f: _set_config(f, hidden_size=96),
        ["parameter model.embed_tokens.weight has shape", "config expects"],
        True,
    ),
    "untied head without weights": (
        lambda f: _set_config(f, tie_word_embeddings=False),
        ["lm_head.weight"],
        True,
    ),
    "config missing a required value": (
        _drop_config_key("hidden_size"),
        ["cannot build model", "hidden_size", "mlx_lm.convert"],
        True,
    ),
    "weights with an unknown dtype": (
        _bad_dtype,
        ["weights of model", "corrupt or truncated", "unsupported dtype Q9"],
        True,
    ),
    "tokenizer.json not JSON": (
        _write("tokenizer.json", "{"),
        ["could not load the tokenizer", "tokenizer.json is not valid JSON"],
        True,
    ),
    "tokenizer.json missing": (
        _remove("tokenizer.json"),
        ["could not load the tokenizer", "has no tokenizer.json"],
        True,
    ),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_failure_is_a_model_load_error(
    case: str, broken: Callable[[Mutation], Path]
) -> None:
    mutate, phrases, chained = LOAD_CASES[case]
    folder = broken(mutate)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(folder))
    message = str(info.value)
    assert str(folder) in message
    for phrase in phrases:
        assert phrase in message
    assert "\n" not in message
    if chained:  # the original error is kept for debugging
        assert info.value.__cause__ is not None
        assert not isinstance(info.value.__cause__, ModelLoadError)


def test_load_model_returns_model_and_tokenizer(tiny_model_path: str) -> None:
    model, tokenizer = load_model(tiny_model_path)
    assert tokenizer.encode("hello")
    assert hasattr(model, "layers")


def test_missing_paths_and_files(tiny_model_path: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="'/no/such/model' does not exist"):
        load_model("/no/such/model")
    file = tmp_path / "model.txt"
    file.write_text("x")
    with pytest.raises(ModelLoadError, match="is a file, not a folder"):
        load_model(str(file))
    with pytest.raises(ModelLoadError, match="neither an existing folder nor a valid"):
        load_model("not/a/valid/hub/id")


def test_hub_id_without_network_is_wrapped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here either way
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError) as info:
        load_model("mlx-community/surely-not-cached-4bit")
    message = str(info.value)
    assert "could not download model 'mlx-community/surely-not-cached-4bit'" in message
    assert "network" in message
    assert "local folder" in message
    assert info.value.__cause__ is not None  # not hidden


def test_bad_adapter_folders(tiny_model_path: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"adapter folder .* does not exist"):
        load_model(tiny_model_path, adapter_path=str(tmp_path / "nope"))
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    with pytest.raises(
        ModelLoadError, match=r"has no adapter_config.json.*mlx_lm.lora"
    ):
        load_model(tiny_model_path, adapter_path=str(adapters))
    (adapters / "adapter_config.json").write_text("{")
    with pytest.raises(ModelLoadError, match=r"adapter_config.json is not valid JSON"):
        load_model(tiny_model_path, adapter_path=str(adapters))
    (adapters / "adapter_config.json").write_text('{"num_layers": 2}')
    with pytest.raises(ModelLoadError, match=r"has no adapters.safetensors"):
        load_model(tiny_model_path, adapter_path=str(adapters))


def test_checks_do_not_import_mlx(tiny_model_path: str) -> None:
    code = (
        "import sys\n"
        "from langchain_mlx.models.prepare import check_model_folder, load_model\n"
        f"check_model_folder({tiny_model_path!r})\n"
        "assert not any(m.split('.')[0] in ('mlx', 'mlx_lm') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- cache folder


def test_home_that_is_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.write_text("oops")
    monkeypatch.setenv("LANGCHAIN_MLX_HOME", str(home))
    for call in (
        cache_dir,
        lambda: prepare_model("smollm2-135m-instruct"),
        lambda: prepare_tokenizer("smollm2-135m-instruct"),
    ):
        with pytest.raises(ModelPreparationError) as info:
            call()
        message = str(info.value)
        assert str(home) in message
        assert "is a file, not a folder" in message
        assert "set LANGCHAIN_MLX_HOME to a folder" in message


def test_home_below_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("oops")
    monkeypatch.setenv("LANGCHAIN_MLX_HOME", str(tmp_path / "file" / "home"))
    with pytest.raises(
        ModelPreparationError,
        match=r"cannot be created or written \(Not a directory\).*folder you can write",
    ):
        prepare_model("smollm2-135m-instruct")


@pytest.fixture
def read_only_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LANGCHAIN_MLX_HOME", str(home))
    home.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make access() say what a user sees
        real_access = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda p, mode: False if Path(p) == home else real_access(p, mode),
        )
    yield home
    home.chmod(0o755)


def test_read_only_home(read_only_home: Path) -> None:
    with pytest.raises(ModelPreparationError) as info:
        prepare_model("smollm2-135m-instruct")
    message = str(info.value)
    assert str(read_only_home) in message
    assert "read-only" in message
    assert "Set LANGCHAIN_MLX_HOME to a folder you can write" in message


def test_read_only_home_still_serves_prepared_models(read_only_home: Path) -> None:
    spec = KNOWN_MODELS["smollm2-135m-instruct"]
    folder = read_only_home / "models" / spec.name
    read_only_home.chmod(0o755)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    _models._write_marker(folder, spec)
    read_only_home.chmod(0o555)
    assert prepare_model(spec.name) == folder  # nothing to write, nothing to fail


def test_permission_error_while_preparing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("LANGCHAIN_MLX_HOME", str(home))

    def denied(*args: Any, **kwargs: Any) -> Path:
        raise PermissionError(13, "Permission denied", str(home / "gguf" / "x.gguf"))

    monkeypatch.setattr(_models, "_ensure_gguf", denied)
    with pytest.raises(ModelPreparationError) as info:
        prepare_model("smollm2-135m-instruct")
    assert "cannot be created or written (Permission denied)" in str(info.value)
    assert isinstance(info.value.__cause__, PermissionError)


# ---------------------------------------------------------------- tools


def get_weather(city: str, unit: str = "celsius") -> str:
    """Weather in a city."""
    return city + unit


class Add(BaseModel):
    """Add two numbers."""

    a: int = Field(description="first")
    b: int


class Lookup(TypedDict):
    """Look a word up."""

    word: str


@tool
def search(query: str) -> str:
    """Search the web."""
    return query


OPENAI_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a zone.",
        "parameters": {
            "type": "object",
            "properties": {
                "zone": {"type": ["string", "null"]},
                "precise": True,
                "at": {"anyOf": [{"type": "integer"}, {"$ref": "#/$defs/When"}]},
            },
            "required": ["zone"],
            "$defs": {"When": {"type": "object", "properties": {}}},
        },
    },
}


def _function(name: Any = "f", **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **function}}


def test_format_tools_accepts_every_kind() -> None:
    formatted = format_tools(
        [
            get_weather,
            Add,
            Lookup,
            search,
            OPENAI_TOOL,
            {"name": "bare", "parameters": {}},
        ]
    )
    names = [t["function"]["name"] for t in formatted]
    assert names == ["get_weather", "Add", "Lookup", "search", "get_time", "bare"]
    assert all(t["type"] == "function" for t in formatted)
    assert format_tools(formatted) == formatted  # per call: formatted tools pass
    assert format_tools(()) == []


@pytest.mark.parametrize(
    ("tools", "phrase"),
    [
        (None, "tools must be a list of tools, got NoneType None"),
        (get_weather, "tools must be a list of tools, got function"),
        ("get_weather", "got str 'get_weather'"),
        (OPENAI_TOOL, "(one tool? wrap it in a list)"),
        (iter([get_weather]), "got list_iterator"),
    ],
)
def test_tools_that_are_not_a_list(tools: Any, phrase: str) -> None:
    with pytest.raises(TypeError) as info:
        format_tools(tools)
    assert phrase in str(info.value)
    assert "e.g. [get_weather]" in str(info.value)


@pytest.mark.parametrize("item", [42, "get_weather", None, 3.5])
def test_item_that_is_not_a_tool(item: Any) -> None:
    with pytest.raises(TypeError) as info:
        format_tools([get_weather, item])
    message = str(info.value)
    assert f"tools[1] ({type(item).__name__} {item!r}) is not a tool" in message
    assert "pydantic model class" in message
    assert "LangChain BaseTool" in message
    assert "OpenAI tool dict" in message


NAME_CASES: list[tuple[Any, type[Exception], str]] = [
    ({"description": "no name here"}, ValueError, "dict without a tool name"),
    ({"type": "function"}, ValueError, "dict without a tool name"),
    ({"type": "function", "function": {"description": "d"}}, ValueError, "no name"),
    (_function(""), ValueError, "no name"),
    (_function(3), TypeError, "the tool name must be a string, got int 3"),
    (_function("get weather!"), ValueError, "tool name 'get weather!' is not valid"),
    (_function("x" * 65), ValueError, "1 to 64 letters"),
    (_function("ok\n"), ValueError, "is not valid"),
    (lambda x: x, ValueError, "tool name '<lambda>' is not valid"),
    ({"type": "web_search"}, ValueError, "'web_search' tool; only function tools"),
    ({"type": "function", "function": "f"}, TypeError, "'function' must be a dict"),
    (_function(description=5), TypeError, "description must be a string"),
]


@pytest.mark.parametrize(("tool_def", "error", "phrase"), NAME_CASES)
def test_bad_tool_names(tool_def: Any, error: type[Exception], phrase: str) -> None:
    with pytest.raises(error) as info:
        format_tools([tool_def])
    assert phrase in str(info.value)


def test_invalid_name_says_what_openai_accepts() -> None:
    with pytest.raises(ValueError, match="what OpenAI accepts"):
        format_tools([_function("a.b")])


def test_duplicate_tool_names() -> None:
    with pytest.raises(ValueError) as info:
        format_tools([get_weather, Add, _function("get_weather")])
    assert "'get_weather' is both tools[0] and tools[2]" in str(info.value)
    assert "rename one" in str(info.value)


def test_the_same_tool_twice_is_bound_once() -> None:
    # langchain-tests binds a pydantic class and its JSON schema side by side
    assert len(format_tools([Add, Add.model_json_schema(), get_weather])) == 2


PARAMETER_CASES: list[tuple[Any, type[Exception], str]] = [
    ([1, 2], TypeError, "parameters must be a JSON Schema object"),
    ("object", TypeError, "parameters must be a JSON Schema object"),
    ({"type": "array"}, ValueError, "must have type 'object'"),
    ({"type": "object", "properties": ["city"]}, TypeError, "properties must map"),
    (
        {"type": "object", "properties": {"city": "string"}},
        TypeError,
        "parameters.properties.city must be a JSON Schema",
    ),
    (
        {"type": "object", "properties": {"city": {}}, "required": ["town"]},
        ValueError,
        "required names 'town', which parameters.properties does not define",
    ),
    (
        {"type": "object", "properties": {}, "required": "city"},
        TypeError,
        "required must be a list of argument names",
    ),
    (
        {"type": "object", "properties": {"city": {"type": "str"}}},
        ValueError,
        "parameters.properties.city.type is 'str'; JSON Schema types are",
    ),
    (
        {"type": "object", "properties": {"n": {"type": ["integer", "float"]}}},
        ValueError,
        "parameters.properties.n.type is ['integer', 'float']",
    ),
    (
        {"type": "object", "properties": {"n": {"anyOf": [{"type": "int"}]}}},
        ValueError,
        "parameters.properties.n.anyOf[0].type is 'int'",
    ),
    (
        {"type": "object", "properties": {"xs": {"type": "array", "items": 5}}},
        TypeError,
        "parameters.properties.xs.items must be a JSON Schema",
    ),
    (
        {"type": "object", "properties": {"n": {"anyOf": {"type": "integer"}}}},
        TypeError,
        "parameters.properties.n.anyOf must be a list of schemas",
    ),
]


@pytest.mark.parametrize(("parameters", "error", "phrase"), PARAMETER_CASES)
def test_bad_parameters(parameters: Any, error: type[Exception], phrase: str) -> None:
    with pytest.raises(error) as info:
        format_tools([_function("lookup", parameters=parameters)])
    message = str(info.value)
    assert message.startswith("tool 'lookup': ")
    assert phrase in message


def test_bind_tools_checks_tools(tiny_model_path: str) -> None:
    from langchain_mlx import ChatMLX

    chat = ChatMLX(model=tiny_model_path, max_tokens=4)
    with pytest.raises(TypeError, match="tools must be a list"):
        chat.bind_tools(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is not valid"):
        chat.bind_tools([_function("bad name")])
    with pytest.raises(ValueError, match="names no bound tool"):  # as before
        chat.bind_tools([get_weather], tool_choice="nope")
    bound = chat.bind_tools([get_weather, Add], tool_choice="auto")
    assert [t["function"]["name"] for t in bound.kwargs["tools"]] == [  # type: ignore[attr-defined]
        "get_weather",
        "Add",
    ]


# ---------------------------------------------------------------- messages


def _dict_of(message: BaseMessage, *, calls_as_text: bool = False) -> dict[str, Any]:
    return messages_to_dicts(
        [HumanMessage("hi"), message], None, calls_as_text=calls_as_text
    )[1]


@pytest.mark.parametrize(
    "block",
    [{"type": "text", "text": None}, {"type": "text"}, {"type": "text", "text": 5}],
)
def test_text_block_without_a_string(block: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedContentError) as info:
        messages_to_dicts([SystemMessage("s"), HumanMessage(["ok", block])], None)
    message = str(info.value)
    assert message.startswith("messages[1] (HumanMessage): content[1] is a text ")
    assert "'text' must be a string" in message
    assert "None" not in _dict_of(HumanMessage([{"type": "text", "text": "x"}]))


def test_unsupported_block_names_the_message_and_block() -> None:
    image = {"type": "image", "url": "https://example.com/x.png"}
    with pytest.raises(UnsupportedContentError) as info:
        messages_to_dicts([HumanMessage("a"), HumanMessage(["b", image])], None)
    assert str(info.value).startswith(
        "messages[1] (HumanMessage): content[1] is a block of type 'image'"
    )


def _with_args(args: Any) -> AIMessage:
    """An AIMessage whose call holds `args` as is (LangChain validates only at init)."""
    message = AIMessage("", tool_calls=[{"name": "f", "args": {}, "id": "c1"}])
    message.tool_calls[0]["args"] = args
    return message


def test_tool_call_arguments_as_a_json_string() -> None:
    as_dict = _dict_of(_with_args({"a": 1}))
    assert _dict_of(_with_args('{"a": 1}')) == as_dict
    with pytest.raises(
        ValueError, match=r"^messages\[1\] \(AIMessage\): tool_calls\[0\]"
    ):
        _dict_of(_with_args("{bad"))
    with pytest.raises(ValueError) as info:
        _dict_of(_with_args("[1, 2]"))
    assert "not a JSON object" in str(info.value)


def test_openai_style_arguments_that_are_not_json(tiny_model_path: str) -> None:
    from langchain_mlx import ChatMLX

    chat = ChatMLX(model=tiny_model_path, max_tokens=1)
    call = {"id": "c1", "type": "function"}
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {**call, "function": {"name": "f", "arguments": "{}"}},
            {**call, "function": {"name": "g", "arguments": "{bad"}},
        ]},
        {"role": "tool", "content": "r", "tool_call_id": "c1"},
    ]  # fmt: skip
    with pytest.raises(ValueError) as info:
        chat.invoke(history)
    assert not isinstance(info.value, json.JSONDecodeError)
    message = str(info.value)
    assert message.startswith("messages[1] (assistant): tool_calls[1] ('g', id 'c1')")
    assert "not valid JSON" in message
    # the same calls from a model (additional_kwargs) stay what it said: its text
    kept = AIMessage("", additional_kwargs={"tool_calls": history[1]["tool_calls"]})
    assert "{bad" in _dict_of(kept)["content"]


def test_tool_call_arguments_render_as_json_values() -> None:
    when = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    key = uuid.UUID("12345678-1234-5678-1234-567812345678")
    args = {
        "when": when,
        "day": [datetime.date(2024, 1, 2), datetime.time(3, 4)],
        "key": key,
        "price": decimal.Decimal("1.50"),
        "path": PurePosixPath("/tmp/x"),
    }
    expected = {
        "when": "2024-01-02T03:04:05+00:00",
        "day": ["2024-01-02", "03:04:00"],
        "key": "12345678-1234-5678-1234-567812345678",
        "price": "1.50",
        "path": "/tmp/x",
    }
    message = AIMessage("", tool_calls=[{"name": "f", "args": args, "id": "c1"}])
    rendered = _dict_of(message)["tool_calls"][0]["function"]["arguments"]
    assert rendered == expected
    as_text = _dict_of(message, calls_as_text=True)["content"]
    assert json.loads(as_text) == {"name": "f", "arguments": expected}
    result = ToolMessage([{"type": "json", "json": {"at": when}}], tool_call_id="c1")
    assert json.loads(_dict_of(result)["content"]) == {"at": expected["when"]}


def test_tool_call_argument_without_a_json_form() -> None:
    message = AIMessage(
        "", tool_calls=[{"name": "f", "args": {"x": [1, {"o": object()}]}, "id": "c1"}]
    )
    for calls_as_text in (False, True):
        with pytest.raises(ValueError) as info:
            _dict_of(message, calls_as_text=calls_as_text)
        text = str(info.value)
        assert text.startswith("messages[1] (AIMessage): tool_calls[0] ('f', id 'c1')")
        assert "args.x[1].o = <object object at" in text


# ---------------------------------------------------------------- schemas


@pytest.mark.parametrize(
    ("schema", "phrase"),
    [
        ({"title": "X", "type": "objekt"}, "schema.type is 'objekt'"),
        (
            {"title": "X", "type": "object", "properties": {"a": {"type": "strin"}}},
            "schema.properties.a.type is 'strin'",
        ),
    ],
)
def test_schema_with_an_invalid_type(
    tiny_model_path: str, schema: dict[str, Any], phrase: str
) -> None:
    from langchain_mlx import ChatMLX

    chat = ChatMLX(model=tiny_model_path, max_tokens=2)
    with pytest.raises(ValueError) as info:
        chat.with_structured_output(schema)
    assert phrase in str(info.value)
    assert "JSON Schema types are array, boolean, integer" in str(info.value)
    response_format = {"type": "json_schema", "json_schema": {"schema": schema}}
    with pytest.raises(ValueError, match=phrase.replace(".", r"\.")):
        chat.invoke("hi", response_format=response_format)  # before generating
    tool = {**schema, "description": "d"}
    with pytest.raises(ValueError, match=r"'(objekt|strin)'"):
        chat.bind_tools([tool])
    with pytest.raises(ValueError, match=r"'(objekt|strin)'"):
        chat.with_structured_output(tool, method="function_calling")


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("seed", [0, 1, 2**64 - 1])
def test_seed_range_accepts(seed: int) -> None:
    assert GenerationSettings().with_overrides({"seed": seed}).seed == seed


@pytest.mark.parametrize(
    ("seed", "error"), [(-1, ValueError), (2**64, ValueError), ("1", TypeError)]
)
def test_seed_range_rejects(seed: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="seed must be an integer") as info:
        GenerationSettings().with_overrides({"seed": seed})
    assert repr(seed) in str(info.value)


def test_seed_true_is_not_an_integer() -> None:
    with pytest.raises(TypeError, match="seed must be an integer, got True"):
        GenerationSettings(seed=True).validate()


@pytest.mark.parametrize("stop", [5, [1, 2], {"a": 1}, ["ok", None]])
def test_stop_must_be_strings(stop: Any) -> None:
    with pytest.raises(TypeError) as info:
        GenerationSettings().with_overrides({"stop": stop})
    message = str(info.value)
    assert "stop must be a string or a list of strings" in message
    assert repr(stop) in message


# ---------------------------------------------------------------- CLI


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("langchain-mlx: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["--max-tokens", "0"], "argument --max-tokens: must be a positive integer"),
        (["--max-tokens", "-5"], "got -5"),
        (["--max-tokens", "many"], "expected a positive integer, got 'many'"),
        (["--temperature", "-1"], "argument --temperature: must be a finite number"),
        (["--temperature", "inf"], "must be a finite number >= 0"),
        (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64 - 1]"),
    ],
)
def test_cli_rejects_bad_options(
    capsys: pytest.CaptureFixture[str], argv: list[str], phrase: str
) -> None:
    code, out, err = _run(capsys, "chat", *argv, "Hi")
    assert code == 2
    assert out == ""
    line = _one_error_line(err)
    assert phrase in line
    assert "langchain-mlx chat --help" in line


def test_cli_help_and_missing_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    assert "chat" in out
    code, _, err = _run(capsys)
    assert code == 2
    assert "required" in _one_error_line(err)


def test_cli_broken_model_folder(
    capsys: pytest.CaptureFixture[str], broken: Callable[[Mutation], Path]
) -> None:
    folder = broken(_truncate)
    code, out, err = _run(capsys, "chat", "--model", str(folder), "Hi")
    assert code == 2
    assert out == ""
    line = _one_error_line(err)
    assert str(folder) in line
    assert "model.safetensors is truncated" in line


def test_cli_folder_without_config(
    capsys: pytest.CaptureFixture[str], broken: Callable[[Mutation], Path]
) -> None:
    folder = broken(_remove("config.json"))
    code, _, err = _run(capsys, "chat", "--model", str(folder), "Hi")
    assert code == 2
    assert "has no config.json" in _one_error_line(err)


@pytest.mark.parametrize("where", ["before", "after"])
def test_cli_debug_shows_the_traceback(
    capsys: pytest.CaptureFixture[str], broken: Callable[[Mutation], Path], where: str
) -> None:
    folder = broken(_truncate)
    argv = ["chat", "--model", str(folder), "Hi"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert "ModelLoadError" in err
    assert err.splitlines()[-1].startswith("langchain-mlx: error: ")


def test_cli_home_is_a_file(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    home.write_text("")
    monkeypatch.setenv("LANGCHAIN_MLX_HOME", str(home))
    for argv in (["chat", "Hi"], ["models", "prepare", "smollm2-135m-instruct"]):
        code, _, err = _run(capsys, *argv)
        assert code == 2
        line = _one_error_line(err)
        assert "LANGCHAIN_MLX_HOME" in line
        assert "is a file, not a folder" in line


class _FakeChat:
    """Stands in for ChatMLX: yields some text, then raises `error`."""

    def __init__(self, error: BaseException | Callable[[], None] | None) -> None:
        self.error = error

    def stream(self, messages: Any) -> Iterator[AIMessageChunk]:
        yield AIMessageChunk(content="Hel")
        if callable(self.error):
            self.error()
        elif self.error is not None:
            raise self.error
        yield AIMessageChunk(content="lo")


def _invalid_settings() -> None:
    GenerationSettings(max_tokens=0).validate()  # our validation raises


def _bug() -> None:
    _ = len(None)  # type: ignore[arg-type]  # a TypeError that is no one's input


class _Holder(BaseModel):
    path: str = "x"

    @model_validator(mode="after")
    def _load(self) -> _Holder:
        msg = "model folder 'x' has no config.json;\npass a folder"
        raise ModelLoadError(msg)


def _pydantic_wrapped() -> None:
    _Holder()  # pydantic turns the ModelLoadError into a ValidationError


ERROR_CASES: list[tuple[Any, int, str]] = [
    (None, 0, ""),
    (ContextWindowExceededError("prompt is 900 tokens, window 512"), 2, "900 tokens"),
    (EngineStoppedError("the MLX engine for 'x' has stopped"), 2, "has stopped"),
    (ModelLoadError("weights of model 'x' are corrupt"), 2, "are corrupt"),
    (ModelPreparationError("pip said:\nERROR: no such file"), 2, "pip said: ERROR"),
    (_invalid_settings, 2, "max_tokens must be a positive integer, got 0"),
    (_pydantic_wrapped, 2, "model folder 'x' has no config.json; pass a folder"),
    (RuntimeError("boom"), 1, "unexpected RuntimeError: boom (run with --debug"),
    (_bug, 1, "unexpected TypeError: object of type 'NoneType' has no len()"),
]


@pytest.mark.parametrize(("error", "code", "phrase"), ERROR_CASES)
def test_cli_error_mapping(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tiny_model_path: str,
    error: Any,
    code: int,
    phrase: str,
) -> None:
    monkeypatch.setattr(cli, "_open_chat", lambda args: _FakeChat(error))
    got, out, err = _run(capsys, "chat", "--model", tiny_model_path, "Hi")
    assert got == code
    if code == 0:
        assert out == "Hello\n"
        assert err == ""
        return
    assert out == "Hel"
    line = _one_error_line(err)
    assert phrase in line
    assert "validation error" not in line  # pydantic's wrapper is taken off


def test_cli_ctrl_c_is_quiet(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tiny_model_path: str,
) -> None:
    monkeypatch.setattr(cli, "_open_chat", lambda args: _FakeChat(KeyboardInterrupt()))
    code, _, err = _run(capsys, "chat", "--model", tiny_model_path, "Hi")
    assert code == 130
    assert err == ""


def test_cli_subprocess_one_line_no_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("langchain-mlx")
    if not script.exists():
        pytest.skip(f"{script} is not installed")
    home = tmp_path / "home"
    home.write_text("")
    env = {**os.environ, "LANGCHAIN_MLX_HOME": str(home)}
    result = subprocess.run(
        [str(script), "chat", "Hi"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    line = _one_error_line(result.stderr)
    assert str(home) in line
    assert "LANGCHAIN_MLX_HOME" in line


def test_cli_broken_pipe_is_quiet(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tiny_model_path: str,
) -> None:
    monkeypatch.setattr(cli, "_open_chat", lambda args: _FakeChat(BrokenPipeError()))
    code, _, err = _run(capsys, "chat", "--model", tiny_model_path, "Hi")
    assert code == 1
    assert err == ""
