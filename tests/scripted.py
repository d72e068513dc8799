"""A test double of a model: a ``Backend`` whose greedy continuation of each prompt is written
in the test (``script``), with a real byte-level tokenizer. What the evaluation makes of
known generations can then be checked against hand-written expectations, branch by branch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latent_hops.backend import Backend, Capabilities, Edit, GreedyOutput


class ScriptedModel(Backend):
    """Generates ``script[prompt]`` (a string; default ``default``) for every prompt, and
    counts how many prompts it was asked to generate."""

    name = "scripted"

    def __init__(self, tokenizer, script: dict[str, str], default: str = " nothing",
                 context: int = 64):
        super().__init__(None, tokenizer, "scripted")
        self.script, self.default, self.context = script, default, context
        self.generated: list[str] = []

    n_layers = 2
    d_model = 4
    d_vocab = property(lambda self: len(self.tokenizer))
    device = "cpu"
    dtype = torch.float32
    architecture = "Scripted"
    context_length = property(lambda self: self.context)
    capabilities = Capabilities(False, True, False)

    def greedy_generate(self, tokens, attention_mask, max_new_tokens=10, edits: Sequence[Edit] = (),
                        use_kv_cache=True) -> GreedyOutput:
        rows = []
        for ids, mask in zip(tokens.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True)
            self.generated.append(prompt)
            answer = self.tokenizer(self.script.get(prompt, self.default), add_special_tokens=False)["input_ids"]
            answer = answer[:max_new_tokens] + [self.pad_id] * (max_new_tokens - len(answer[:max_new_tokens]))
            rows.append(answer)
        return GreedyOutput(torch.tensor(rows), torch.zeros(len(rows), self.d_vocab))

    def _unused(self, *args, **kwargs):
        raise NotImplementedError("a scripted model only generates")

    read_sites = read_attention = unembedding_vectors = project_to_vocab = _unused
    last_logits = walk_prompt = bytes_per_patched_row = parameters = _unused
    shape = property(_unused)
