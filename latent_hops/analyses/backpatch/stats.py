"""Back-patching statistics: the paper's oracle (a case counts if any cell gives e3), per-cell
rates (heatmap input), what counted as a rescue, the best single cell chosen on held-out
cases (beyond the oracle), and back-patching against its controls on the same cases.

Every interval is a Wilson 95% interval of a count (``latent_hops.stats.rate_interval``);
the comparisons are paired: McNemar's exact test of the oracle, a paired permutation test of
the per-case share of successful cells (``latent_hops.stats``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from latent_hops.stats import mcnemar, paired_permutation, rate_interval
from latent_hops.tables import (
    POSITION,
    SOURCE_LAYER,
    SPLIT,
    SUBSET,
    TARGET_LAYER,
    Column,
    TableSchema,
    register_schema,
)

_GROUP_COLUMNS = (
    SPLIT.described("a dataset split, or 'all' (every split pooled)"),
    SUBSET.described("correct or incorrect"),
    POSITION,
    Column("kind", "str", "back, forward or random"),
)
CELLS = register_schema(
    TableSchema(
        "backpatch_cells.parquet",
        "a split x subset x position x kind x cell: the heatmaps' input",
        (
            *_GROUP_COLUMNS,
            SOURCE_LAYER,
            TARGET_LAYER,
            Column("cases", "int", "cases with this cell"),
            Column("successes", "int", "of them, cases whose generation has an e3 alias"),
            Column("rate", "float", "successes / cases"),
        ),
    )
)
ORACLE = register_schema(
    TableSchema(
        "backpatch_summary.json: oracle",
        "a split x subset x position x kind: the paper's oracle",
        (
            *_GROUP_COLUMNS,
            Column("cases", "int", "cases"),
            Column(
                "cells",
                "int",
                "cells per case the oracle ran over (comparable only at equal cells)",
            ),
            Column("successes", "int", "cases with at least one successful cell"),
            Column("rate", "float", "successes / cases"),
            Column("ci_low", "float", "Wilson 95% interval of the rate, low end"),
            Column("ci_high", "float", "Wilson 95% interval of the rate, high end"),
        ),
    )
)


def with_labels(results: pd.DataFrame, evaluation: pd.DataFrame) -> pd.DataFrame:
    """Attach each query's ``subset`` and ``split`` from the evaluation table."""
    return results.merge(evaluation[["id", "subset", "split"]], on="id", how="left")


GROUP = ["split", "subset", "position", "kind"]


def _with_all_splits(labelled: pd.DataFrame) -> pd.DataFrame:
    """The rows once per own split and once more under split ``all``."""
    if (labelled["split"] == "all").all():
        return labelled
    return pd.concat([labelled, labelled.assign(split="all")], ignore_index=True)


def oracle_rates(labelled: pd.DataFrame) -> pd.DataFrame:
    """Share of cases with at least one successful cell (``alias_match``), per split x subset x
    position x kind, with Wilson 95% intervals; ``successes`` counts those cases (rescued
    incorrect ones, or correct ones kept correct). A "split" of ``all`` pools the splits.

    ``cells`` is the number of cells each case had: an oracle over a coarser layer grid
    (fewer cells) is not comparable to one over all cells."""
    data = _with_all_splits(labelled)
    per_case = (
        data.groupby(GROUP + ["id"])
        .agg(success=("alias_match", "any"), cells=("alias_match", "size"))
        .reset_index()
    )
    rows = []
    for key, g in per_case.groupby(GROUP):
        successes = int(g["success"].sum())
        low, high = rate_interval(successes, len(g))
        rows.append(
            dict(
                zip(GROUP, key),
                cases=len(g),
                cells=int(g["cells"].max()),
                successes=successes,
                rate=float(g["success"].mean()),
                ci_low=low,
                ci_high=high,
            )
        )
    out = pd.DataFrame(rows, columns=ORACLE.names)
    ORACLE.check(out)
    return out


NON_ORACLE = register_schema(
    TableSchema(
        "backpatch_summary.json: non_oracle",
        "a split x kind: the single best cell, chosen on half of the incorrect cases",
        (
            SPLIT.described("a dataset split, or 'all'"),
            Column("kind", "str", "back, forward or random"),
            POSITION.described("the chosen cell's position"),
            SOURCE_LAYER.described("the chosen cell's source layer"),
            TARGET_LAYER.described("the chosen cell's target layer"),
            Column("train_rate", "float", "its success rate on the training half"),
            Column("train_cases", "int", "incorrect cases it was chosen on"),
            Column("heldout_incorrect", "int", "the other incorrect cases"),
            Column("gain", "float", "share of the held-out incorrect cases it rescues"),
            Column("gain_ci_low", "float", "Wilson 95% interval of the gain, low end"),
            Column("gain_ci_high", "float", "Wilson 95% interval of the gain, high end"),
            Column("correct_cases", "int", "correct cases"),
            Column("damage", "float", "share of the correct cases it breaks"),
            Column("damage_ci_low", "float", "Wilson 95% interval of the damage, low end"),
            Column("damage_ci_high", "float", "Wilson 95% interval of the damage, high end"),
        ),
    )
)


def cell_rates(labelled: pd.DataFrame) -> pd.DataFrame:
    """Success rate of each cell, per split x subset x position x kind (heatmap input)."""
    data = _with_all_splits(labelled)
    g = data.astype({"alias_match": bool}).groupby(GROUP + ["source_layer", "target_layer"])
    out = g["alias_match"].agg(cases="size", successes="sum", rate="mean").reset_index()
    CELLS.check(out)
    return out


