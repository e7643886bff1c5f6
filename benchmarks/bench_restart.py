"""An agent's first step after a restart: cold, from the disk tier, and the server.

Each run is a new process (a restart): it loads the model, sends one agent
prompt (a system prompt with tool descriptions and a short conversation,
~1,300 tokens of SmolLM2) and reports its time to the first token and the answer.

- ChatMLX cold: no prefix-cache folder, the whole prompt is prefilled;
- ChatMLX, first run with a folder: the same, and the KV state is written;
- ChatMLX restarted with that folder: the prompt starts from disk;
- `mlx_lm.server` + `ChatOpenAI`, started twice: it has no disk cache, so a
  restarted server prefills again.

Also the disk space an entry takes per 1,000 tokens, for SmolLM2 (measured)
and Qwen2.5-Coder-0.5B (from its configuration, as the engine's KV budget
counts it).

    python benchmarks/bench_restart.py            # ~8 minutes on a 2-core CPU
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peer import chat_openai, mlx_lm_server

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m-instruct"

TOOLS = "\n".join(
    f"- tool `{name}`: {what}. Arguments: {args}."
    for name, what, args in [
        ("search_orders", "find orders by customer, date or status", "customer, since"),
        ("refund", "refund an order in part or in full", "order_id, amount"),
        ("ship", "create a shipping label for an order", "order_id, carrier"),
        ("track", "tracking events of a parcel", "tracking_number"),
        ("email", "send an email to a customer", "to, subject, body"),
        ("escalate", "hand the case to a human agent", "reason"),
    ]
)
SYSTEM = (
    (
        "You are the support agent of a small online shop. Be brief and exact. "
        "Follow the policy: refunds up to 50 EUR without approval, larger ones "
        "escalate; never promise delivery dates; quote order ids exactly.\n"
        f"Tools:\n{TOOLS}\n"
    )
    + "Policy detail: "
    + " ".join(
        f"Rule {i}: answer in the customer's language, keep personal data private, "
        "and log every action with the order id."
        for i in range(40)
    )
)
TURNS = [
    ("human", "Hi, my order 10432 has not arrived. Can you check?"),
    ("ai", "Order 10432 shipped on Monday with tracking number ZX81."),
    ("human", "Tracking says it is stuck. What now?"),
]

RUN = r"""
import json, sys, time
from langchain_mlx import ChatMLX
model, folder, system, turns = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
tic = time.perf_counter()
chat = ChatMLX(model=model, max_tokens=24, prefix_cache_dir=folder)
loaded = time.perf_counter() - tic
reply = chat.invoke([("system", system), *[tuple(t) for t in turns]])
meta, usage = reply.response_metadata, reply.usage_metadata or {}
engine = chat.llm.engine
chat.close()
engine.wait_closed()  # the disk writes land
print(json.dumps({
    "load_s": loaded,
    "ttft_s": meta["time_to_first_token_seconds"],
    "prompt_tokens": usage.get("input_tokens"),
    "cache_read": (usage.get("input_token_details") or {}).get("cache_read", 0),
    "from": meta.get("cache_read_from"),
    "answer": reply.content,
}))
"""


def chatmlx_run(model: str, folder: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", RUN, model, folder, SYSTEM, json.dumps(TURNS)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def server_run(path: str) -> dict[str, Any]:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    messages = [SystemMessage(SYSTEM)] + [
        HumanMessage(text) if role == "human" else AIMessage(text)
        for role, text in TURNS
    ]
    with mlx_lm_server(path) as url:  # a new server process: a restart
        chat = chat_openai(url, max_tokens=24, temperature=0.0)
        tic = time.perf_counter()
        first = None
        text = ""
        for chunk in chat.stream(messages):
            if first is None and chunk.content:
                first = time.perf_counter() - tic
            text += str(chunk.content)
    return {"ttft_s": first, "answer": text}


def main() -> None:
    from langchain_mlx.models.prepare import prepare_model

    path = str(prepare_model(MODEL))
    folder = tempfile.mkdtemp(prefix="bench-restart-")
    cold = chatmlx_run(MODEL, "")
    first = chatmlx_run(MODEL, folder)
    warm = chatmlx_run(MODEL, folder)
    server_a = server_run(path)
    server_b = server_run(path)
    entries = [json.loads(p.read_text()) for p in Path(folder).glob("*/*.json")]
    per_1k = {
        MODEL: max(e["bytes"] / len(e["tokens"]) for e in entries) * 1000,
        "qwen2.5-coder-0.5b-instruct": _config_bytes_per_token(
            "qwen2.5-coder-0.5b-instruct"
        )
        * 1000,
    }
    same = warm["answer"] == cold["answer"] == first["answer"]
    rows = [
        "| run (a new process each) | prompt tokens | from cache | time to first token | answer as cold |",
        "|---|---|---|---|---|",
        f"| ChatMLX, cold (no folder) | {cold['prompt_tokens']} | 0 | {cold['ttft_s']:.1f} s | — |",
        f"| ChatMLX, first run with `prefix_cache_dir` | {first['prompt_tokens']} | {first['cache_read']} | {first['ttft_s']:.1f} s | {first['answer'] == cold['answer']} |",
        f"| ChatMLX, restarted, same folder | {warm['prompt_tokens']} | {warm['cache_read']} (disk) | {warm['ttft_s']:.1f} s | {warm['answer'] == cold['answer']} |",
        f"| mlx_lm.server + ChatOpenAI, started | — | — | {server_a['ttft_s']:.1f} s | — |",
        f"| mlx_lm.server + ChatOpenAI, restarted | — | — | {server_b['ttft_s']:.1f} s | — |",
    ]
    ratio = cold["ttft_s"] / max(warm["ttft_s"], 1e-9)
    server_ratio = server_b["ttft_s"] / max(warm["ttft_s"], 1e-9)
    text = "\n".join(
        [
            *rows,
            "",
            f"Restarted from disk: **{ratio:.1f}x** faster to the first token than "
            f"cold, **{server_ratio:.1f}x** faster than a restarted mlx_lm.server; "
            f"same answer: {same}. Disk per 1,000 tokens: "
            + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in per_1k.items())
            + " (bf16 KV state). SmolLM2, 2-core x86 CPU, "
            + time.strftime("%Y-%m-%d")
            + "; `python benchmarks/bench_restart.py`.",
        ]
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "restart.md").write_text(text + "\n")
    print(text)


def _config_bytes_per_token(name: str) -> int:
    """KV bytes per token of a prepared model (its config; weights not read)."""
    from mlx_lm import load

    from langchain_mlx.engine.model_facts import kv_bytes_per_token
    from langchain_mlx.models.prepare import prepare_model

    model, _ = load(str(prepare_model(name)), lazy=True)
    return kv_bytes_per_token(model)


if __name__ == "__main__":
    main()
