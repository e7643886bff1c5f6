"""BFCL (Berkeley Function Calling Leaderboard v4), AST categories: ChatMLX vs mlx_lm.server.

The questions, answer keys, function-to-tool conversion and AST checker come
from the `bfcl-eval` wheel (`pip download --no-deps`, unpacked into the cache
folder): nothing of BFCL is re-written here. `bfcl-eval` imports every provider
SDK through `bfcl_eval.constants.model_config`, and its model-handler utilities
import tree-sitter parsers for Java and JavaScript; this script puts three stub
modules in their place (`model_config` with one entry saying that function
names have their dots written as underscores, as for OpenAI-style tools; the
Java and JavaScript parsers, unused by the Python categories) and imports the
real `ast_checker`, `bfcl_eval.utils` and `convert_to_tool`.

Each case goes, as BFCL's own function-calling handlers send it, to ChatMLX
(`bind_tools(tools)`, i.e. `tool_choice="auto"`, default settings, greedy)
and to the same model folder served by `mlx_lm.server`, called through
langchain-openai's `ChatOpenAI` with the same tools. The calls each side
returns are checked by BFCL's AST checker (irrelevance: right when no call is
made); every miss is classified. The sample is deterministic: `--per-category`
cases evenly spaced over each category's file (ids in the result file).
Writes benchmarks/results/bfcl-<model>.{json,md}.

    python benchmarks/bench_bfcl.py --model qwen2.5-coder-0.5b-instruct --per-category 3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import platform
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path
from typing import Any

from langchain_mlx import ChatMLX
from langchain_mlx.models import store
from langchain_mlx.models.prepare import resolve_model

RESULTS = Path(__file__).parent / "results"
BFCL = ("bfcl-eval", "2026.3.23")
CATEGORIES = [
    "simple_python",
    "multiple",
    "parallel",
    "parallel_multiple",
    "irrelevance",
]
CHECKER_MODEL = "langchain-mlx"  # the name the stubbed model_config knows
# BFCL paper (ICML 2025), Table 1, function-calling mode: simple, multiple,
# parallel, parallel multiple, irrelevance
PUBLISHED = {
    "Qwen2.5-0.5B-Instruct": [61.2, 78.0, 60.0, 50.0, 46.2],
    "Qwen2.5-1.5B-Instruct": [72.4, 87.0, 81.5, 75.5, 62.7],
    "Hammer2.1-0.5b": [68.0, 83.0, 71.5, 54.0, 73.9],
}


def load_bfcl() -> types.SimpleNamespace:
    """Unpack bfcl-eval into the cache folder; import its checker and utilities."""
    folder = store.cache_dir() / "bfcl" / f"bfcl_eval-{BFCL[1]}"
    if not (folder / "bfcl_eval" / "data").is_dir():
        wheels = folder.parent / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        found = list(wheels.glob(f"bfcl_eval-{BFCL[1]}-*.whl"))
        if not found:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                 f"{BFCL[0]}=={BFCL[1]}", "-d", str(wheels)],
                check=True,
            )  # fmt: skip
            found = list(wheels.glob(f"bfcl_eval-{BFCL[1]}-*.whl"))
        with zipfile.ZipFile(found[0]) as wheel:
            wheel.extractall(folder)
    sys.path.insert(0, str(folder))
    config = types.ModuleType("bfcl_eval.constants.model_config")
    config.MODEL_CONFIG_MAPPING = {  # type: ignore[attr-defined]
        CHECKER_MODEL: types.SimpleNamespace(underscore_to_dot=True)
    }
    sys.modules[config.__name__] = config
    for language in ("java", "js"):
        parser = types.ModuleType(f"bfcl_eval.model_handler.parser.{language}_parser")
        name = "javascript" if language == "js" else language
        setattr(parser, f"parse_{name}_function_call", None)
        sys.modules[parser.__name__] = parser
    checker = importlib.import_module("bfcl_eval.eval_checker.ast_eval.ast_checker")
    handler_utils = importlib.import_module("bfcl_eval.model_handler.utils")
    utils = importlib.import_module("bfcl_eval.utils")
    enums = importlib.import_module("bfcl_eval.constants.enums")
    mappings = importlib.import_module("bfcl_eval.constants.type_mappings")
    return types.SimpleNamespace(
        data=folder / "bfcl_eval" / "data",
        ast_checker=checker.ast_checker,
        convert_to_tool=handler_utils.convert_to_tool,
        pre_process=utils._func_doc_language_specific_pre_processing,
        python=enums.Language.PYTHON,
        style=enums.ModelStyle.OPENAI_COMPLETIONS,
        mapping=mappings.GORILLA_TO_OPENAPI,
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def sample(bfcl: Any, category: str, n: int) -> list[dict[str, Any]]:
    """`n` cases evenly spaced over the category, with their answer keys."""
    cases = read_jsonl(bfcl.data / f"BFCL_v4_{category}.json")
    answers_file = bfcl.data / "possible_answer" / f"BFCL_v4_{category}.json"
    answers = (
        {a["id"]: a["ground_truth"] for a in read_jsonl(answers_file)}
        if answers_file.exists()
        else {}
    )
    picked = [cases[i * len(cases) // n] for i in range(n)]
    for case in picked:
        case["ground_truth"] = answers.get(case["id"])
        case["function"] = bfcl.pre_process(copy.deepcopy(case["function"]), category)
    return picked


def classify(
    category: str, case: dict[str, Any], reply: Any, result: dict[str, Any]
) -> str:
    """What kind of miss a wrong reply is."""
    made_up = reply.invalid_tool_calls and all(
        str(c.get("error", "")).startswith("unknown tool")
        for c in reply.invalid_tool_calls
    )  # a function no tool has: parsed as an invalid call, never run
    if category == "irrelevance":
        return "made-up function (not run)" if made_up else "call where none relevant"
    if made_up and not reply.tool_calls:
        return "wrong function"
    if reply.invalid_tool_calls:
        return "malformed call"
    if not reply.tool_calls:
        return "no call"
    error = str(result.get("error_type", ""))
    expected = case["ground_truth"]
    if "wrong_count" in error:
        return "extra call" if len(reply.tool_calls) > len(expected) else "missing call"
    wanted = sorted(n.replace(".", "_") for answer in expected for n in answer)
    got = sorted(call["name"] for call in reply.tool_calls)
    if "wrong_func_name" in error or got != wanted:
        return "wrong function"
    if "type_error" in error:
        return "wrong type"
    return "wrong or missing argument"


def run_case(
    bfcl: Any, model: Any, category: str, case: dict[str, Any], max_tokens: int
) -> dict[str, Any]:
    tools = bfcl.convert_to_tool(case["function"], bfcl.mapping, bfcl.style)
    bound = model.bind_tools(tools)
    t = time.perf_counter()
    reply = bound.invoke(case["question"][0], max_tokens=max_tokens)
    seconds = time.perf_counter() - t
    calls = [{c["name"]: c["args"]} for c in reply.tool_calls]
    if category == "irrelevance":
        result: dict[str, Any] = {"valid": not calls and not reply.invalid_tool_calls}
    elif reply.invalid_tool_calls or not calls:
        result = {"valid": False, "error_type": "no_call"}
    else:
        result = bfcl.ast_checker(
            case["function"], calls, case["ground_truth"], bfcl.python, category,
            CHECKER_MODEL,
        )  # fmt: skip
    miss = None if result["valid"] else classify(category, case, reply, result)
    return {
        "id": case["id"],
        "seconds": seconds,
        "valid": bool(result["valid"]),
        "miss": miss,
        "error": result.get("error"),
        "calls": calls,
        "invalid": [dict(c) for c in reply.invalid_tool_calls],
        "text": str(reply.content)[:300],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--per-category", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--no-server", action="store_true", help="skip mlx_lm.server")
    args = parser.parse_args()

    bfcl = load_bfcl()
    categories = args.categories.split(",")
    cases = {c: sample(bfcl, c, args.per_category) for c in categories}
    path = str(resolve_model(args.model, progress=print))
    chat = ChatMLX(model=args.model, temperature=0.0)
    chat.invoke("Hi", max_tokens=2)  # warm-up (first-call compilation)
    sides: dict[str, dict[str, list[dict[str, Any]]]] = {"ChatMLX": {}}
    with contextlib.ExitStack() as stack:
        models: dict[str, Any] = {"ChatMLX": chat}
        if not args.no_server:
            from _peer import chat_openai, mlx_lm_server

            base_url = stack.enter_context(mlx_lm_server(path))
            peer = chat_openai(base_url, temperature=0.0)
            peer.invoke("Hi", max_tokens=2)
            models["mlx_lm.server + ChatOpenAI"] = peer
            sides["mlx_lm.server + ChatOpenAI"] = {}
        for category in categories:
            for case in cases[category]:
                for name, model in models.items():
                    row = run_case(bfcl, model, category, case, args.max_tokens)
                    sides[name].setdefault(category, []).append(row)
                    print(
                        f"  {case['id']} {name}: {row['seconds']:.1f} s "
                        f"{'ok' if row['valid'] else row['miss']} {row['calls']}",
                        flush=True,
                    )

    result = {
        "model": args.model,
        "machine": f"{platform.system()} {platform.machine()}",
        "bfcl_eval": BFCL[1],
        "per_category": args.per_category,
        "max_tokens": args.max_tokens,
        "ids": {c: [case["id"] for case in cases[c]] for c in categories},
        "sides": sides,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = f"bfcl-{args.model}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(table(result, categories))
    print((RESULTS / f"{stem}.md").read_text())


def table(result: dict[str, Any], categories: list[str]) -> str:
    n = result["per_category"]
    header = "| | " + " | ".join(categories) + " | s / case | misses |\n"
    header += "|---" * (len(categories) + 3) + "|\n"
    rows = ""
    for name, by_category in result["sides"].items():
        cells, seconds, misses = [], [], {}
        for c in categories:
            rows_c = by_category.get(c, [])
            right = sum(r["valid"] for r in rows_c)
            cells.append(f"{right}/{len(rows_c)}")
            seconds += [r["seconds"] for r in rows_c]
            for r in rows_c:
                if r["miss"]:
                    misses[r["miss"]] = misses.get(r["miss"], 0) + 1
        per_case = sum(seconds) / max(len(seconds), 1)
        missed = ", ".join(f"{k} {v}" for k, v in sorted(misses.items())) or "none"
        rows += f"| {name} | " + " | ".join(cells) + f" | {per_case:.0f} | {missed} |\n"
    published = ""
    for name, scores in PUBLISHED.items():
        if len(categories) == len(CATEGORIES):
            cells = [f"{s:.1f} %" for s in scores]
            published += f"| {name} (published) | " + " | ".join(cells) + " | | |\n"
    return (
        f"BFCL v4 (`bfcl-eval=={result['bfcl_eval']}`, its data and AST checker), "
        f"model `{result['model']}` (bf16), {n} case(s) per category evenly spaced "
        f"over the category's file, greedy, up to {result['max_tokens']} tokens, "
        f"{result['machine']}, one run; ChatMLX with `bind_tools(tools)` "
        '(`tool_choice="auto"`) against the same folder served by `mlx_lm.server` '
        "with the same tools through `ChatOpenAI`.\n\n"
        f"{header}{rows}{published}\n"
        "Published rows: the BFCL paper (ICML 2025), Table 1, function-calling mode, "
        "over the whole categories; ours are small samples, so a case is "
        f"{100 / max(n, 1):.0f} points.\n"
    )


if __name__ == "__main__":
    main()
