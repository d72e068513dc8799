"""The documentation's numbers on the toy models, produced by named commands and checked.

Each block of docs/guide/toy-models.md (``README`` below: the page that holds the numbers)
between ``<!-- numbers: NAME -->`` and ``<!-- /numbers: NAME -->``
is rendered here from the run directory of the commands that BLOCKS names. Regenerate after a
change that moves them, and let the test (tests/test_readme_numbers.py) hold them:

    python scripts/readme_numbers.py --runs runs/readme --write   # run the commands, rewrite
    python scripts/readme_numbers.py --runs runs/readme           # check only (exit 1 on a diff)

A run directory that already holds a command's tables is reused (the CLI's own provenance).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

README = Path(__file__).resolve().parents[1] / "docs" / "guide" / "toy-models.md"
REAL_PAGE = README.with_name("real-models.md")
"""Where the real-model blocks (``REAL_BLOCKS``) live: rendered with ``--real`` from a run of
their (slow) commands, which the test suite does not repeat; it checks they are there."""


@dataclass(frozen=True)
class Block:
    """One block of README numbers: the commands that make its run directory (``{run}`` is
    replaced by it), what the README calls them, and how the block is rendered from it."""

    name: str
    commands: tuple[tuple[str, ...], ...]
    shown_as: str
    render: Callable[[Path], str]
    checked: bool = True  # the suite re-runs the commands and compares (the toys' blocks)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _ci(r) -> str:
    """``45% (38–53)``: a rate with its Wilson 95% interval."""
    return f"{_pct(r.rate)} ({100 * r.ci_low:.0f}–{100 * r.ci_high:.0f})"


def _rate(r) -> str:
    """``45% (38–53), 76/169``: a rate with its interval and counts."""
    return f"{_ci(r)}, {int(r.successes)}/{int(r.cases)}"


def _labelled(run: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    from latent_hops.analyses import backpatch as bp

    evaluation = pd.read_parquet(run / "evaluation.parquet")
    return bp.with_labels(pd.read_parquet(run / "backpatch.parquet"), evaluation), evaluation


def _oracle_table(oracle: pd.DataFrame, split: str) -> str:
    rows = oracle[(oracle.split == split) & (oracle.subset == "incorrect")].set_index(
        ["position", "kind"]
    )
    lines = [
        "| position | back-patch (s > t) | forward control (s < t) | random-direction control |",
        "|---|---|---|---|",
    ]
    for position in sorted(rows.index.get_level_values(0).unique()):
        cells = [_rate(rows.loc[(position, kind)]) for kind in ("back", "forward", "random")]
        lines.append(f"| {position} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _p(p: float) -> str:
    return f"p = {p:.2g}" if p >= 1e-4 else "p < 0.0001"


def _paired(tests: pd.DataFrame) -> str:
    """Back-patching against each control on the same incorrect cases (McNemar's exact test
    of the oracles), one sentence."""
    rows = tests.query("split == 'all' and subset == 'incorrect'")
    parts = [
        f"{r.position} vs {r.control} {int(r.back_only)}:{int(r.control_only)} ({_p(r.oracle_p)})"
        for r in rows.itertuples()
    ]
    return (
        "Case by case (cases rescued by back-patching only : by the control only, McNemar's "
        f"exact test; {len(parts)} tests, uncorrected): " + ", ".join(parts) + "."
    )


def _hops(evaluation: pd.DataFrame, split: str) -> str:
    from latent_hops.evaluation import summarize

    s = summarize(evaluation).loc[split]
    return (
        f"hop accuracy ({split}, {int(s.queries):,} queries): first hop {_pct(s.first_hop)}, "
        f"second hop {_pct(s.second_hop)}, composition {_pct(s.composition)}; analysed "
        f"{int(s.correct):,} correct and {int(s.incorrect):,} incorrect "
        f"({int(s.excluded):,} excluded)"
    )


def render_demo(run: Path) -> str:
    from latent_hops.analyses import backpatch as bp

    labelled, evaluation = _labelled(run)
    oracle = bp.oracle_rates(labelled)
    incorrect = labelled[labelled.subset == "incorrect"].drop_duplicates("id")
    per_split = ", ".join(
        f"{n} {s}" for s, n in incorrect.split.value_counts().sort_index().items()
    )
    cells = int(oracle.cells.max())
    best = bp.non_oracle(labelled).query("split == 'all' and kind == 'back'").iloc[0]
    fig = oracle.query("split == 'test_id' and subset == 'incorrect' and position == 't2'")
    fig_rates = ", ".join(f"{r.kind} {_pct(r.rate)}" for r in fig.itertuples())
    return "\n".join(
        [
            f"The toy's {_hops(evaluation, 'test_id')}. Back-patching the demo's "
            f"{len(incorrect)} incorrect cases ({per_split}), oracle (at least one of the "
            f"{cells} cells of a kind gives e3), with Wilson 95% intervals and counts:",
            "",
            _oracle_table(oracle, "all"),
            "",
            _paired(bp.oracle_tests(labelled)),
            "",
            f"The single best back-patching cell chosen on {int(best.train_cases)} incorrect "
            f"cases ({best.position}, {int(best.source_layer)} → {int(best.target_layer)}) "
            f"rescues {_pct(best.gain)} ({100 * best.gain_ci_low:.0f}–"
            f"{100 * best.gain_ci_high:.0f}) of the other {int(best.heldout_incorrect)} and "
            f"breaks {_pct(best.damage)} ({100 * best.damage_ci_low:.0f}–"
            f"{100 * best.damage_ci_high:.0f}) of the {int(best.correct_cases)} correct cases "
            f"(`non_oracle`). The figure below is the test_id part at t2 "
            f"(n = {int(fig.cases.max())}: {fig_rates}).",
        ]
    )


def _probed(run: Path) -> pd.DataFrame:
    """The probe table with each case's subset."""
    return pd.read_parquet(run / "probe.parquet").merge(
        pd.read_parquet(run / "evaluation.parquet")[["id", "subset"]], on="id"
    )


