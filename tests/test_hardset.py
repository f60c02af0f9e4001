"""The fail@K hard-set builder: what it keeps, what it writes, and that it resumes."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from soar_env.cli import main as soar_main
from soar_env.data.hardset import HardSetConfig, build_hardset, load_hardset
from soar_env.data.loaders import load_problems

POOL = "generator:addition@1#12%3"


@dataclass
class ScriptedRollout:
    prompt_index: list[int]
    texts: list[str]


class ScriptedPolicy:
    """Answers correctly exactly for the questions in ``solvable``; counts samples drawn."""

    def __init__(self, solvable: dict[str, str]):
        self.solvable = solvable
        self.samples_drawn = 0

    def chat_prompt(self, user: str, *, reply_prefix: str = "") -> str:
        return user

    def sample(self, prompts, *, num_samples=1, **kwargs):
        texts, index = [], []
        for i, prompt in enumerate(prompts):
            answer = next((a for q, a in self.solvable.items() if q in prompt), None)
            for _ in range(num_samples):
                texts.append(f"\\boxed{{{answer}}}" if answer is not None else "I do not know.")
                index.append(i)
        self.samples_drawn += len(texts)
        return ScriptedRollout(index, texts)


def test_keeps_only_problems_failed_k_of_k_and_splits_them(tmp_path):
    pool = load_problems(POOL)
    solvable = {p.question: p.answer for p in pool[:4]}
    out = tmp_path / "hard.jsonl"
    config = HardSetConfig(source=POOL, out=str(out), k=6, chunk=3, train_fraction=0.5, seed=1)
    result = build_hardset(config, policy=ScriptedPolicy(solvable), progress=False)

    assert (result.pool, result.kept, result.train, result.test) == (12, 8, 4, 4)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["question"] for r in rows} == {p.question for p in pool[4:]}
    assert all(r["meta"]["correct"] == 0 and r["meta"]["samples"] == 6 for r in rows)
    assert sorted(r["meta"]["split"] for r in rows) == ["test"] * 4 + ["train"] * 4
    meta = json.loads((tmp_path / "hard.jsonl.meta.json").read_text())
    assert meta["settings"]["k"] == 6 and meta["settings"]["source"] == POOL
    # Solved problems stop at their first chunk: 4 x 3 samples, the 8 hard ones 6 each.
    assert meta["pool_samples"] == 4 * 3 + 8 * 6
    assert len(load_hardset(str(out), split="train")) == 4
    assert len(load_hardset(str(out), split=None)) == 8


def test_resumes_without_resampling_finished_problems(tmp_path):
    out = tmp_path / "hard.jsonl"
    config = HardSetConfig(source=POOL, out=str(out), k=4, chunk=4, batch_size=8)  # slices of 2 problems
    first = ScriptedPolicy({})
    build_hardset(HardSetConfig(**{**config.__dict__, "limit": 6}), policy=first, progress=False)
    assert first.samples_drawn == 6 * 4

    # A kill mid-write leaves a cut line: that problem is redone, the rest are kept.
    partial = tmp_path / "hard.jsonl.partial.jsonl"
    with partial.open("a") as handle:
        handle.write('{"id": "cut sh')
    second = ScriptedPolicy({})
    result = build_hardset(config, policy=second, progress=False)
    assert second.samples_drawn == 6 * 4
    assert result.kept == 12


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "hard.jsonl"
    build_hardset(HardSetConfig(source=POOL, out=str(out), k=2, limit=2), policy=ScriptedPolicy({}), progress=False)
    with pytest.raises(ValueError, match="other settings"):
        build_hardset(HardSetConfig(source=POOL, out=str(out), k=3, limit=2), policy=ScriptedPolicy({}),
                      progress=False)


def test_builds_with_the_tiny_model_through_the_cli(tmp_path, capsys):
    out = tmp_path / "tiny_hard.jsonl"
    code = soar_main(["hardset", "--model", "tiny", "--source", "generator:multiplication@3#4", "--k", "2",
                      "--max-new-tokens", "4", "--no-require-box", "--out", str(out)])
    assert code == 0
    assert "kept 4/4" in capsys.readouterr().out  # a random tiny model solves nothing
    assert len(out.read_text().splitlines()) == 4


def test_bad_values_fail_before_loading_a_model(tmp_path, capsys):
    assert soar_main(["hardset", "--source", POOL, "--k", "0", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "k must be >= 1" in capsys.readouterr().err


def test_bundled_hardset_is_shipped_and_split():
    train, test = load_hardset("bundled", "train"), load_hardset("bundled", "test")
    assert len(train) >= 20 and len(test) >= 20
    assert not {p.id for p in train} & {p.id for p in test}
    assert all(p.meta["correct"] == 0 for p in train + test)