def success_samples(labelled: pd.DataFrame, cells: int = 5, per_cell: int = 2) -> pd.DataFrame:
    """What counted as a rescue: for the ``cells`` cells with most rescued incorrect cases per
    position x kind, up to ``per_cell`` of their successful generations (the alias rule is a
    substring match, so "two continents: Africa and South America" counts for South America)."""
    wins = labelled[(labelled.subset == "incorrect") & labelled.alias_match]
    key = ["position", "kind", "source_layer", "target_layer"]
    counts = wins.groupby(key).size().rename("rescued").reset_index()
    top = (
        counts.sort_values("rescued", ascending=False, kind="stable")
        .groupby(["position", "kind"])
        .head(cells)
    )
    sample = wins.merge(top, on=key).groupby(key, sort=False).head(per_cell)
    columns = key + ["rescued", "id", "generation"]
    return (
        sample[columns]
        .sort_values(key[:2] + ["rescued"], ascending=[True, True, False])
        .reset_index(drop=True)
    )


def non_oracle(labelled: pd.DataFrame, train_fraction: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """Beyond the paper's oracle: pick the single best (position, s, t) of each kind on a
    train part of the incorrect cases, then measure on the held-out incorrect cases the
    share rescued (accuracy gain) and on the correct cases the share broken (damage)."""
    rows = []
    for split, data in _with_all_splits(labelled).groupby("split"):
        inc_ids = np.array(sorted(data.loc[data.subset == "incorrect", "id"].unique()))
        np.random.default_rng(seed).shuffle(inc_ids)
        n_train = int(round(train_fraction * len(inc_ids)))
        train, held = set(inc_ids[:n_train]), set(inc_ids[n_train:])
        for kind, d in data.groupby("kind"):
            key = ["position", "source_layer", "target_layer"]
            tr = d[d.id.isin(train)]
            if tr.empty:
                continue
            best = tr.groupby(key)["alias_match"].mean().idxmax()
            cell = d.set_index(key).loc[best].reset_index()
            gain = cell.loc[cell.id.isin(held), "alias_match"].astype(bool)
            damage = ~cell.loc[cell.subset == "correct", "alias_match"].astype(bool)
            g_lo, g_hi = rate_interval(int(gain.sum()), len(gain))
            d_lo, d_hi = rate_interval(int(damage.sum()), len(damage))
            rows.append(
                {
                    "split": split,
                    "kind": kind,
                    "position": best[0],
                    "source_layer": int(best[1]),
                    "target_layer": int(best[2]),
                    "train_rate": float(tr.groupby(key)["alias_match"].mean().max()),
                    "train_cases": len(train),
                    "heldout_incorrect": len(gain),
                    "gain": float(gain.mean()) if len(gain) else float("nan"),
                    "gain_ci_low": g_lo,
                    "gain_ci_high": g_hi,
                    "correct_cases": len(damage),
                    "damage": float(damage.mean()) if len(damage) else float("nan"),
                    "damage_ci_low": d_lo,
                    "damage_ci_high": d_hi,
                }
            )
    out = pd.DataFrame(rows, columns=NON_ORACLE.names)
    NON_ORACLE.check(out)
    return out


ORACLE_TESTS = register_schema(
    TableSchema(
        "backpatch_summary.json: oracle_tests",
        "a split x subset x position x control: back-patching against a control, paired",
        (
            SPLIT.described("a dataset split, or 'all'"),
            SUBSET.described("correct or incorrect"),
            POSITION,
            Column("control", "str", "forward or random: the kind back-patching is compared with"),
            Column("cases", "int", "cases with cells of both kinds"),
            Column("back_only", "int", "cases only the back-patching oracle counts"),
            Column("control_only", "int", "cases only the control's oracle counts"),
            Column("oracle_p", "float", "McNemar's exact test of the two oracles (two-sided)"),
            Column("back_cell_rate", "float", "mean per-case share of successful back cells"),
            Column("control_cell_rate", "float", "the same for the control's cells"),
            Column(
                "cell_rate_p",
                "float",
                "paired permutation test of the per-case shares (two-sided, seed 0)",
            ),
        ),
    )
)


def oracle_tests(labelled: pd.DataFrame) -> pd.DataFrame:
    """Back-patching against each control (forward, random) on the same cases, per split x
    subset x position: McNemar's exact test of the oracle (a case counts if any cell gives
    e3) and a paired permutation test of the per-case share of successful cells."""
    data = _with_all_splits(labelled).astype({"alias_match": bool})
    keys = ["split", "subset", "position"]
    per_case = (
        data.groupby([*keys, "kind", "id"])["alias_match"]
        .agg(oracle="any", cell_rate="mean")
        .reset_index()
    )
    rows = []
    for key, g in per_case.groupby(keys):
        wide = g.pivot(index="id", columns="kind", values=["oracle", "cell_rate"])
        for control in ("forward", "random"):
            if "back" not in wide["oracle"] or control not in wide["oracle"]:
                continue
            both = wide.dropna(subset=[("oracle", "back"), ("oracle", control)])
            if both.empty:
                continue
            test = mcnemar(
                both["oracle", "back"].astype(bool), both["oracle", control].astype(bool)
            )
            back, other = both["cell_rate", "back"], both["cell_rate", control]
            rows.append(
                dict(zip(keys, key))
                | {
                    "control": control,
                    "cases": len(both),
                    "back_only": test.only_a,
                    "control_only": test.only_b,
                    "oracle_p": test.p_value,
                    "back_cell_rate": float(back.mean()),
                    "control_cell_rate": float(other.mean()),
                    "cell_rate_p": paired_permutation(back.tolist(), other.tolist()),
                }
            )
    out = pd.DataFrame(rows, columns=ORACLE_TESTS.names)
    ORACLE_TESTS.check(out)
    return out
