"""Train the shipped toy model: a small Llama that answers two-hop queries latently.

    python scripts/train_toy_model.py                        # the shipped recipe (8 layers)
    python scripts/train_toy_model.py --steps 5 --out /tmp/t  # smoke run
    python scripts/train_toy_model.py --artifacts-only        # rewrite dataset + card only
    python scripts/train_toy_model.py --arch gpt2 --n-layers 4  # toy-gpt2: checkpoint-gpt2/

Builds the seeded knowledge graph (latent_hops.toy.knowledge_graph), trains a
``transformers.LlamaForCausalLM`` from scratch on CPU and writes into OUT (default: the
package's ``latent_hops/toy``): ``checkpoint/`` (``checkpoint-gpt2/`` for ``--arch gpt2``; a standard HF checkpoint:
config, safetensors, tokenizer, training log), ``two_hop.csv`` (the toy dataset in the
paper's schema, built by ``latent_hops.query_builder``) and ``MODEL_CARD.md`` (``-gpt2``; the recipe
and the accuracies measured at the end, through the package's own evaluation).

Sequences (one token per relation phrase and per entity; loss on the answer and EOS only):
  one-hop  <s> r1 e1 is -> e2 </s>
  two-hop  <s> r2 r1 e1 is -> e3 </s>
  copy     <s> a : a , b : b             (loss on each copy; used by Patchscopes)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from latent_hops.toy.knowledge_graph import (
    CompositionSplits,
    KnowledgeGraph,
    build_knowledge_graph,
    split_compositions,
)
from latent_hops.toy.tokenizer import build_toy_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "latent_hops" / "toy"


@dataclass
class Recipe:
    seed: int = 0
    n_entities: int = 200
    n_relations: int = 20
    ood_fraction: float = 0.1
    train_per_fact: float = 15.0
    arch: str = (
        "llama"  # "llama" (RoPE, RMSNorm, SwiGLU) or "gpt2" (learned positions, LayerNorm, GELU)
    )
    n_layers: int = 8
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    steps: int = 12000
    batch_size: int = 256
    copy_batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 200
    decay_fraction: float = 0.2  # linear decay to zero over the last part of training
    weight_decay: float = 0.1
    threads: int = 1
    bf16: bool = True
    eval_every: int = 500


class Batcher:
    """Token tensors for the three sequence formats, sampled with a seeded RNG."""

    def __init__(self, kg: KnowledgeGraph, splits: CompositionSplits, tokenizer, seed: int):
        vocab = tokenizer.get_vocab()
        self.ent = np.array([vocab[e] for e in kg.entities])
        self.rel = np.array([vocab[f"the {r} of"] for r in kg.relations])
        self.bos, self.eos, self.pad = (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        self.is_, self.colon, self.comma = vocab["is"], vocab[":"], vocab[","]
        self.kg, self.splits = kg, splits
        self.rng = np.random.default_rng(seed + 2)

    def one_hop(self, e1: np.ndarray, r1: np.ndarray) -> tuple[np.ndarray, int]:
        """[n, 7] right-padded token ids; the answer is predicted at index 3."""
        e2 = self.kg.objects[e1, r1]
        n = len(e1)
        cols = [
            np.full(n, self.bos),
            self.rel[r1],
            self.ent[e1],
            np.full(n, self.is_),
            self.ent[e2],
            np.full(n, self.eos),
            np.full(n, self.pad),
        ]
        return np.stack(cols, 1), 3

    def two_hop(self, comps: np.ndarray) -> tuple[np.ndarray, int]:
        """[n, 7] token ids; the answer is predicted at index 4."""
        e1, r1, r2 = comps.T
        e3 = self.kg.objects[self.kg.objects[e1, r1], r2]
        n = len(e1)
        cols = [
            np.full(n, self.bos),
            self.rel[r2],
            self.rel[r1],
            self.ent[e1],
            np.full(n, self.is_),
            self.ent[e3],
            np.full(n, self.eos),
        ]
        return np.stack(cols, 1), 4

    def train_batch(self, batch_size: int, copy_batch_size: int):
        half = batch_size // 2
        e1 = self.rng.integers(0, self.kg.n_entities, half)
        r1 = self.rng.integers(0, self.kg.n_relations, half)
        one, _ = self.one_hop(e1, r1)
        two, _ = self.two_hop(
            self.splits.train[self.rng.integers(0, len(self.splits.train), batch_size - half)]
        )
        hops = torch.from_numpy(np.concatenate([one, two]))
        mask = torch.zeros_like(hops, dtype=torch.bool)  # mask[i, j]: predict token j+1 at j
        mask[:half, 3:5] = True
        mask[half:, 4:6] = True
        a, b = self.ent[self.rng.integers(0, self.kg.n_entities, (2, copy_batch_size))]
        colon, comma = np.full_like(a, self.colon), np.full_like(a, self.comma)
        copy = torch.from_numpy(
            np.stack([np.full_like(a, self.bos), a, colon, a, comma, b, colon, b], 1)
        )
        copy_mask = torch.zeros_like(copy, dtype=torch.bool)
        copy_mask[:, [2, 6]] = True
        return (hops, mask), (copy, copy_mask)


def masked_loss(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens).logits[:, :-1]
    return F.cross_entropy(logits[mask[:, :-1]].float(), tokens[:, 1:][mask[:, :-1]])


@torch.no_grad()
def accuracy(model, tokens: np.ndarray, answer_index: int, batch: int = 1024) -> float:
    """Share of sequences whose argmax at ``answer_index`` is the answer and then EOS."""
    hits = 0
    for i in range(0, len(tokens), batch):
        x = torch.from_numpy(tokens[i : i + batch])
        pred = model(input_ids=x).logits.argmax(-1)
        ok = (pred[:, answer_index] == x[:, answer_index + 1]) & (
            pred[:, answer_index + 1] == x[:, answer_index + 2]
        )
        hits += int(ok.sum())
    return hits / len(tokens)


def evaluate(model, batcher: Batcher) -> dict[str, float]:
    kg, splits = batcher.kg, batcher.splits
    e1, r1 = (
        a.ravel()
        for a in np.meshgrid(np.arange(kg.n_entities), np.arange(kg.n_relations), indexing="ij")
    )
    model.eval()
    out = {
        "one_hop": accuracy(model, *batcher.one_hop(e1, r1)),
        "two_hop_train": accuracy(model, *batcher.two_hop(splits.train[:3000])),
        "two_hop_test_id": accuracy(model, *batcher.two_hop(splits.test_id[:3000])),
        "two_hop_test_ood": accuracy(model, *batcher.two_hop(splits.test_ood)),
    }
    model.train()
    return out


def build_model(recipe: Recipe, tokenizer):
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if recipe.arch == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(tokenizer),
                n_embd=recipe.d_model,
                n_layer=recipe.n_layers,
                n_head=recipe.n_heads,
                n_inner=recipe.d_mlp,
                n_positions=64,
                tie_word_embeddings=False,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **ids,
            )
        )
    if recipe.arch != "llama":
        raise ValueError(f"unknown arch {recipe.arch!r}: llama or gpt2")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.d_model,
        intermediate_size=recipe.d_mlp,
        num_hidden_layers=recipe.n_layers,
        num_attention_heads=recipe.n_heads,
        num_key_value_heads=recipe.n_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def train(recipe: Recipe, checkpoint: Path, log=print) -> dict:
    torch.set_num_threads(recipe.threads)  # pinned: 1 vs 2 threads give different weights
    torch.manual_seed(recipe.seed)
    kg = build_knowledge_graph(
        recipe.n_entities, recipe.n_relations, recipe.ood_fraction, recipe.seed
    )
    splits = split_compositions(kg, recipe.train_per_fact, seed=recipe.seed)
    tokenizer = build_toy_tokenizer(kg)
    model = build_model(recipe, tokenizer)
    batcher = Batcher(kg, splits, tokenizer, recipe.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )
    decay_start = int(recipe.steps * (1 - recipe.decay_fraction))

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        if step >= decay_start:
            return recipe.lr * (recipe.steps - step) / max(1, recipe.steps - decay_start)
        return recipe.lr

    history = []
    start = time.time()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        (hops, mask), (copy, copy_mask) = batcher.train_batch(
            recipe.batch_size, recipe.copy_batch_size
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            loss = masked_loss(model, hops, mask) + masked_loss(model, copy, copy_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            metrics = {
                "step": step + 1,
                "loss": loss.item(),
                "minutes": (time.time() - start) / 60,
                **evaluate(model, batcher),
            }
            history.append(metrics)
            log(
                json.dumps(
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
                )
            )
    wall = time.time() - start
    checkpoint.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(checkpoint, safe_serialization=True)
    tokenizer.save_pretrained(checkpoint)
    result = {
        "recipe": asdict(recipe),
        "wall_time_s": wall,
        "final": history[-1],
        "history": history,
        "torch": torch.__version__,
    }
    (checkpoint / "training_log.json").write_text(json.dumps(result, indent=1))
    return result


def artifact_paths(arch: str, out: Path) -> tuple[Path, Path]:
    """(checkpoint folder, model card) of an architecture, named as shipped: ``checkpoint/`` and
    ``MODEL_CARD.md`` for the Llama ("toy"), ``checkpoint-gpt2/`` and ``MODEL_CARD-gpt2.md``
    for GPT-2 ("toy-gpt2") -- so retraining one never overwrites the other."""
    if arch not in ("llama", "gpt2"):
        raise SystemExit(f"--arch must be llama or gpt2, got {arch!r}")
    suffix = "" if arch == "llama" else f"-{arch}"
    return out / f"checkpoint{suffix}", out / f"MODEL_CARD{suffix}.md"


def write_artifacts(out: Path, arch: str = "llama", eval_batch_size: int = 256) -> dict:
    """Write the toy dataset and the model card for the checkpoint of ``arch`` in ``out``.

    The card's accuracies are measured on the dataset through the package's own
    ``evaluate`` (greedy, 10 tokens, alias scoring), as a user would measure them.
    """
    from latent_hops.evaluation import EvaluationConfig, evaluate, summarize
    from latent_hops.models import load_model
    from latent_hops.queries import write_paper_csv
    from latent_hops.toy.dataset import build_toy_dataset

    checkpoint, card = artifact_paths(arch, out)
    log_file = checkpoint / "training_log.json"
    result = json.loads(log_file.read_text())
    recipe = Recipe(**result["recipe"])
    torch.set_num_threads(recipe.threads)
    kg = build_knowledge_graph(
        recipe.n_entities, recipe.n_relations, recipe.ood_fraction, recipe.seed
    )
    splits = split_compositions(kg, recipe.train_per_fact, seed=recipe.seed)
    dataset = build_toy_dataset(kg, splits)
    write_paper_csv(dataset, out / "two_hop.csv")
    model = load_model(checkpoint, device="cpu")
    summary = summarize(evaluate(model, dataset, EvaluationConfig(batch_size=eval_batch_size)))
    result["evaluation"] = json.loads(summary.to_json(orient="index"))
    log_file.write_text(json.dumps(result, indent=1))
    size_mb = sum(f.stat().st_size for f in checkpoint.glob("*")) / 1e6
    card.write_text(model_card(result, summary, size_mb))
    return result


def model_card(result: dict, summary, size_mb: float) -> str:
    r = result["recipe"]
    history = "\n".join(
        f"| {h['step']} | {h['one_hop']:.3f} | {h['two_hop_train']:.3f} | {h['two_hop_test_id']:.3f} "
        f"| {h['two_hop_test_ood']:.3f} |"
        for h in result["history"]
    )
    arch = (
        ("Llama (`LlamaForCausalLM`", "RoPE, RMSNorm")
        if r.get("arch", "llama") == "llama"
        else ("GPT-2 (`GPT2LMHeadModel`", "learned positions, LayerNorm")
    )
    return f"""# latent_hops toy model

