"""The same script on every rank: ChatMLX on a model sharded across processes or Macs.

One machine (2 ranks over loopback):

    mlx.launch --backend ring -n 2 --python .venv/bin/python examples/sharded_chat.py

Several Macs (the model and this script at the same path on each):

    mlx.distributed_config --over ethernet --hosts mac1,mac2 \
        --output-hostfile hosts.json
    mlx.launch --hostfile hosts.json --backend ring examples/sharded_chat.py

Rank 0 runs everything below the constructor; on the other ranks constructing
the model joins rank 0's engine and ends the process when rank 0 is done.
"""

from langchain_core.tools import tool

from langchain_mlx import ChatMLX


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny in {city}."


chat = ChatMLX(
    model="qwen2.5-coder-0.5b-instruct",  # qwen2: tensor or pipeline parallel
    distributed="pipeline",  # or "tensor"; ignored when not run under mlx.launch
    max_tokens=64,
)
print(chat.invoke("What is the capital of France?").content)
for chunk in chat.stream("Count from one to five."):
    print(chunk.content, end="", flush=True)
print()
forced = chat.bind_tools([get_weather], tool_choice="any")
print(forced.invoke("Weather in Paris?").tool_calls)
answers = chat.batch(["Say hi.", "Name a color.", "2 + 2?", "A fruit?"])
print([m.content for m in answers])
chat.close()  # the other ranks exit with status 0
