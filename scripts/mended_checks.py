"""Each check issue 24 mended, seen failing on the bug it names.

For every entry of ``BUGS`` (a file, a text in it, what the bug puts there instead, and the
tests that must catch it), the repository is copied to a scratch directory, the bug applied
there, and the tests run in that copy: they must fail. Then the copy is discarded (the
working tree is never touched). Exits 1 if some bug went unnoticed.

    python scripts/mended_checks.py [NAME ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str  # the check that used to pass on this bug


BUGS = (
    Bug(
        "reuse-never",
        "latent_hops/rundir.py",
        "    table = pd.read_parquet(path)\n    if ids is None:",
        "    return None\n    table = pd.read_parquet(path)\n    if ids is None:",
        (
            "tests/test_registry.py::test_a_new_analysis_is_one_registered_module",
            "tests/test_registry.py::test_reuse_follows_what_made_the_table",
        ),
        "a reused table was proved by 'reusing' in the output, which 'not reusing' contains too",
    ),
    Bug(
        "runtime-in-provenance",
        "latent_hops/config.py",
        'if not f.metadata.get("runtime")',
        "if True",
        ("tests/test_registry.py::test_reuse_follows_what_made_the_table",),
        "nothing tested that a runtime-only change (batch size) still reuses a table",
    ),
    Bug(
        "weights-not-in-identity",
        "latent_hops/run.py",
        '"weights_sha256": model.weights_fingerprint(),',
        '"weights_sha256": "same",',
        ("tests/test_registry.py::test_changed_weights_under_the_same_spec_are_not_reused",),
        "nothing tested that changed weights under the same spec are refused",
    ),
    Bug(
        "strict-split-ignored",
        "latent_hops/analyses/probe.py",
        "train = (fold != k) & ~np.isin(target, target[test]) if hold_out_target else fold != k",
        "train = fold != k",
        ("tests/test_analyses.py::test_probe_split_never_trains_on_the_scored_entities",),
        "the strict split's check read `... if strict else True`",
    ),
    Bug(
        "composition-scored-on-e2",
        "latent_hops/evaluation.py",
        '"composition": "e3",',
        '"composition": "e2",',
        ("tests/test_evaluation.py::test_alias_flags_name_the_right_entity",),
        "the flags were checked by applying the same function to the stored generation",
    ),
    Bug(
        "relation-shortcut-ignored",
        "latent_hops/evaluation.py",
        'for k in ("entity_shortcut", "relation_shortcut")',
        'for k in ("entity_shortcut",)',
        ("tests/test_evaluation.py::test_each_branch_of_the_subset_rule",),
        "the subset rule was only restated on 120 toy rows, where a branch may never occur",
    ),
    Bug(
        "resume-recomputes",
        "latent_hops/rundir.py",
        "    done = done_ids(folder)\n",
        "    done: set[str] = set()\n",
        ("tests/test_resume.py::test_kill_and_resume_computes_only_what_was_missing",),
        "recomputing every part rewrites identical files, which the old test could not tell",
    ),
    Bug(
        "best-rank-counts-ties",
        "latent_hops/ranks.py",
        "(logprobs > best[..., None]).sum(-1)",
        "((logprobs >= best[..., None]).sum(-1) - 1)",
        ("tests/test_backpatch.py::test_best_rank_hand_computed",),
        "best_rank had no direct test",
    ),
    Bug(
        "random-direction-ignores-the-seed",
        "latent_hops/analyses/backpatch/engine.py",
        'f"{seed}|{case_id}|{position}|{cell.source}|{cell.target}"',
        'f"{case_id}|{position}|{cell.source}|{cell.target}"',
        ("tests/test_backpatch.py::test_random_direction_has_the_norm_and_is_fixed_by_its_key",),
        "random_direction had no direct test",
    ),
    Bug(
        "read-sites-off-by-one",
        "latent_hops/backend/tl.py",
        "pos = positions.to(tokens.device)",
        "pos = (positions - 1).clamp(min=0).to(tokens.device)",
        ("tests/test_backpatch.py::test_read_sites_equals_transformer_lens_cache",),
        "both engines read states with read_sites: fast == naive cannot see its bugs",
    ),
    Bug(
        "records-rank-of-the-wrong-answer",
        "latent_hops/analyses/backpatch/engine.py",
        'best_rank(logprobs[i], case.first_tokens["e3"])',
        'best_rank(logprobs[i], case.first_tokens["e2"])',
        ("tests/test_backpatch.py::test_records_from_a_known_output",),
        "both engines build rows with _records: fast == naive cannot see its bugs",
    ),
    Bug(
        "patch-value-forward-is-random",
        "latent_hops/analyses/backpatch/engine.py",
        'if cell.kind == "random":',
        'if cell.kind in ("random", "forward"):',
        ("tests/test_backpatch.py::test_patch_values_by_kind",),
        "both engines build patch values with _patch_value: fast == naive cannot see its bugs",
    ),
)


def _copy(tmp: Path) -> Path:
    dst = tmp / "repo"
    ignore = shutil.ignore_patterns(
        ".venv*", ".git", "runs", "mutants", "__pycache__", "*.egg-info"
    )
    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


def check(bug: Bug, python: str) -> bool:
    """Whether the tests fail with ``bug`` applied (in a scratch copy)."""
    with tempfile.TemporaryDirectory() as tmp:
        repo = _copy(Path(tmp))
        path = repo / bug.file
        text = path.read_text()
        if text.count(bug.old) != 1:
            raise SystemExit(f"{bug.name}: {bug.old!r} is not exactly once in {bug.file}")
        path.write_text(text.replace(bug.old, bug.new))
        env = {**os.environ, "PYTHONPATH": str(repo)}
        done = subprocess.run(
            [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *bug.tests],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
        )
        caught = done.returncode == 1
        last = [line for line in done.stdout.splitlines() if line.strip()][-1:]
        print(f"{'caught' if caught else 'MISSED'}: {bug.name} -- {bug.why} | {' '.join(last)}")
        return caught


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*")
    args = parser.parse_args()
    bugs = [b for b in BUGS if not args.names or b.name in args.names]
    missed = [b.name for b in bugs if not check(b, sys.executable)]
    print(
        f"{len(bugs) - len(missed)} of {len(bugs)} bugs caught"
        + (f"; missed: {missed}" if missed else "")
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
