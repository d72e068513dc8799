"""The two back-patching engines; they give identical generations (tests check it cell by
cell):

- ``sweep_naive``: per query and cell, one generation with the patch as an edit (the test
  oracle);
- ``sweep``: the fast engine. The clean forward is walked block by block (the source
  states are read off it at the needed positions), and at each target layer t every
  (query, position, source) row is patched into the clean residual of layer t and joins a
  batch of rows that grows as the layers rise: rows of every target layer and every case
  of a batch share their forward passes and their decoding
  (``patching.generate_with_patches``, which Patchscopes uses too). On the hooked backend
  layers <= t are never recomputed, nor the columns before the patched one: their
  keys/values are shared from the clean run. What it costs against the protocol's least
  work: ``cost``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from latent_hops.analyses.backpatch.cells import (
    CPU_MEMORY_BUDGET_MB,
    KINDS,
    RESULT_COLUMNS,
    TABLE,
    BackpatchConfig,
    Cell,
    all_cells,
)
from latent_hops.backend import GreedyOutput, Model, Site, free_memory_mb
from latent_hops.cases import Case, case_batches
from latent_hops.errors import InputError
from latent_hops.generation import alias_match, decode
from latent_hops.patching import (
    PatchRow,
    generate_with_patches,
    patch_edit,
    seeded_direction,
)
from latent_hops.positions import tokenize_prompts
from latent_hops.ranks import best_rank
from latent_hops.tables import rank_or_null


def random_direction(
    case_id: str, position: str, cell: Cell, like: torch.Tensor, seed: int
) -> torch.Tensor:
    """A random direction with the norm of ``like``, fixed by (query, position, cell, seed)."""
    return seeded_direction(f"{seed}|{case_id}|{position}|{cell.source}|{cell.target}", like)


def _patch_value(
    case: Case, position: str, cell: Cell, source_state: torch.Tensor, seed: int
) -> torch.Tensor:
    if cell.kind == "random":
        return random_direction(case.id, position, cell, source_state, seed)
    return source_state


def _screened(rank: int, screen: int | None) -> bool:
    """A cell whose first-step e3 rank is beyond ``screen`` is not decoded (no e3 token:
    rank -1 from ``best_rank``)."""
    return screen is not None and not 0 <= rank <= screen


def _records(
    model: Model,
    rows: Sequence[tuple[Case, str, Cell]],
    out: GreedyOutput,
    screen: int | None = None,
) -> list[dict]:
    logprobs = out.first_logits.log_softmax(-1)
    records = []
    for i, (case, position, cell) in enumerate(rows):
        rank, logprob = (float(x) for x in best_rank(logprobs[i], case.first_tokens["e3"]))
        screened = _screened(int(rank), screen)
        text = None if screened else decode(model, out.tokens[i].tolist())
        records.append(
            {
                "id": case.id,
                "position": position,
                "source_layer": cell.source,
                "target_layer": cell.target,
                "kind": cell.kind,
                "generation": text,
                "alias_match": text is not None and alias_match(text, case.e3_names),
                "e3_rank": rank_or_null(int(rank)),
                "e3_logprob": logprob,
                "screened": screened,
            }
        )
    return records


def _frame(records: list[dict]) -> pd.DataFrame:
    if not records:
        return TABLE.empty()
    frame = pd.DataFrame(records, columns=RESULT_COLUMNS)
    return frame.astype({"alias_match": "boolean", "e3_rank": "Int64", "e3_logprob": float})


@torch.no_grad()
def sweep_naive(
    model: Model, cases: Sequence[Case], config: BackpatchConfig | None = None
) -> pd.DataFrame:
    """The reference: one generation per query, position and cell, the patch an edit."""
    config = config or BackpatchConfig()
    if config.screen is not None or config.stop_when_decided:
        raise InputError(
            "the first-token screen and stopping decided cells are features of the fast engine "
            "(sweep), not of the reference"
        )
    cells = all_cells(model, config)
    records = []
    for case in tqdm(cases, desc="backpatch (naive)", disable=not config.progress):
        tok = tokenize_prompts(model, [case.prompt])
        layers = sorted({c.source for c in cells})
        cols = torch.tensor([[case.positions[p] for p in config.positions]])
        states = model.read_sites(
            tok.tokens, tok.attention_mask, cols, [Site("resid", s) for s in layers]
        )
        for pi, position in enumerate(config.positions):
            p = case.positions[position]
            for cell in cells:
                value = _patch_value(
                    case, position, cell, states[0, pi, layers.index(cell.source)], config.seed
                )
                edit = patch_edit(cell.target, torch.tensor([p]), value[None])
                out = model.greedy_generate(
                    tok.tokens, tok.attention_mask, config.max_new_tokens, [edit]
                )
                records += _records(model, [(case, position, cell)], out)
    return _frame(records)


def rows_per_batch(model: Model, seq_len: int, config: BackpatchConfig) -> int:
    """Rows of the fast engine per forward pass, from the memory budget (or fixed)."""
    if config.batch_rows is not None:
        if config.batch_rows < 1:
            raise InputError(f"batch_rows must be >= 1, got {config.batch_rows}")
        return config.batch_rows
    bytes_per_row = model.bytes_per_patched_row(seq_len, config.max_new_tokens)
    budget = config.memory_budget_mb
    if budget is not None and not budget > 0:  # NaN too
        raise InputError(f"memory_budget_mb must be > 0, got {budget}")
    if budget is None:
        free = free_memory_mb(model.device)
        budget = CPU_MEMORY_BUDGET_MB if free is None else free / 2
    return max(1, int(budget * 2**20 // bytes_per_row))


@torch.no_grad()
def sweep(
    model: Model, cases: Sequence[Case], config: BackpatchConfig | None = None
) -> pd.DataFrame:
    """The fast engine; same rows and generations as ``sweep_naive`` (see module docstring)."""
    config = config or BackpatchConfig()
    cells = all_cells(model, config)
    if not cases or not cells:
        return _frame([])
    layers = sorted({c.source for c in cells} | {c.target for c in cells})
    layer_index = {layer: i for i, layer in enumerate(layers)}
    lengths = [len(model.tokenizer(c.prompt, add_special_tokens=False)["input_ids"]) for c in cases]
    max_rows = rows_per_batch(model, max(lengths) + 1, config)
    per_case = len(config.positions) * len(cells)  # rows per case
    records: list[dict] = []
    bar = tqdm(
        total=len(cases) * len(config.positions) * len(cells),
        desc="backpatch",
        unit="cell",
        disable=not config.progress,
    )
    for b in case_batches(model, cases, max(1, max_rows // per_case), config.positions, lengths):
        batch, tok, cols = b.cases, b.tok, b.columns
        walk = model.walk_prompt(tok.tokens, tok.attention_mask, max(layers))
        here = torch.arange(len(batch), device=tok.tokens.device)[:, None]
        states = torch.stack(  # the clean states to patch in, read off the walk: [q, P, layers, d]
            [walk.hidden(layer)[here, cols.to(here.device)] for layer in layers], dim=2
        )
        rows = [
            PatchRow(qi, int(cols[qi, pi]), cell.target, (pi, cell))
            for qi in range(len(batch))
            for pi in range(len(config.positions))
            for cell in cells
        ]

        def values(chunk: Sequence[PatchRow]) -> torch.Tensor:
            return torch.stack(
                [
                    _patch_value(
                        batch[r.base],
                        config.positions[r.key[0]],
                        r.key[1],
                        states[r.base, r.key[0], layer_index[r.key[1].source]],
                        config.seed,
                    )
                    for r in chunk
                ]
            )

        def on_output(chunk: Sequence[PatchRow], out: GreedyOutput) -> None:
            records.extend(
                _records(
                    model,
                    [(batch[r.base], config.positions[r.key[0]], r.key[1]) for r in chunk],
                    out,
                    config.screen,
                )
            )
            bar.update(len(chunk))

        def keep(chunk: Sequence[PatchRow], logits: torch.Tensor) -> torch.Tensor:
            logprobs = logits.float().log_softmax(-1)
            return torch.tensor(
                [
                    not _screened(
                        int(best_rank(logprobs[i], batch[r.base].first_tokens["e3"])[0]),
                        config.screen,
                    )
                    for i, r in enumerate(chunk)
                ],
                device=logits.device,
            )

        def decided(chunk: Sequence[PatchRow], tokens: torch.Tensor) -> torch.Tensor:
            """An e3 alias has appeared: a substring stays one as the generation grows."""
            texts = [decode(model, ids) for ids in tokens.tolist()]
            return torch.tensor(
                [alias_match(t, batch[r.base].e3_names) for t, r in zip(texts, chunk)],
                dtype=torch.bool,
            )

        generate_with_patches(
            model,
            tok.tokens,
            tok.attention_mask,
            rows,
            values,
            on_output,
            config.max_new_tokens,
            max_rows,
            keep=None if config.screen is None else keep,
            walk=walk,
            stop=decided if config.stop_when_decided else None,
        )
    bar.close()
    order = {c.id: i for i, c in enumerate(cases)}
    kind_order = {k: i for i, k in enumerate(KINDS)}
    frame = _frame(records).assign(
        _q=lambda f: f["id"].map(order), _k=lambda f: f["kind"].map(kind_order)
    )
    frame = frame.sort_values(["_q", "position", "_k", "target_layer", "source_layer"])
    return frame.drop(columns=["_q", "_k"]).reset_index(drop=True)
