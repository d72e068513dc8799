"""The mutation score of ``make mutation`` (mutmut 3): killed / (killed + survived) per module
and in all, and every surviving mutant with its diff (``mutmut show``), to kill or to explain.

    python scripts/mutation_score.py [--no-diffs]

Mutants mutmut could not check (no test covers them, timeouts) are counted apart.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

STATUS = {
    **{1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped"},
    **{36: "timeout", 24: "timeout", -24: "timeout", 37: "type check", None: "not checked"},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-diffs", action="store_true")
    args = parser.parse_args()
    metas = sorted(Path("mutants").rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/: run `make mutation`")
        return 1
    total: Counter[str] = Counter()
    survivors = []
    print(f"{'module':55} {'killed':>7} {'survived':>9} {'other':>6} {'score':>7}")
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter(STATUS.get(code, "suspicious") for code in codes.values())
        total += counts
        survivors += [name for name, code in codes.items() if STATUS.get(code) == "survived"]
        judged = counts["killed"] + counts["survived"]
        other = sum(counts.values()) - judged
        score = f"{counts['killed'] / judged:.0%}" if judged else "-"
        module = str(meta.relative_to("mutants")).removesuffix(".meta")
        print(f"{module:55} {counts['killed']:7} {counts['survived']:9} {other:6} {score:>7}")
    judged = total["killed"] + total["survived"]
    others = {k: v for k, v in total.items() if k not in ("killed", "survived")}
    score = total["killed"] / judged if judged else 0.0
    print(f"\nmutation score: {total['killed']} killed of {judged} ({score:.1%})")
    print(f"not judged: {others}")
    for name in survivors:
        print(f"\nsurvived: {name}")
        if not args.no_diffs:
            show = [sys.executable, "-m", "mutmut", "show", name]
            shown = subprocess.run(show, capture_output=True, text=True)
            print(shown.stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
