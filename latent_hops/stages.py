"""Stages of a two-hop query (reference §5): one row per case with the layer of each stage.

- first hop resolved: min layer where e2 is decoded from t1;
- information propagation: mean of (min layer where knocking out last -> t1 changes the
  answer, min layer whose attention output at t2 ranks e2 first, min layer where e2 is
  decoded from t2), over the measures that exist for the case;
- second-hop onset: the first layer from which e3's logit-lens rank at t2 stays within the
  top ``onset_k`` up to the last layer (``logit_lens.onset_layer``);
- second hop resolved: min layer where e3 is decoded from t2;
- prediction extracted: min layer whose MLP output at t2 ranks the model's prediction first.

"Decoded" is estimated by the logit lens, by Patchscopes and by linear probes (column
``method``), whichever were run.
"""

from __future__ import annotations

from collections.abc import Collection

import pandas as pd

from latent_hops.errors import InputError
from latent_hops.knockout import knockout_layer
from latent_hops.logit_lens import onset_layer, resolution_layers
from latent_hops.patchscopes import patchscope_layers
from latent_hops.probe import probe_layers
from latent_hops.projection import projection_layers

STAGES = ["first_hop_layer", "info_propagation_layer", "second_hop_onset_layer", "second_hop_layer",
          "prediction_extracted_layer"]


def stage_table(
    evaluation: pd.DataFrame,
    lens: pd.DataFrame | None,
    projection: pd.DataFrame | None,
    knockout: pd.DataFrame | None,
    scopes: pd.DataFrame | None = None,
    probed: pd.DataFrame | None = None,
    onset_k: int = 10,
) -> pd.DataFrame:
    """Columns ``id``, ``subset``, ``split``, ``method``, then the five stage layers.

    An analysis passed as ``None`` (skipped) leaves the columns it feeds empty (NaN)."""
    parts = [onset_layer(lens, onset_k) if lens is not None else None,
             projection_layers(projection).set_index("id") if projection is not None else None,
             knockout_layer(knockout) if knockout is not None else None]
    ids = evaluation[["id"]].set_index("id").iloc[:0]
    shared = pd.concat([p for p in parts if p is not None] or [ids], axis=1)
    for column in ("second_hop_onset_layer", "attn_e2_layer", "prediction_extracted_layer", "knockout_layer"):
        if column not in shared:
            shared[column] = float("nan")
    estimates = {}
    if lens is not None:
        estimates["logit_lens"] = resolution_layers(lens).set_index("id")
    if scopes is not None and not scopes.empty:
        estimates["patchscopes"] = patchscope_layers(scopes).set_index("id")
    if probed is not None and not probed.empty:
        estimates["probe"] = probe_layers(probed).set_index("id")
    if not estimates:
        raise InputError("the stage table needs a decoding method: run the logit lens, Patchscopes or probes")
    tables = []
    for method, decoded in estimates.items():
        t = shared.join(decoded, how="outer")
        for column in ("first_hop_layer", "e2_at_t2_layer", "second_hop_layer"):
            if column not in t:
                t[column] = float("nan")
        t["info_propagation_layer"] = t[["knockout_layer", "attn_e2_layer", "e2_at_t2_layer"]].mean(axis=1)
        t["method"] = method
        tables.append(t.rename_axis("id").reset_index())
    out = pd.concat(tables, ignore_index=True).merge(evaluation[["id", "subset", "split"]], on="id", how="left")
    return out[["id", "subset", "split", "method"] + STAGES]


def stage_medians(stages: pd.DataFrame) -> pd.DataFrame:
    """Median layer of each stage per method x split x subset."""
    return stages.groupby(["method", "split", "subset"])[STAGES].median()


STAGE_SOURCES = {
    "first_hop_layer": ((), "e2 never decoded from t1"),
    "info_propagation_layer": (("knockout", "projection"), "no knockout effect, no attention output ranking e2 "
                               "first, e2 never decoded from t2"),
    "second_hop_onset_layer": (("logit-lens",), "e3 never stays in the logit lens' top k at t2"),
    "second_hop_layer": ((), "e3 never decoded from t2"),
    "prediction_extracted_layer": (("projection",), "no MLP output at t2 ranks the prediction first"),
}
"""For each stage: the analyses (besides the row's decoding method) that feed it, and what
an empty column means when they ran."""


def empty_stage_notes(stages: pd.DataFrame, skipped: Collection[str] = ()) -> list[str]:
    """One line per (method, stage) column with no value in any case, saying why: all of
    its analyses were skipped ("not measured"), or they ran and the stage was never reached."""
    notes = []
    for method, rows in stages.groupby("method", sort=False):
        for stage in STAGES:
            if rows[stage].notna().any():
                continue
            fed_by, never = STAGE_SOURCES[stage]
            if fed_by and set(fed_by) <= set(skipped):
                notes.append(f"{method}: {stage} empty -- not measured ({', '.join(fed_by)} skipped)")
            else:
                notes.append(f"{method}: {stage} empty -- never reached in {len(rows)} cases: {never}")
    return notes
