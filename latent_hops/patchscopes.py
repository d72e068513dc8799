"""Patchscopes entity description (reference §1; Ghandeharioun et al. 2024).

The hidden state of a source layer at t1 or t2 of the two-hop prompt is written into the
placeholder of a target prompt at a target layer (prompt pass only), and the continuation
is classified as naming e1, e2, e3 or nothing known ("other"), with the paper's patterns
and priority. Per case: first-hop resolution layer = min source layer at which e2 is
decoded from t1 (any target layer); second-hop resolution layer = min source layer at
which e3 is decoded from t2.

Target-prompt presets: ``paper`` (the paper's English few-shot description prompt, for
real models) and ``toy`` (``"Voliba : Voliba , x :"``, the identity format the shipped toy
model was trained on). All rows of a target layer run in one batch through
``patching.generate_with_patches``, as in the back-patching engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from latent_hops import backend
from latent_hops.backend import GreedyOutput, Sampler
from latent_hops.cases import POSITIONS, Case
from latent_hops.errors import InputError
from latent_hops.generation import DEFAULT_MAX_NEW_TOKENS, length_batches
from latent_hops.patching import PatchRow, generate_with_patches, hidden_states_at
from latent_hops.positions import check_layers, tokenize_prompts

PAPER_TARGET = ("Syria: Syria is a country in the Middle East, Leonardo DiCaprio: Leonardo DiCaprio is an "
                "American actor, Samsung: Samsung is a South Korean multinational corporation, x")
TOY_TARGET = "Voliba : Voliba , x :"  # Voliba: the toy graph's first entity (seed 0)
REPEAT_TARGET = "cat -> cat; 1135 -> 1135; hello -> hello; x"  # Patchscopes' identity prompt
PATTERNS = (": {} ", ": {},", ": {}.", ": {}:", "{}: ")
ENTITIES = ("e1", "e2", "e3")  # classification priority
COLUMNS = ["id", "position", "source_layer", "target_layer", "seed", "generation", "decoded"]


@dataclass(frozen=True)
class TargetPrompt:
    """A target prompt and the character span of its placeholder (the last ``x`` by default)."""

    text: str
    placeholder: tuple[int, int]

    @classmethod
    def from_text(cls, text: str, placeholder: str = "x") -> TargetPrompt:
        start = text.rfind(placeholder)
        if start < 0:
            raise InputError(f"placeholder {placeholder!r} not found in target prompt {text!r}")
        return cls(text, (start, start + len(placeholder)))


TARGET_PRESETS = {"paper": TargetPrompt.from_text(PAPER_TARGET), "repeat": TargetPrompt.from_text(REPEAT_TARGET),
                  "toy": TargetPrompt.from_text(TOY_TARGET)}


@dataclass(frozen=True)
class PatchscopeConfig:
    target: TargetPrompt = TARGET_PRESETS["paper"]
    positions: tuple[str, ...] = POSITIONS
    layer_pairs: tuple[tuple[int, int], ...] | None = None  # (source, target); default: the grid below
    source_layers: tuple[int, ...] | None = None  # layer grid (``positions.parse_layers``); None: all
    target_layers: tuple[int, ...] | None = None
    seeds: tuple[int, ...] = ()  # empty: greedy; else one sampled generation per seed
    temperature: float = 1.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_rows: int = 512
    progress: bool = False


def classify(text: str, names: dict[str, Sequence[str]]) -> str:
    """``"e1"``, ``"e2"``, ``"e3"`` or ``"other"``: the first entity (in that priority) with
    an alias in one of the paper's patterns; the end of the text counts as a space."""
    text = text + " "
    for entity in ENTITIES:
        if any(p.format(a) in text for a in names.get(entity, ()) for p in PATTERNS):
            return entity
    return "other"


def _pairs(model: HookedTransformer, config: PatchscopeConfig) -> list[tuple[int, int]]:
    if config.layer_pairs is not None:
        for s, t in config.layer_pairs:
            check_layers(model, [s, t])
        return list(config.layer_pairs)
    layers = list(range(model.cfg.n_layers))
    sources = check_layers(model, config.source_layers) if config.source_layers is not None else layers
    targets = check_layers(model, config.target_layers) if config.target_layers is not None else layers
    return [(s, t) for s in sources for t in targets]