A {r["n_layers"]}-layer {arch[0]}, d_model {r["d_model"]}, {r["n_heads"]} heads,
MLP {r["d_mlp"]}, {arch[1]}, untied unembedding) trained from scratch by
`scripts/train_toy_model.py` on a synthetic knowledge graph of {r["n_entities"]} entities and
{r["n_relations"]} relations (every (entity, relation) has one object; seed {r["seed"]}).
{r["ood_fraction"]:.0%} of the atomic facts are out-of-distribution: trained as one-hop facts,
never inside a trained two-hop query. {r["train_per_fact"]:g} x N x R = {int(r["train_per_fact"] * r["n_entities"] * r["n_relations"])}
in-distribution compositions are trained; held-out ones form `test_id`, compositions with an
OOD second hop form `test_ood`.

Prompts read as English ("the spouse of the performer of Voliba is") but every relation
phrase and every entity name is ONE token of the word-level tokenizer, so the model sees
`<s> r2 r1 e1 is -> e3 </s>`: the compact form that trained fastest in our measurements (a
tokenised "the"/"of" trained 2x slower and blurred the logit lens). A copy format
`<s> a : a , b : b` is trained too, so the Patchscopes prompt `a : a , x :` reads whatever
entity is patched into `x`.

## Recipe
AdamW lr {r["lr"]} ({r["warmup"]} warmup steps, constant, linear decay to 0 over the last
{r["decay_fraction"]:.0%}), betas (0.9, 0.98), weight decay {r["weight_decay"]} on matrices, batch
{r["batch_size"]} (half one-hop, half two-hop) + {r["copy_batch_size"]} copy sequences, loss on
answer and EOS only, bf16 autocast on CPU, {r["steps"]} steps, torch threads pinned to
{r["threads"]} (1 vs 2 threads give different weights), torch {result["torch"]}.
Wall time: {result["wall_time_s"] / 60:.1f} min on one CPU core. Checkpoint: {size_mb:.1f} MB (fp32 safetensors).

## Accuracy on the shipped dataset (`latent_hops evaluate`: greedy, 10 tokens, alias match)
```
{summary.round(3).to_string()}
```

## Training curve (argmax answer then EOS; one-hop over all {r["n_entities"] * r["n_relations"]} facts, two-hop over the first 3000 compositions of each set)
| step | one-hop | two-hop train | two-hop test_id | two-hop test_ood |
|---|---|---|---|---|
{history}

Reproduce: `python scripts/train_toy_model.py` (same seed + same thread count = same weights).
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, value in asdict(Recipe()).items():
        kind = (
            (lambda s: s.lower() in ("1", "true", "yes"))
            if isinstance(value, bool)
            else type(value)
        )
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--artifacts-only", action="store_true", help="only rewrite dataset and card"
    )
    args = vars(parser.parse_args())
    out, artifacts_only = args.pop("out"), args.pop("artifacts_only")
    checkpoint, _ = artifact_paths(args["arch"], out)
    if not artifacts_only:
        train(Recipe(**args), checkpoint)
    write_artifacts(out, args["arch"])


if __name__ == "__main__":
    main()