def _probe_by_subset(probed: pd.DataFrame) -> pd.DataFrame:
    """Probe accuracy per subset x entity x position x layer, and its control's."""
    return probed.groupby(["subset", "entity", "position", "hidden_layer"])[
        ["token_match", "control_token_match"]
    ].mean()


def render_probe(run: Path) -> str:
    probed = _probed(run)
    acc = _probe_by_subset(probed)
    counts = probed.drop_duplicates("id").subset.value_counts()
    last = int(acc.index.get_level_values("hidden_layer").max())
    e2_t2 = acc.xs(("e2", "t2"), level=("entity", "position"))["token_match"]
    peak = int(e2_t2.xs("correct").idxmax())
    rows = [
        ("e2 linearly decodable at t2 (probe), layer 2", lambda s: _pct(e2_t2[s, 2])),
        (f"e2 at t2, layer {peak} (its peak on correct cases)", lambda s: _pct(e2_t2[s, peak])),
        (
            f"e3 linearly decodable at t2, layer {last}",
            lambda s: _pct(acc.loc[(s, "e3", "t2", last), "token_match"]),
        ),
        (
            "e2 decodable at t1 (any layer)",
            lambda s: (
                "≤ "
                + _pct(
                    acc.xs(("e2", "t1"), level=("entity", "position")).xs(s)["token_match"].max()
                )
            ),
        ),
        (
            "shuffled-target control (any probe, any layer)",
            lambda s: "≤ " + _pct(acc.xs(s)["control_token_match"].max()),
        ),
    ]
    head = " | ".join(f"{s} (test_id, n = {counts[s]})" for s in ("correct", "incorrect"))
    lines = [f"| | {head} |", "|---|---|---|"]
    lines += [f"| {label} | {f('correct')} | {f('incorrect')} |" for label, f in rows]
    return "\n".join(lines)


