"""The decoding loop shared by every backend: EOS, and rows that leave the batch once their
outcome is decided (``stop``), against a scripted model whose every answer is known."""

import pytest
import torch

from latent_hops.backend import Decoding, Sampler
from latent_hops.backend.decoding import greedy_loop, recompute_step, screened

EOS, PAD, VOCAB = 9, 0, 10
SCRIPT = torch.tensor(  # the token each row produces at each step
    [
        [1, 2, 3, 4, 5],
        [7, 2, 3, 4, 5],  # decided at step 0 (a 7 appeared)
        [1, 9, 3, 4, 5],  # EOS at step 1
        [1, 2, 7, 4, 5],  # decided at step 2
    ]
)


class Scripted:
    """A step that knows each row by its original index (it follows ``kept``) and answers
    from SCRIPT; it records the batch it was called with."""

    def __init__(self):
        self.rows, self.i, self.calls = torch.arange(len(SCRIPT)), 0, []

    def first(self) -> torch.Tensor:
        return self._logits()

    def _logits(self) -> torch.Tensor:
        return torch.nn.functional.one_hot(SCRIPT[self.rows, self.i], VOCAB).float()

    def __call__(self, nxt: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        if kept is not None:
            self.rows = self.rows[kept]
        assert torch.equal(nxt, SCRIPT[self.rows, self.i])  # the loop fed back what was chosen
        self.calls.append(self.rows.tolist())
        self.i += 1
        return self._logits()


def seven(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return (tokens == 7).any(1)


def test_without_stop_every_row_runs_to_the_end_and_pads_after_eos():
    step = Scripted()
    out = greedy_loop(EOS, PAD, step.first(), step, 5)
    assert out.tokens[2].tolist() == [1, 9, PAD, PAD, PAD]
    assert torch.equal(out.tokens[[0, 1, 3]], SCRIPT[[0, 1, 3]])
    assert step.calls == [[0, 1, 2, 3]] * 4  # the ended row stayed in the batch


def test_stopped_rows_leave_the_batch_and_keep_their_tokens_so_far():
    step = Scripted()
    seen = []

    def stop(rows, tokens):
        seen.append(rows.tolist())
        return seven(rows, tokens)

    out = greedy_loop(EOS, PAD, step.first(), step, 5, stop=stop)
    assert out.tokens.tolist() == [
        [1, 2, 3, 4, 5],
        [7, PAD, PAD, PAD, PAD],
        [1, 9, PAD, PAD, PAD],
        [1, 2, 7, PAD, PAD],
    ]
    assert step.calls == [[0, 2, 3], [0, 3], [0], [0]]  # rows leave once ended (EOS or decided)
    assert seen == [[0, 1, 2, 3], [0, 2, 3], [0, 3], [0], [0]]  # stop judges original rows


def test_recompute_step_answers_for_the_rows_kept_and_feeds_the_others_padding():
    """The edits a recomputed step keeps on are written for the whole batch, so rows that
    left stay in the sequence; only the kept rows' logits come back."""
    tokens, mask = torch.tensor([[5, 6], [0, 6], [7, 8]]), torch.tensor([[1, 1], [0, 1], [1, 1]])
    seen = []

    def logits_of(t, m):
        seen.append((t.tolist(), m.tolist()))
        return t[:, -1:].float().expand(-1, VOCAB)  # each row's logits: its last token

    step = recompute_step(tokens, mask, logits_of)
    step(torch.tensor([1, 2, 3]))
    last = step(torch.tensor([4, 5]), torch.tensor([0, 2]))
    assert seen[-1] == ([[5, 6, 1, 4], [0, 6, 2, 0], [7, 8, 3, 5]], [[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    assert last[:, 0].tolist() == [4, 5]


def test_screening_and_stopping_see_rows_by_their_place_in_the_whole_batch():
    logits = torch.nn.functional.one_hot(SCRIPT[:, 0], VOCAB).float()
    seen = {}

    def keep(rows, lg):
        seen["keep"] = rows.tolist()
        return torch.tensor([True, False, True, True])

    def stop(rows, tokens):
        seen.setdefault("stop", rows.tolist())
        return seven(rows, tokens)

    def decode(rows, decoding):
        step = Scripted()
        step.rows = rows
        return greedy_loop(EOS, PAD, logits[rows], step, 5, stop=decoding.stop).tokens

    out = screened(PAD, logits, Decoding(5, keep=keep, stop=stop), decode)
    assert seen == {"keep": [0, 1, 2, 3], "stop": [0, 2, 3]}
    assert out.tokens.tolist() == [[1, 2, 3, 4, 5], [PAD] * 5, [1, 9, PAD, PAD, PAD], [1, 2, 7, PAD, PAD]]
    part = Decoding(5, stop=stop).of_rows(torch.tensor([2, 3]))  # a part run on its own
    seen.clear()
    part.stop(torch.tensor([1]), torch.tensor([[7]]))
    assert seen["stop"] == [3]


def test_decoding_is_checked():
    with pytest.raises(ValueError, match="max_new_tokens"):
        Decoding(0)
    with pytest.raises(ValueError, match="greedy"):
        Decoding(5, sampler=Sampler(0), stop=seven)