@torch.no_grad()
def patchscope(model: HookedTransformer, cases: Sequence[Case],
               config: PatchscopeConfig = PatchscopeConfig()) -> pd.DataFrame:
    """One row per case x position x (source, target) layer pair x seed."""
    pairs = _pairs(model, config)
    target = tokenize_prompts(model, [config.target.text])
    slot = target.char_span_position(0, config.target.placeholder)
    if slot is None:
        raise InputError(f"the placeholder of {config.target.text!r} maps to no token")
    tail = target.tokens[0, slot:].tolist()  # placeholder onwards: read with the generation
    sources = sorted({s for s, _ in pairs})
    index = {s: i for i, s in enumerate(sources)}
    decoders: list[tuple[int, Sampler | None]] = [(seed, Sampler(seed, config.temperature))
                                                  for seed in config.seeds] or [(-1, None)]
    per_case = len(config.positions) * len(pairs)
    rows_out = []
    bar = tqdm(total=len(cases) * per_case * len(decoders), desc="patchscope", unit="run", disable=not config.progress)
    for idx in length_batches([len(c.prompt) for c in cases], max(1, config.batch_rows // per_case)):
        batch = [cases[i] for i in idx]
        tok = tokenize_prompts(model, [c.prompt for c in batch])
        cols = torch.tensor([[n + c.positions[p] for p in config.positions] for c, n in zip(batch, tok.n_pad)])
        states = hidden_states_at(model, tok.tokens, tok.attention_mask, cols, sources)
        rows = [PatchRow(0, slot, t, (qi, pi, s)) for qi in range(len(batch))
                for pi in range(len(config.positions)) for s, t in pairs]

        def values(chunk: Sequence[PatchRow]) -> torch.Tensor:
            return torch.stack([states[r.key[0], r.key[1], index[r.key[2]]] for r in chunk])

        for seed, sampler in decoders:
            def on_output(chunk: Sequence[PatchRow], out: GreedyOutput, seed=seed) -> None:
                for r, ids in zip(chunk, out.tokens.tolist()):
                    case = batch[r.key[0]]
                    text = backend.tokenizer_of(model).decode(tail + ids, skip_special_tokens=True)
                    rows_out.append((case.id, config.positions[r.key[1]], r.key[2], r.layer, seed, text,
                                     classify(text, case.names)))
                bar.update(len(chunk))

            generate_with_patches(model, target.tokens, target.attention_mask, rows, values, on_output,
                                  config.max_new_tokens, config.batch_rows, sampler)
    bar.close()
    return pd.DataFrame(rows_out, columns=COLUMNS)


def decoded_shares(scopes: pd.DataFrame) -> pd.DataFrame:
    """Share of runs decoded as e1 / e2 / e3 / other, per target prompt (if several) and position."""
    keys = [k for k in ("target", "position") if k in scopes]
    shares = scopes.groupby(keys)["decoded"].value_counts(normalize=True).unstack(fill_value=0.0)
    return shares.reindex(columns=[*ENTITIES, "other"], fill_value=0.0)


def reads_nothing(scopes: pd.DataFrame) -> bool:
    """True when the patched generation never depends on the source: every (case, position,
    target layer) gives one string whatever the source layer — Patchscopes then measures
    nothing on this model (as on the toy models at target layers >= 0)."""
    keys = [k for k in ("target", "id", "position", "target_layer", "seed") if k in scopes]
    return bool(len(scopes)) and bool((scopes.groupby(keys)["generation"].nunique() == 1).all())


def patchscope_layers(scopes: pd.DataFrame) -> pd.DataFrame:
    """Per case: first-hop layer (e2 from t1), e2 decoded from t2, second-hop layer (e3 from t2);
    the minimum source layer over all target layers and seeds."""
    def first(position: str, entity: str, name: str) -> pd.Series:
        hit = scopes[(scopes.position == position) & (scopes.decoded == entity)]
        return hit.groupby("id")["source_layer"].min().rename(name)

    out = pd.concat([first("t1", "e2", "first_hop_layer"), first("t2", "e2", "e2_at_t2_layer"),
                     first("t2", "e3", "second_hop_layer")], axis=1)
    return out.reindex(scopes["id"].unique()).rename_axis("id").reset_index()
