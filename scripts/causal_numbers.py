"""The causal findings of a run directory as the documentation states them: causal tracing
(where restoring t1 / t2 recovers the answer) and the bridge swap (where a t1 swap moves the
answer to the donor's), with counts, Wilson 95% intervals and paired tests.

    python scripts/causal_numbers.py runs/smol26        # after causal_tracing and interchange

Prints Markdown; docs/guide/real-models.md quotes it with the commands that made the run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from latent_hops.analyses.causal_tracing import CausalTracingConfig, peak_layers
from latent_hops.analyses.interchange import outcome_rates, paired_tests
from latent_hops.stats import mcnemar, rate_interval


def _rate(k: int, n: int) -> str:
    low, high = rate_interval(k, n)
    return f"{k}/{n} ({100 * low:.0f}–{100 * high:.0f}%)"


def tracing(run: Path) -> str:
    table = pd.read_parquet(run / "causal_tracing.parquet")
    evaluation = pd.read_parquet(run / "evaluation.parquet").set_index("id")
    done = table[table.skip_reason.isna() & (table.site == "resid")].copy()
    done["subset"] = done.id.map(evaluation.subset)
    lost = done.clean_prob - done.corrupted_prob
    done["recovered"] = (done.indirect_effect >= 0.5 * lost) & (lost > 0)
    lines = [
        "| prompt | subset | cases | clean p(answer) | corrupted | layers where restoring t1 "
        "recovers ≥ half in most cases | the same at t2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for (prompt, subset), g in done.groupby(["prompt", "subset"]):
        base = g.drop_duplicates("id")
        share = g.groupby(["position", "hidden_layer"]).recovered.mean()
        where = {
            p: [int(x) for x in share.xs(p).index if share[p, x] > 0.5]
            if p in share.index.get_level_values(0)
            else []
            for p in ("t1", "t2")
        }
        lines.append(
            f"| {prompt} | {subset} | {base.id.nunique()} | {base.clean_prob.mean():.3f} | "
            f"{base.corrupted_prob.mean():.3f} | {_span(where['t1'])} | {_span(where['t2'])} |"
        )
    layers = sorted(done.hidden_layer.unique())
    rows = []
    for prompt, g in done.groupby("prompt"):
        for layer in layers:
            at = g[g.hidden_layer == layer]
            t1 = at[at.position == "t1"].set_index("id").recovered
            t2 = at[at.position == "t2"].set_index("id").recovered
            both = t1.index.intersection(t2.index)
            test = mcnemar(t1[both].tolist(), t2[both].tolist())
            rows.append(
                f"| {prompt} | {int(layer)} | {_rate(int(t1[both].sum()), len(both))} | "
                f"{_rate(int(t2[both].sum()), len(both))} | {test.only_a}:{test.only_b}, "
                f"p = {test.p_value:.2g} |"
            )
    peaks = peak_layers(table, CausalTracingConfig()).trace_peak_layer.dropna()
    peaks = peaks.to_frame().join(evaluation.subset)
    peak_text = "; ".join(
        f"{s}: median {g.trace_peak_layer.median():g} (quartiles "
        f"{g.trace_peak_layer.quantile(0.25):g}–{g.trace_peak_layer.quantile(0.75):g}, "
        f"{len(g)} cases)"
        for s, g in peaks.groupby("subset")
    )
    return "\n".join(
        [
            *lines,
            "",
            "Cases where restoring one hidden state recovers at least half of the lost "
            "probability, t1 against t2 on the same cases (Wilson 95% intervals; McNemar's "
            f"exact test, t1 only : t2 only; {len(rows)} tests, uncorrected):",
            "",
            "| prompt | layer | t1 | t2 | McNemar |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Peak layer of the first hop at t1 (`trace_peak_layer`): {peak_text}.",
        ]
    )


def _span(layers: list[int]) -> str:
    return "none" if not layers else ", ".join(map(str, layers))


def interchange(run: Path) -> str:
    table = pd.read_parquet(run / "interchange.parquet")
    rates = outcome_rates(table)
    if rates.empty:
        reasons = table.drop_duplicates(["id", "kind"]).skip_reason.value_counts()
        return "No case had a donor:\n\n" + reasons.to_string()
    lines = [
        "| position | layer | swap → donor's answer | same-bridge control | random | "
        "swap vs same bridge (McNemar) |",
        "|---|---|---|---|---|---|",
    ]
    tests = paired_tests(table)  # empty when no case has a same-bridge donor
    if len(tests):
        tests = tests.set_index(["position", "hidden_layer"])
    done = table[table.skip_reason.isna()]
    for (position, layer), g in done.groupby(["position", "hidden_layer"]):
        cells = []
        for kind in ("swap", "same_bridge", "random"):
            k = g[g.kind == kind]
            outcome = "donor" if kind == "swap" else "own"
            if kind == "swap":
                cells.append(_rate(int((k.outcome == outcome).sum()), len(k)))
            else:  # the controls: answer kept
                cells.append("kept " + _rate(int((k.outcome == "own").sum()), len(k)))
        test = (
            tests.loc[(position, layer)]
            if len(tests) and (position, layer) in tests.index
            else None
        )
        paired = (
            f"{int(test.swap_only)}:{int(test.control_only)}, p = {test.p_value:.2g}"
            if test is not None
            else "–"
        )
        lines.append(f"| {position} | {int(layer)} | " + " | ".join(cells) + f" | {paired} |")
    skipped = table[table.skip_reason.notna()].drop_duplicates(["id", "kind"])
    reasons = skipped.groupby(["kind", "skip_reason"]).size()
    return (
        "\n".join(lines)
        + "\n\nWithout a swap: "
        + "; ".join(f"{kind} {n} ({reason})" for (kind, reason), n in reasons.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    args = parser.parse_args()
    if (args.run / "causal_tracing.parquet").is_file():
        print("## Causal tracing\n\n" + tracing(args.run) + "\n")
    if (args.run / "interchange.parquet").is_file():
        print("## Bridge swap\n\n" + interchange(args.run))


if __name__ == "__main__":
    main()
