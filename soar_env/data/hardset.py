"""Hard sets: the problems a student fails K times out of K (the paper's fail@128).

    soar hardset --model smollm2-135m-instruct --source generator:addition@4#200 --k 8 --out hard.jsonl

SOAR's teacher is rewarded only on problems the student cannot solve at all, because
that is where plain RLVR has no gradient. A problem is "hard" when K samples with the
student prompt are all graded wrong. We sample in chunks and stop a problem at its first
correct answer: it can no longer be hard, and on a CPU this cuts the build several-fold.

The build is resumable: each finished problem is appended to ``<out>.partial.jsonl`` as
soon as it is graded, and a restarted build with the same settings skips those. The result
is ``<out>`` (one problem per line, with its ``split``, ``correct`` and ``samples``) and
``<out>.meta.json`` (the exact settings, pool statistics and timing).

An env reads its hard pool with `load_hard_pool` (the ``hardset`` and ``hardset_split``
settings); the benchmarks take both splits with `hard_splits`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from soar_env.config import EnvConfig
from soar_env.data.loaders import load_jsonl, load_problems, save_jsonl
from soar_env.problems import Problem
from soar_env.prompts import student_prompt
from soar_env.verify import grade_many

if TYPE_CHECKING:
    from soar_env.models.policy import LMPolicy

BUNDLED_HARDSET = "hardset_smollm2.jsonl"
"""File name of the default hard set shipped in ``soar_env/data/bundled``."""


@dataclass
class HardSetConfig:
    """Settings of one hard-set build; all of them are written beside the result."""

    source: str
    """Problem pool, any spec `soar_env.data.loaders.load_problems` accepts."""
    out: str
    """Output jsonl path."""
    model: str = "smollm2-135m-instruct"
    """Student model: the embedded default, a Hugging Face id or a local folder."""
    k: int = 128
    """Samples per problem; a problem is kept only if all K are wrong (paper: 128)."""
    train_fraction: float = 0.5
    """Share of kept problems that go to the train split (paper: 0.5)."""
    max_new_tokens: int = 1024
    """Tokens per sampled answer (paper: 1024)."""
    temperature: float = 1.0
    """Sampling temperature (paper: 1.0)."""
    require_box: bool = True
    """Grade only boxed answers (paper) or fall back to the reply's final answer."""
    chunk: int = 8
    """Samples drawn per problem per round; a problem stops at its first correct sample."""
    batch_size: int = 64
    """Sequences generated together."""
    limit: int | None = None
    """Use only the first N problems of the pool."""
    seed: int = 0
    """Seeds sampling and the train/test split."""
    grade_timeout: float = 5.0
    """Seconds allowed per grade."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0.0 <= self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in [0, 1], got {self.train_fraction}")
        if self.chunk < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("chunk, batch_size and max_new_tokens must be >= 1")

    def identity(self) -> dict:
        """Settings that must match for a partial build to be resumed."""
        # Not `limit`: a problem's result does not depend on how many others are built with it,
        # so a build can be cut short and resumed with a smaller limit.
        keys = ("source", "model", "k", "max_new_tokens", "temperature", "require_box", "chunk", "seed")
        return {key: getattr(self, key) for key in keys}


@dataclass
class HardSetResult:
    kept: int
    pool: int
    train: int
    test: int
    pool_accuracy: float
    """Fraction of all samples drawn that were correct (a lower bound on pass@1 rate, see chunking)."""
    seconds: float
    out: str


def _read_partial(path: Path, identity: dict) -> dict[str, dict]:
    """Per-problem records of an interrupted build, checked against this build's settings."""
    if not path.exists():
        return {}
    done: dict[str, dict] = {}
    with path.open(encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if not lines:
        return {}
    stored = json.loads(lines[0]).get("settings", {})
    if any(stored.get(key) != value for key, value in identity.items()):
        raise ValueError(
            f"{path} was written with other settings ({stored}); "
            "delete it or rerun with the same settings to resume"
        )
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut short by a kill: that problem is redone
        done[record["id"]] = record
    return done


def count_correct(
    policy: "LMPolicy",
    problems: list[Problem],
    config: HardSetConfig,
    on_done=None,
) -> dict[str, dict]:
    """Sample each problem up to K times in chunks; stop a problem at its first correct answer.

    ``on_done(record)`` is called as each problem finishes, so the caller can persist it.
    """
    records: dict[str, dict] = {}
    active = {p.id: {"correct": 0, "samples": 0} for p in problems}
    by_id = {p.id: p for p in problems}
    prompts = {p.id: policy.chat_prompt(student_prompt(p.question)) for p in problems}
    round_index = 0
    while active:
        ids = list(active)
        take = min(config.chunk, config.k - next(iter(active.values()))["samples"])
        rollout = policy.sample(
            [prompts[i] for i in ids],
            num_samples=take,
            temperature=config.temperature,
            max_new_tokens=config.max_new_tokens,
            seed=config.seed * 100_003 + round_index,
            batch_size=config.batch_size,
        )
        golds = [by_id[ids[j]].answer for j in rollout.prompt_index]
        grades = grade_many(rollout.texts, golds, require_box=config.require_box, timeout=config.grade_timeout)
        for j, grade in zip(rollout.prompt_index, grades):
            state = active[ids[j]]
            state["samples"] += 1
            state["correct"] += int(grade.correct)
        for pid in ids:
            state = active[pid]
            if state["correct"] > 0 or state["samples"] >= config.k:
                record = {"id": pid, **state}
                records[pid] = record
                del active[pid]
                if on_done is not None:
                    on_done(record)
        round_index += 1
    return records


def build_hardset(config: HardSetConfig, policy: "LMPolicy | None" = None, progress: bool = True) -> HardSetResult:
    """Build (or resume) a hard set and write ``config.out`` and ``config.out + '.meta.json'``."""
    start = time.time()
    pool = load_problems(config.source)
    if config.limit is not None:
        pool = pool[: config.limit]
    if not pool:
        raise ValueError(f"the source {config.source!r} gave no problems")
    ids = [p.id for p in pool]
    if len(set(ids)) != len(ids):
        raise ValueError("the pool has duplicate problem ids; deduplicate it first")

    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial_path = out.with_name(out.name + ".partial.jsonl")
    done = _read_partial(partial_path, config.identity())
    todo = [p for p in pool if p.id not in done]

    if todo:
        if policy is None:
            from soar_env.models.policy import LMPolicy  # transformers and peft: seconds to import

            policy = LMPolicy.from_name(config.model, lora=None)
        bar = tqdm(total=len(pool), initial=len(done), desc="hard set", unit="problem", disable=not progress)
        new_file = not partial_path.exists() or partial_path.stat().st_size == 0
        with partial_path.open("a", encoding="utf-8") as handle:
            if new_file:
                handle.write(json.dumps({"settings": config.identity()}) + "\n")

            def persist(record: dict) -> None:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                bar.update(1)

            # Problems go through in slices so a kill loses at most one slice of work.
            slice_size = max(1, config.batch_size // config.chunk)
            for i in range(0, len(todo), slice_size):
                done.update(count_correct(policy, todo[i : i + slice_size], config, on_done=persist))
        bar.close()

    hard = [p for p in pool if done[p.id]["correct"] == 0]
    order = np.random.default_rng(config.seed).permutation(len(hard))
    n_train = int(round(config.train_fraction * len(hard)))
    rows: list[Problem] = []
    for rank, index in enumerate(order):
        problem = hard[index]
        split = "train" if rank < n_train else "test"
        meta = {**problem.meta, "split": split, "correct": 0, "samples": done[problem.id]["samples"]}
        rows.append(Problem(problem.question, problem.answer, problem.source, problem.id, meta))
    rows.sort(key=lambda p: (p.meta["split"] != "train", p.id))
    save_jsonl(rows, out)

    total_samples = sum(r["samples"] for r in done.values())
    total_correct = sum(r["correct"] for r in done.values())
    result = HardSetResult(
        kept=len(hard), pool=len(pool), train=n_train, test=len(hard) - n_train,
        pool_accuracy=total_correct / max(total_samples, 1), seconds=time.time() - start, out=str(out),
    )
    meta = {
        "settings": asdict(config),
        "result": asdict(result),
        "pool_samples": total_samples,
        "pool_correct": total_correct,
        "problems_with_a_correct_sample": sum(1 for r in done.values() if r["correct"] > 0),
        "note": "a problem stops being sampled at its first correct answer, so 'samples' < k for solved ones",
    }
    Path(str(out) + ".meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return result


def bundled_hardset_path() -> Path:
    """Path of the default hard set shipped with the package (built for the embedded student)."""
    return Path(str(resources.files("soar_env.data") / "bundled" / BUNDLED_HARDSET))


def load_hardset(path_or_name: str = "bundled", split: str | None = "train") -> list[Problem]:
    """Problems of a hard set file; ``"bundled"`` names the shipped default. ``split=None`` gives all."""
    path = bundled_hardset_path() if path_or_name == "bundled" else Path(path_or_name)
    if not path.exists():
        raise FileNotFoundError(f"no hard set at {path}; build one with `soar hardset`")
    problems = load_jsonl(path)
    if split is None:
        return problems
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    chosen = [p for p in problems if p.meta.get("split") == split]
    if not chosen:
        raise ValueError(f"{path} has no problems in split {split!r}")
    return chosen


def load_hard_pool(config: EnvConfig) -> list[Problem]:
    """The problems Q_R is drawn from: a hard-set file's split, or any `load_problems` spec.

    A jsonl whose rows carry a ``split`` (what ``soar hardset`` writes) gives that split only;
    a plain problem file or a ``generator:``/``hf:`` spec is used whole.
    """
    spec = config.hardset
    if spec == "bundled" or (spec.endswith(".jsonl") and os.path.isfile(os.path.expanduser(spec))):
        rows = load_hardset(os.path.expanduser(spec) if spec != "bundled" else spec, split=None)
        if any("split" in p.meta for p in rows):
            rows = [p for p in rows if p.meta.get("split") == config.hardset_split]
    else:
        rows = load_problems(spec)
    if not rows:
        raise ValueError(f"the hard set {spec!r} (split {config.hardset_split!r}) has no problems")
    return rows


def hard_splits(config: EnvConfig, *, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """(hard train, hard test) of an env config's hard set.

    A hard-set file with a ``split`` column gives its splits; a pool without one (the tiny
    preset's generator) is split 50/50 at random with ``seed``, like the paper's hard sets.
    """
    pool = load_hard_pool(dataclasses.replace(config, hardset_split="train"))
    if any("split" in p.meta for p in pool):
        train = [p for p in pool if p.meta.get("split") == "train"]
        test_pool = load_hard_pool(dataclasses.replace(config, hardset_split="test"))
        test = [p for p in test_pool if p.meta.get("split") == "test"]
        return train, test
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    half = len(pool) // 2
    return [pool[i] for i in sorted(order[:half])], [pool[i] for i in sorted(order[half:])]