def render_gpt2(run: Path) -> str:
    from latent_hops.analyses import backpatch as bp
    from latent_hops.analyses.logit_lens import resolution_layers

    evaluation = pd.read_parquet(run / "evaluation.parquet")
    subset = evaluation.set_index("id").subset
    lens = resolution_layers(pd.read_parquet(run / "logit_lens.parquet"))
    lens["subset"] = lens.id.map(subset)
    by_2 = (lens.first_hop_layer <= 2).groupby(lens.subset).mean()
    acc = _probe_by_subset(_probed(run)).xs(("e2", "t1"), level=("entity", "position"))
    acc = acc["token_match"]
    oracle = bp.oracle_rates(_labelled(run)[0])
    t1 = oracle.query("split == 'all' and subset == 'incorrect' and position == 't1'")
    t1 = t1.set_index("kind")
    return (
        f"The GPT-2 toy's {_hops(evaluation, 'test_id')}. e2 is top-1 under the logit lens at "
        f"the e1 token (t1) by layer 2 in {_pct(by_2['correct'])} of correct and "
        f"{_pct(by_2['incorrect'])} of incorrect cases (linear probe at t1, best layer: "
        f"{_pct(acc.xs('correct').max())} / {_pct(acc.xs('incorrect').max())}); back-patching "
        f"at t1 rescues {_ci(t1.loc['back'])} of {int(t1.cases.max())} incorrect cases against "
        f"{_ci(t1.loc['forward'])} for forward patches and {_ci(t1.loc['random'])} for random "
        "directions (oracle, Wilson 95% intervals)."
    )


BLOCKS = (
    Block(
        "demo",
        (("demo", "--out", "{run}"),),
        "`make demo` (= `latent-hops demo --out runs/demo`)",
        render_demo,
    ),
    Block(
        "probe",
        (
            (
                "probe",
                "--model",
                "toy",
                "--split",
                "test_id",
                "--max-cases",
                "150",
                "--out",
                "{run}",
            ),
        ),
        "`latent-hops probe --model toy --split test_id --max-cases 150 --out runs/toy-probe`",
        render_probe,
    ),
    Block(
        "toy-gpt2",
        (
            ("logit_lens", "--model", "toy-gpt2", "--split", "test_id", "--max-cases", "150"),
            ("probe", "--model", "toy-gpt2", "--split", "test_id", "--max-cases", "150"),
            (
                "backpatch",
                "--model",
                "toy-gpt2",
                "--split",
                "test_id",
                "--subset",
                "incorrect",
                "--max-cases",
                "80",
                "--positions",
                "t1",
            ),
        ),
        "`latent-hops logit_lens|probe --model toy-gpt2 --split test_id --max-cases 150 --out "
        "runs/toy-gpt2` and `latent-hops backpatch --model toy-gpt2 --split test_id --subset "
        "incorrect --max-cases 80 --positions t1 --out runs/toy-gpt2`",
        render_gpt2,
    ),
)


def _wall(run: Path) -> str:
    """The wall time of the run's first complete command, from its manifest (a later command
    that reused its tables is not counted)."""
    from datetime import datetime

    runs = json.loads((run / "manifest.json").read_text())["runs"]
    first = next(r for r in runs if r["status"] == "ok")
    end, start = (datetime.fromisoformat(first[k]) for k in ("finished", "started"))
    seconds = int((end - start).total_seconds())
    return f"{seconds // 60} min {seconds % 60} s"


def render_smollm2_demo(run: Path) -> str:
    from latent_hops.analyses import backpatch as bp

    labelled, evaluation = _labelled(run)
    oracle = bp.oracle_rates(labelled)
    cases = labelled.drop_duplicates("id").subset.value_counts()
    cells = int(oracle.cells.max())
    stages = pd.read_parquet(run / "stages.parquet")
    medians = stages.groupby(["method", "subset"])[["first_hop_layer", "second_hop_layer"]]
    medians = medians.median().round(1)
    stage_text = "; ".join(
        f"{method} {subset}: first hop {r.first_hop_layer:g}, second hop {r.second_hop_layer:g}"
        for (method, subset), r in medians.iterrows()
    )
    return "\n".join(
        [
            f"SmolLM2-135M's {_hops(evaluation, 'all')}; the whole demo took {_wall(run)} "
            "(wall, from its manifest). Back-patching "
            f"{cases.get('incorrect', 0)} incorrect and {cases.get('correct', 0)} correct cases "
            f"(oracle over the {cells} cells of a kind on the every-3 grid), Wilson 95% "
            "intervals and counts, incorrect cases:",
            "",
            _oracle_table(oracle, "all"),
            "",
            _paired(bp.oracle_tests(labelled)),
            "",
            f"Median stage layers (NaN: no case reached it): {stage_text}. With 3 cases per "
            "subset these are a smoke test of the pipeline on a real model, not a finding.",
        ]
    )


