"""Two conversations taking turns under a small prefix-cache budget, on any rank.

    python distributed_conversation.py MODEL MODE OUT.json BUDGET  # MODE: none|tensor
    mlx.launch --backend ring -n 2 --python PY distributed_conversation.py ...

The budget holds about two turns' KV state, so the cache evicts at almost
every turn. Rank 0 (or the only process) writes each reply and how many prompt
tokens came from the cache; the other ranks serve rank 0's steps.
"""

from __future__ import annotations

import json
import sys

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from langchain_mlx import ChatMLX


def main() -> None:
    model, mode, out, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    chat = ChatMLX(
        model=model,
        max_tokens=8,
        distributed=None if mode == "none" else mode,  # type: ignore[arg-type]
        distributed_timeout=60.0,
        prefix_cache_bytes=budget,
    )
    histories: list[list[BaseMessage]] = [[], []]
    turns: list[dict[str, object]] = []
    for turn in range(6):
        for who, history in enumerate(histories):
            history.append(HumanMessage(f"Conversation {who}, question {turn}."))
            reply = chat.invoke(history)
            history.append(AIMessage(str(reply.content)))
            details = (reply.usage_metadata or {}).get("input_token_details") or {}
            turns.append({"reply": reply.content, "cached": details.get("cache_read")})
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"turns": turns, "sharded": chat.llm.engine.sharded}, f)  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
