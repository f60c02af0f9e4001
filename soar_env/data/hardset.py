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

``--device auto`` (default) samples on the GPU when there is one, in bfloat16 (``--dtype auto``);
``--sampler vllm`` hands the sampling to vLLM (extra ``vllm``). On a CPU the build is exactly
what it was before these settings existed: float32, transformers, the same seeds.

One train/test split (`split_pool`), applied whenever a pool is loaded: a file with a
``split`` column (what this builder writes, and the bundled set) keeps it; any other pool (a
``generator:`` or ``hf:`` spec, a plain jsonl) is split 50/50 by the SHA-256 of each problem's
whitespace-normalised question, so the split never depends on the pool's order, on a seed or
on which problems Q_R happens to draw. An env draws Q_R from the train split only
(`load_hard_pool`); the benchmarks and ``soar train`` test on the test split (`hard_splits`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from soar_env.config import DTYPES, SAMPLERS, EnvConfig
from soar_env.data.generators import FAMILIES
from soar_env.data.loaders import load_jsonl, load_problems, parse_generator_spec, save_jsonl
from soar_env.problems import Problem
from soar_env.prompts import student_prompt
from soar_env.verify import grade_many

if TYPE_CHECKING:
    from soar_env.models.policy import LMPolicy

BUNDLED_HARDSET = "hardset_smollm2.jsonl"
"""File name of the default hard set shipped in ``soar_env/data/bundled``."""
BUNDLED_HARDSETS = {"bundled": BUNDLED_HARDSET, "bundled-fail32": "hardset_smollm2_fail32.jsonl",
                    "bundled-edge": "hardset_smollm2_edge.jsonl"}
"""Hard sets shipped in ``soar_env/data/bundled``, by the name ``EnvConfig.hardset`` takes: the
default (fail@16, 39 + 39 problems), the larger, stricter fail@32 set over all ten families, and
the fail@32 set of the families at the student's edge (the cpu preset's; see that folder's README)."""

HARD_TRAIN_FRACTION = 0.5
"""Share of a pool without a split column that goes to train (the paper's random 50/50 split)."""


class HardTestSplitWarning(UserWarning):
    """Q_R is drawn from the hard test split, so the test problems are no longer held out."""


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
    """Share of kept problems that go to the train split, rounded down (paper: 0.5, 359 of 719)."""
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
    device: str = "auto"
    """Torch device of the model: "auto" (cuda when a GPU is visible, else cpu), "cpu", "cuda", "cuda:1", ..."""
    dtype: str = "auto"
    """Model weights' dtype: "auto" (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16."""
    sampler: str = "transformers"
    """Who samples: "transformers", or "vllm" (a CUDA device and the extra: pip install 'soar-gym[vllm]');
    with vllm raise --batch-size (e.g. 4096): it only bounds the sequences sent per call."""
    vllm_gpu_memory_utilization: float = 0.6
    """With sampler vllm: the share of the GPU vLLM takes (nothing trains beside it, unlike in the env)."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0.0 <= self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in [0, 1], got {self.train_fraction}")
        if self.chunk < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("chunk, batch_size and max_new_tokens must be >= 1")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {DTYPES}, got {self.dtype!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "vllm" and self.device == "cpu":
            raise ValueError("sampler 'vllm' needs a CUDA device; device is 'cpu'")
        if not 0 < float(self.vllm_gpu_memory_utilization) <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization!r}")

    def identity(self) -> dict:
        """Settings that must match for a partial build to be resumed."""
        # Not `limit`: a problem's result does not depend on how many others are built with it,
        # so a build can be cut short and resumed with a smaller limit. Nor device, dtype or
        # sampler: each finished problem is a valid 0/K (or solved) record whichever engine drew it.
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


def resolve_runtime(config: HardSetConfig) -> dict[str, str]:
    """The device, dtype and sampler a build runs with (``"auto"`` resolved); checks vLLM is there.

    Raises before any model loads: ``ImportError`` naming the extra when vLLM is asked for but
    missing, ``ValueError`` when vLLM is asked for and no GPU is visible.
    """
    from soar_env.models.resolve import resolve_device  # imports torch: only when a model is needed

    device = resolve_device(config.device)
    on_gpu = device.startswith("cuda")
    # bfloat16 on a GPU: half float32's memory and the GPU's fast matmuls, what vLLM samples in
    # too; float32 on the CPU keeps CPU builds what they always were.
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    if config.sampler == "vllm":
        if not on_gpu:
            raise ValueError(f"sampler 'vllm' needs a CUDA device; device {config.device!r} resolved to {device!r}")
        from soar_env.models.vllm_sampler import import_vllm

        import_vllm()  # an ImportError that names the extra, before minutes of model loading
    return {"device": device, "dtype": dtype, "sampler": config.sampler}


def load_policy(config: HardSetConfig, runtime: dict[str, str]) -> "LMPolicy":
    """The student model of a build, on ``runtime``'s device and dtype, sampling with its sampler."""
    import torch

    from soar_env.models.policy import LMPolicy  # transformers and peft: seconds to import

    policy = LMPolicy.from_name(config.model, lora=None, device=runtime["device"],
                                dtype=getattr(torch, runtime["dtype"]))
    if runtime["sampler"] == "vllm":
        from soar_env.models.vllm_sampler import VLLMSampler, VLLMSettings

        policy.sampler = VLLMSampler(policy, VLLMSettings(
            dtype=runtime["dtype"], gpu_memory_utilization=config.vllm_gpu_memory_utilization))
    return policy


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

    # What sampled this session (a resumed build that had nothing left to do sampled nothing).
    runtime = {"device": "n/a", "dtype": "n/a", "sampler": "n/a" if policy is None else "given policy"}
    if todo:
        if policy is None:
            runtime = resolve_runtime(config)
            policy = load_policy(config, runtime)
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
    # The split is written into the file (a column `split_pool` keeps): a seeded permutation, so
    # a rebuild with the same seed reproduces an existing file. Train gets the floor of the
    # fraction, as the paper's 359 train / 360 test of 719.
    order = np.random.default_rng(config.seed).permutation(len(hard))
    n_train = train_count(config.train_fraction, len(hard))
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
        "runtime": runtime,
        "result": asdict(result),
        "pool_samples": total_samples,
        "pool_correct": total_correct,
        "problems_with_a_correct_sample": sum(1 for r in done.values() if r["correct"] > 0),
        "note": "a problem stops being sampled at its first correct answer, so 'samples' < k for solved ones",
    }
    Path(str(out) + ".meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return result


def draw_eval_subset(pool: Sequence[Problem], size: int, rng: np.random.Generator) -> list[Problem]:
    """Q_R: ``size`` problems of ``pool`` (all of it when smaller), drawn without replacement."""
    index = rng.choice(len(pool), size=min(size, len(pool)), replace=False)
    return [pool[int(i)] for i in index]


def bundled_hardset_path(name: str = "bundled") -> Path:
    """Path of a hard set shipped with the package (built for the embedded student); see BUNDLED_HARDSETS."""
    return Path(str(resources.files("soar_env.data") / "bundled" / BUNDLED_HARDSETS[name]))


def load_hardset(path_or_name: str = "bundled", split: str | None = "train") -> list[Problem]:
    """Problems of a hard set file, or of a shipped one by name (``"bundled"``, the default, or
    another key of BUNDLED_HARDSETS). ``split=None`` gives all."""
    path = bundled_hardset_path(path_or_name) if path_or_name in BUNDLED_HARDSETS else Path(path_or_name)
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


def train_count(train_fraction: float, size: int) -> int:
    """Problems of ``size`` that go to train: the fraction rounded down (0.5 of 719 is 359, as in the paper)."""
    return math.floor(train_fraction * size + 1e-9)  # the epsilon keeps 0.29 * 100 at 29


def split_key(problem: Problem) -> str:
    """SHA-256 of the whitespace-normalised question: where a problem falls in the split."""
    return hashlib.sha256(" ".join(problem.question.split()).encode("utf-8")).hexdigest()


def split_pool(problems: list[Problem], train_fraction: float = HARD_TRAIN_FRACTION
               ) -> tuple[list[Problem], list[Problem]]:
    """(train, test) of a hard pool, each in pool order: the one place a hard pool is split.

    A pool with a ``split`` column keeps it (rows with another value are left out, with a
    warning). Any other pool goes by `split_key`: the distinct questions sorted by hash, the
    first ``int(train_fraction * count)`` of them train (359 of 719, as in the paper), the
    rest test. Equal questions share a hash, so a duplicate cannot sit on both sides; and as
    the hash ignores order, reordering the pool or drawing Q_R differently changes nothing.
    """
    if any("split" in p.meta for p in problems):
        train = [p for p in problems if p.meta.get("split") == "train"]
        test = [p for p in problems if p.meta.get("split") == "test"]
        left_out = len(problems) - len(train) - len(test)
        if left_out:
            warnings.warn(f"{left_out} hard-set rows have a split other than 'train'/'test' and are left out",
                          stacklevel=2)
        return train, test
    keys = [split_key(p) for p in problems]
    distinct = sorted(set(keys))
    train_keys = set(distinct[: train_count(train_fraction, len(distinct))])
    train = [p for p, key in zip(problems, keys) if key in train_keys]
    test = [p for p, key in zip(problems, keys) if key not in train_keys]
    return train, test


def hard_splits(config: EnvConfig) -> tuple[list[Problem], list[Problem]]:
    """(hard train, hard test) of an env config's hard set, split by `split_pool`.

    The split belongs to the pool, not to a seed, so the env's Q_R and every benchmark seed
    see the same one.
    """
    spec = config.hardset
    rows = load_hardset(spec, split=None) if spec in BUNDLED_HARDSETS else load_problems(spec)
    train, test = split_pool(rows)
    if config.hardset_families is None:
        return train, test
    keep = family_filter(config.hardset_families)
    return [p for p in train if keep(p)], [p for p in test if keep(p)]


def target_families(config: EnvConfig) -> tuple[str, ...] | None:
    """The generator families of an env's hard set (both splits, in `FAMILIES` order), or None when
    it holds problems that no generator made (MATH, OlympiadBench, a user's file).

    These are the target's topics for the teachers that search the generator space, as the
    paper's teacher prompt names the target benchmark's topics; the problems stay unseen.
    """
    train, test = hard_splits(config)
    names = {problem.meta.get("family") for problem in train + test}
    if not names or not names <= set(FAMILIES):  # a row no generator made, or a family unknown here
        return None
    return tuple(family for family in FAMILIES if family in names)


def family_filter(text: str) -> Callable[[Problem], bool]:
    """Whether a problem is of the families and difficulties ``text`` names ("addition@2-3", "all@1")."""
    if "#" in text or "%" in text:
        raise ValueError(f"hardset_families={text!r}: only FAMILIES[@D] (a count or a seed selects nothing here)")
    spec = parse_generator_spec(text)
    levels = set(spec.difficulty) if "@" in text else None

    def keep(problem: Problem) -> bool:
        family = problem.meta.get("family")
        if family is None:
            raise ValueError(f"hardset_families={text!r}: problem {problem.id} has no generator family "
                             "(meta['family']); the filter only applies to generated hard sets")
        return family in spec.families and (levels is None or problem.meta.get("difficulty") in levels)

    return keep


def load_hard_pool(config: EnvConfig) -> list[Problem]:
    """The problems Q_R is drawn from: the ``hardset_split`` side of `hard_splits` (train; the paper).

    Asking for the test split works but warns (`HardTestSplitWarning`): the teacher would then
    be rewarded, and promote, on the very problems PQ, PS and ``soar train`` test on.
    """
    train, test = hard_splits(config)
    if config.hardset_split == "test":
        warnings.warn(
            f"Q_R is drawn from the hard TEST split of {config.hardset!r} (hardset_split='test'): the "
            "teacher's reward and promotions then use the problems that PQ, PS and soar train's hard-test "
            "accuracy are measured on, so those results are no longer held out. Use hardset_split='train' "
            "(the paper) unless that is what you want.", HardTestSplitWarning, stacklevel=2)
    rows = train if config.hardset_split == "train" else test
    if not rows:
        raise ValueError(f"the hard set {config.hardset!r} has no problems in its {config.hardset_split!r} split "
                         f"({len(train)} train, {len(test)} test)")
    return rows