REAL_BLOCKS = (
    Block(
        "smollm2-demo",
        (
            (
                "demo",
                "--model",
                "smollm2-135m",
                "--dataset",
                "world",
                "--limit",
                "500",
                "--max-cases",
                "3",
                "--source-layers",
                "every:3",
                "--target-layers",
                "every:3",
                "--target",
                "paper",
                "--patchscope-source-layers",
                "every:6",
                "--patchscope-target-layers",
                "every:6",
                "--swap-layers",
                "every:3",
            ),
        ),
        "`make demo-smollm2` (= `latent-hops demo --model smollm2-135m --dataset world --limit "
        "500 --max-cases 3 --source-layers every:3 --target-layers every:3 --target paper "
        "--patchscope-source-layers every:6 --patchscope-target-layers every:6 --swap-layers "
        "every:3 --out runs/demo-smollm2`)",
        render_smollm2_demo,
        checked=False,
    ),
)


def run_block(block: Block, run: Path) -> str:
    """Run the block's commands into ``run`` (their tables are reused when made the same way)
    and render it."""
    from latent_hops.cli import main

    for command in block.commands:
        argv = [a.replace("{run}", str(run)) for a in command]
        if "--out" not in argv:
            argv += ["--out", str(run)]
        if main([*argv, "--device", "cpu"]) != 0:
            raise SystemExit(f"readme_numbers: {' '.join(argv)} failed")
    return block_text(block, block.render(run))


def block_text(block: Block, body: str) -> str:
    """The README's text of a block, markers included."""
    how = (
        "a test checks them"
        if block.checked
        else "the test suite does not repeat the run (`--real` does)"
    )
    return (
        f"<!-- numbers: {block.name} -->\n*Numbers from {block.shown_as}; "
        f"`scripts/readme_numbers.py` renders them and {how}.*\n\n"
        f"{body}\n<!-- /numbers: {block.name} -->"
    )


def _pattern(name: str) -> re.Pattern:
    return re.compile(
        rf"<!-- numbers: {re.escape(name)} -->.*?<!-- /numbers: {re.escape(name)} -->", re.S
    )


def readme_block(readme: str, name: str) -> str:
    """The block ``name`` as the README has it."""
    match = _pattern(name).search(readme)
    if match is None:
        raise KeyError(f"README has no numbers block {name!r}")
    return match.group(0)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, default=Path("runs/readme"))
    parser.add_argument("--write", action="store_true", help="rewrite the README's blocks")
    parser.add_argument("--only", nargs="*", help="block names (default: all)")
    parser.add_argument(
        "--real", action="store_true", help="the real-model blocks (slow) of REAL_PAGE instead"
    )
    args = parser.parse_args()
    page, blocks = (REAL_PAGE, REAL_BLOCKS) if args.real else (README, BLOCKS)
    readme = page.read_text()
    failed = False
    for block in blocks:
        if args.only and block.name not in args.only:
            continue
        text = run_block(block, args.runs / block.name)
        if args.write:
            readme = _pattern(block.name).sub(lambda _: text, readme)
            continue
        old = readme_block(readme, block.name)
        if old != text:
            failed = True
            sys.stdout.writelines(
                difflib.unified_diff(
                    old.splitlines(True), text.splitlines(True), "README.md", "rendered"
                )
            )
    if args.write:
        page.write_text(readme)
        print(json.dumps({"written": [b.name for b in blocks]}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
