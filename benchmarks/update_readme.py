"""Copy the benchmark result tables into README.md (between the bench markers)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    readme = (ROOT / "README.md").read_text()
    for marker in re.findall(r"<!-- bench:([\w.-]+) -->", readme):
        result = RESULTS / f"{marker}.md"
        if not result.exists():  # not run yet: leave the README as it is
            print(f"no {result.name}: run its benchmark")
            continue
        table = result.read_text().strip()
        readme = re.sub(
            rf"(<!-- bench:{re.escape(marker)} -->).*?(<!-- /bench:{re.escape(marker)} -->)",
            lambda m, t=table: f"{m.group(1)}\n{t}\n{m.group(2)}",
            readme,
            flags=re.S,
        )
    (ROOT / "README.md").write_text(readme)


if __name__ == "__main__":
    main()
