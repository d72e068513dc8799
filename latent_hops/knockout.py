"""Attention knockout (reference §2; Geva et al. 2023): block attention edges from a set of
query positions to a set of key positions, in every head of a window of layers
[l - k, l + k], by setting the pre-softmax score to -inf (``hook_attn_scores``), on the
prompt pass only. A layer matters when the greedy generation changes from the clean one
(and not both are correct); the change in e3's log-probability is recorded too.

Edge presets: ``last_to_t1`` (t2 -> t1), ``last_to_r1`` (t2 -> the first-hop relation's
tokens), ``all_to_t1`` (every position after t1 -> t1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from latent_hops.backend import greedy_generate
from latent_hops.cases import Case
from latent_hops.errors import InputError
from latent_hops.generation import DEFAULT_MAX_NEW_TOKENS, decode, is_correct, length_batches
from latent_hops.positions import tokenize_prompts
from latent_hops.ranks import best_rank

EDGE_PRESETS = ("last_to_t1", "last_to_r1", "all_to_t1")
COLUMNS = ["id", "preset", "layer", "window_start", "window_end", "generation", "correct", "changed",
           "e3_logprob_delta", "skip_reason"]


@dataclass(frozen=True)
class KnockoutConfig:
    presets: tuple[str, ...] = ("last_to_t1",)
    window: int = 3  # k: layers [l - k, l + k]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = 64
    progress: bool = False


def edges(case: Case, preset: str) -> tuple[list[int], list[int]] | str:
    """(query positions, key positions) of a preset, as unpadded indices, or a skip reason."""
    t1, t2 = case.positions["t1"], case.positions["t2"]
    if preset == "last_to_t1":
        return [t2], [t1]
    if preset == "all_to_t1":
        return list(range(t1 + 1, t2 + 1)), [t1]
    if preset == "last_to_r1":
        if not case.r1_tokens:
            return "first-hop relation tokens unknown (source_prompt differs from the templates)"
        return [t2], case.r1_tokens
    raise InputError(f"unknown knockout preset {preset!r}; use {EDGE_PRESETS}")


def knockout_hooks(layers: Sequence[int], mask: torch.Tensor) -> list:
    """Hooks setting attention scores to -inf where ``mask[batch, query, key]`` is True."""
    def hook(scores: torch.Tensor, hook) -> torch.Tensor:
        q, k = scores.shape[-2:]
        return scores.masked_fill(mask[:, None, :q, :k], float("-inf"))

    return [(f"blocks.{layer}.attn.hook_attn_scores", hook) for layer in layers]


@torch.no_grad()
def attention_knockout(model: HookedTransformer, cases: Sequence[Case],
                       config: KnockoutConfig = KnockoutConfig()) -> pd.DataFrame:
    """One row per case x preset x centre layer l (window [l - k, l + k] clipped)."""
    for preset in config.presets:
        if preset not in EDGE_PRESETS:
            raise InputError(f"unknown knockout preset {preset!r}; use {EDGE_PRESETS}")
    if config.window < 0:
        raise InputError(f"window must be >= 0, got {config.window}")
    n_layers = model.cfg.n_layers
    rows = []
    bar = tqdm(total=len(cases) * len(config.presets), desc="knockout", disable=not config.progress)
    for idx in length_batches([len(c.prompt) for c in cases], config.batch_size):
        batch = [cases[i] for i in idx]
        tok = tokenize_prompts(model, [c.prompt for c in batch])
        clean = greedy_generate(model, tok.tokens, tok.attention_mask, config.max_new_tokens)
        clean_text = [decode(model, r) for r in clean.tokens.tolist()]
        clean_lp = clean.first_logits.log_softmax(-1)
        for preset in config.presets:
            mask = torch.zeros((len(batch),) + (tok.tokens.shape[1],) * 2, dtype=torch.bool, device=tok.tokens.device)
            reasons = []
            for qi, (case, pad) in enumerate(zip(batch, tok.n_pad)):
                e = edges(case, preset)
                reasons.append(e if isinstance(e, str) else "")
                if not isinstance(e, str):
                    queries, keys = e
                    mask[qi, [pad + q for q in queries for _ in keys], [pad + k for _ in queries for k in keys]] = True
            for layer in range(n_layers):
                window = range(max(0, layer - config.window), min(n_layers, layer + config.window + 1))
                out = greedy_generate(model, tok.tokens, tok.attention_mask, config.max_new_tokens,
                                      knockout_hooks(window, mask))
                lp = out.first_logits.log_softmax(-1)
                for qi, case in enumerate(batch):
                    if reasons[qi]:
                        rows.append((case.id, preset, layer, window[0], window[-1], "", False, False, float("nan"),
                                     reasons[qi]))
                        continue
                    text = decode(model, out.tokens[qi].tolist())
                    ok, was_ok = is_correct(text, case.e3_names), is_correct(clean_text[qi], case.e3_names)
                    _, new = best_rank(lp[qi], case.first_tokens["e3"])
                    _, old = best_rank(clean_lp[qi], case.first_tokens["e3"])
                    rows.append((case.id, preset, layer, window[0], window[-1], text, ok,
                                 text != clean_text[qi] and not (ok and was_ok), float(new - old), ""))
            bar.update(len(batch))
    bar.close()
    return pd.DataFrame(rows, columns=COLUMNS)


def knockout_layer(knockout: pd.DataFrame, preset: str = "last_to_t1") -> pd.Series:
    """Per case, the min centre layer whose knockout of ``preset`` changes the answer."""
    k = knockout[(knockout.preset == preset) & knockout.changed]
    return k.groupby("id")["layer"].min().rename("knockout_layer").reindex(knockout["id"].unique())
