"""The shipped toy model: its card's accuracies re-measured, it hops, and its training script runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from latent_hops import load_dataset, load_model
from latent_hops.evaluation import EvaluationConfig, evaluate, summarize
from latent_hops.models import toy_checkpoint_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def card_and_measured(toy):
    card = json.loads((toy_checkpoint_dir() / "training_log.json").read_text())["evaluation"]
    measured = summarize(evaluate(toy, load_dataset("toy"), EvaluationConfig(batch_size=256)))
    return card, measured


@pytest.mark.slow
def test_gpt2_toy_card_accuracies_are_reproduced(toy_gpt2):
    card = json.loads((toy_checkpoint_dir("toy-gpt2") / "training_log.json").read_text())["evaluation"]
    measured = summarize(evaluate(toy_gpt2, load_dataset("toy"), EvaluationConfig(batch_size=256)))
    for split, row in card.items():
        for kind in ("first_hop", "second_hop", "composition"):
            assert measured.loc[split, kind] == pytest.approx(row[kind], abs=0.01), (split, kind)
    assert measured.loc["test_id", "incorrect"] >= 50 and measured.loc["test_ood", "composition"] < 0.1


@pytest.mark.slow
def test_model_card_accuracies_are_reproduced(card_and_measured):
    card, measured = card_and_measured
    for split, row in card.items():
        for kind in ("first_hop", "second_hop", "composition"):
            assert measured.loc[split, kind] == pytest.approx(row[kind], abs=0.01), (split, kind)


@pytest.mark.slow
def test_toy_model_composes_in_distribution_only(card_and_measured):
    _, m = card_and_measured
    assert m.loc["test_id", "first_hop"] > 0.95 and m.loc["test_id", "second_hop"] > 0.95
    assert m.loc["train", "composition"] > 0.9  # trained compositions
    assert m.loc["test_id", "composition"] > 0.75  # held-out compositions: latent two-hop reasoning
    assert m.loc["test_ood", "composition"] < 0.05  # OOD second hop: never composed
    assert m.loc["test_id", "incorrect"] >= 50  # enough failures to study


@pytest.mark.slow
def test_training_script_smoke(tmp_path):
    out = tmp_path / "toy"
    cmd = [sys.executable, str(ROOT / "scripts" / "train_toy_model.py"), "--steps", "3", "--eval-every", "100",
           "--n-layers", "2", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
    assert (out / "MODEL_CARD.md").read_text().startswith("# latent_hops toy model")
    model = load_model(out / "checkpoint", device="cpu")
    assert model.n_layers == 2
    assert len(load_dataset(out / "two_hop.csv")) == len(load_dataset("toy"))


def test_training_gpt2_never_overwrites_the_llama_toy(tmp_path):
    """The README's toy-gpt2 recipe writes checkpoint-gpt2/ and MODEL_CARD-gpt2.md (a tiny run)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_toy_model.py"
    small = ["--n-entities", "30", "--n-relations", "4", "--train-per-fact", "0.3", "--n-layers", "1", "--d-model", "16", "--n-heads", "2",
             "--d-mlp", "32", "--steps", "2", "--warmup", "1", "--threads", "1"]
    subprocess.run([sys.executable, str(script), "--arch", "gpt2", "--out", str(tmp_path), *small], check=True,
                   capture_output=True)
    assert (tmp_path / "checkpoint-gpt2" / "config.json").is_file() and (tmp_path / "MODEL_CARD-gpt2.md").is_file()
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "MODEL_CARD.md").exists()
