"""Settings of a teacher comparison (``soar bench``): the methods, the table's rows, `BenchConfig`.

The CLI options of ``soar bench`` are generated from `BenchConfig` (one docstring per field).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agents.teacher_config import make_teacher_config
from agents.train import DEFAULT_STEPS
from benchmarks.evaluation import EvalConfig
from benchmarks.timing import parse_override
from soar_env.config import make_config
from soar_env.data.hardset import BUNDLED_HARDSETS
from soar_env.options import check_minimum

METHODS = ("base-student", "hard-only", "base", "random", "intrinsic", "soar", "sb3", "alp-gmm")
TEACHER_OF = {"base": "base", "random": "random", "intrinsic": "intrinsic", "soar": "rloo", "sb3": "sb3",
              "alp-gmm": "alp-gmm"}
"""The ``soar train --teacher`` of each method that has a teacher."""
META_TRAINED = ("intrinsic", "soar", "sb3", "alp-gmm")
ROW_NAMES = {"base-student": "Base", "hard-only": "Hard-Only", "base": "Base-T", "random": "Random",
             "intrinsic": "Intrinsic-T", "soar-pq": "SOAR PQ", "soar-ps": "SOAR PS", "grounded": "Grounded-T",
             "sb3": "SB3 teacher", "alp-gmm": "ALP-GMM"}
ROW_ORDER = ("base-student", "hard-only", "base", "random", "intrinsic", "grounded", "soar-pq", "soar-ps", "sb3",
             "alp-gmm")
KS = (1, 4, 8, 16, 32)

PAPER_SETTINGS = "MATH fail@128 hard test (360 problems), Llama-3.2-3B-Instruct, 200 teacher steps, 6-12 seeds"
"""What the paper's numbers below were measured on."""

PAPER_MATH = {
    "base-student": (0.3, 1.0, 2.0, 3.9, 7.5),
    "hard-only": (0.5, 1.7, 3.2, 5.7, 9.6),
    "soar-pq": (1.7, 5.3, 8.5, 13.0, 18.9),
    "soar-ps": (1.0, 3.8, 6.8, 11.5, 18.1),
    "intrinsic": (None, None, None, None, 14.1),
}
"""The paper's MATH hard-test pass@k (%), k = 1/4/8/16/32 (Sundaram et al. 2026, SOAR_SPEC.md)."""

QUICK = {"preset": "tiny", "seeds": 1, "teacher_steps": 2, "pq_max_steps": 4, "eval_every": 2,
         "synthetic_steps": 2, "analysis_questions": 32}
"""--quick: the tiny preset, one seed, every loop at its smallest (minutes on 2 cores)."""

PQ_STEPS = {"tiny": 4, "cpu": 60, "paper": 1500}
"""Default RLOO steps of a fresh PQ student per preset (paper: <= 1500, with early stop)."""


@dataclass
class BenchConfig:
    """Settings of one teacher comparison."""

    preset: str = "cpu"
    """Env and teacher preset: tiny (seconds), cpu (SmolLM2-135M on a laptop CPU) or paper."""
    methods: str = ",".join(METHODS)
    """Comma-separated methods: base-student, hard-only, base, random, intrinsic, soar, sb3, alp-gmm."""
    seeds: int = 3
    """Seeds per method (seed s also seeds the env, the teacher and the fresh students)."""
    first_seed: int = 0
    """First seed; seeds are first_seed .. first_seed + seeds - 1."""
    teacher_steps: int | None = None
    """Meta-training steps of each learned teacher (default: soar train's for the preset)."""
    env_set: str = ""
    """Env settings over the preset for every job, comma-separated name=value (e.g.
    inner_steps=4,learning_rate=2e-4); each job records the env it resolved to, so a preset retuned
    later cannot mix into a study."""
    teacher_set: str = ""
    """Teacher settings over the preset's for every method with a teacher, comma-separated
    name=value (e.g. families=all, or topics=...); each job records the prompt topics, question
    form and curriculum families it resolved to."""
    pq_mode: str = "curriculum"
    """How synthetic problems and hard train are combined: curriculum (paper, MATH) or mixed (HARP)."""
    pq_max_steps: int | None = None
    """RLOO steps of every fresh student (default: tiny 4, cpu 60, paper 1500)."""
    synthetic_steps: int | None = None
    """Curriculum mode: steps on the synthetic problems first (default: min(64, pq_max_steps // 2))."""
    eval_every: int | None = None
    """Steps between held-out measurements for early stopping (default: pq_max_steps // 4)."""
    early_stop: bool = True
    """Slope-based early stop of fresh students on their greedy accuracy on hard-train problems."""
    pq_schedule: str = "one-run"
    """one-run: one AdamW and one cosine over a fresh student's pq_max_steps, untouched by the
    early-stop measurements (paper); per-chunk: both restart every eval_every steps (the earlier
    protocol, kept to reproduce its studies, e.g. benchmarks/results/compare-cpu)."""
    heldout_size: int = 0
    """Hard-train problems held out of training for the early-stop curve (at most a quarter of hard
    train); 0: none, the curve is measured on 32 hard-train problems that are also trained on."""
    samples: int = 32
    """Sampled solutions per hard-test problem (pass@k for k <= samples)."""
    test_size: int | None = None
    """Hard-test problems used (None: all)."""
    synthetic_problems: int | None = None
    """Problems sampled from a non-promoting teacher (Base-T, Random, Intrinsic-T, Grounded-T) (default: g x n)."""
    analysis_questions: int = 128
    """Questions sampled per teacher into questions.jsonl for the question analysis."""
    budget_minutes: float | None = None
    """Stop starting new (method, seed) jobs after this much wall time; skipped ones are listed."""
    out: str = "runs/compare"
    """Output folder."""
    quick: bool = False
    """Smoke test: tiny preset, 1 seed, smallest loops; overrides the sizes above."""
    threads: int = 1
    """Torch CPU threads (1 is fastest on a busy machine)."""
    workers: int = 1
    """(method, seed) jobs run at once, each in its own process with ``threads`` threads (2 on a 2-core CPU)."""
    plots: bool = True
    """Draw plots when matplotlib is installed."""

    def __post_init__(self) -> None:
        if self.quick:
            for key, value in QUICK.items():
                setattr(self, key, value)
        unknown = [m for m in self.method_list if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
        check_minimum(self, ("seeds", "workers"), 1)
        self.evaluation()  # checks the PQ settings now rather than in the first job
        make_config(self.preset, **self.env_overrides())  # and env_set's names and values
        make_teacher_config(self.preset, **self.teacher_overrides())  # and teacher_set's

    def env_overrides(self) -> dict[str, Any]:
        """``env_set`` as EnvConfig overrides (checked by name when a config is made)."""
        return parse_override(self.env_set) if self.env_set.strip() else {}

    def teacher_overrides(self) -> dict[str, Any]:
        """``teacher_set`` as TeacherConfig overrides (checked by name when a config is made)."""
        return parse_override(self.teacher_set) if self.teacher_set.strip() else {}

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def evaluation(self) -> EvalConfig:
        """The PQ / PS settings of every fresh student of this study."""
        steps = self.resolved_pq_steps
        return EvalConfig(mode=self.pq_mode, max_steps=steps, synthetic_steps=self.resolved_synthetic_steps,
                          eval_every=self.eval_every or max(steps // 4, 1), early_stop=self.early_stop,
                          schedule=self.pq_schedule, heldout_size=self.heldout_size,
                          samples=self.samples, test_size=self.test_size)

    @property
    def resolved_pq_steps(self) -> int:
        """RLOO steps of every fresh student (``pq_max_steps`` or the preset's default)."""
        return self.pq_max_steps or PQ_STEPS.get(self.preset, 60)

    @property
    def resolved_synthetic_steps(self) -> int:
        """Curriculum steps on the synthetic problems (``synthetic_steps`` or its default)."""
        if self.synthetic_steps is not None:
            return self.synthetic_steps
        return min(64, max(self.resolved_pq_steps // 2, 1))


def paper_differences(bench: BenchConfig, *, questions: bool = False) -> list[str]:
    """This study's settings that differ from those of the paper's MATH numbers; empty: comparable.

    ``questions``: only what matters for the question analysis (the teacher and its training).
    """
    differences = []
    if bench.preset != "paper":
        differences.append(f"preset {bench.preset} (paper: Llama-3.2-3B-Instruct as teacher and student)")
    teacher_steps = bench.teacher_steps or DEFAULT_STEPS.get(bench.preset, 10)
    if teacher_steps != 200:
        differences.append(f"{teacher_steps} teacher steps (paper: 200)")
    if questions:
        if bench.analysis_questions != 128:
            differences.append(f"{bench.analysis_questions} questions (paper: 128)")
        return differences
    hardset = make_config(bench.preset, **bench.env_overrides()).hardset
    if hardset in BUNDLED_HARDSETS or hardset.startswith("generator:"):
        differences.append(f"hard set {hardset} (paper: MATH fail@128, 359 train / 360 test)")
    evaluation = bench.evaluation()
    if evaluation.max_steps != 1500:
        differences.append(f"fresh students of at most {evaluation.max_steps} steps (paper: 1500)")
    if evaluation.mode != "curriculum":
        differences.append(f"PQ mode {evaluation.mode} (paper, MATH: curriculum)")
    elif evaluation.synthetic_steps != 64:
        differences.append(f"{evaluation.synthetic_steps} synthetic curriculum steps (paper: 64)")
    if evaluation.schedule != "one-run":
        differences.append("AdamW and cosine restarted every chunk (paper: one run)")
    if not evaluation.early_stop:
        differences.append("no early stop (paper: slope-based)")
    if evaluation.samples != 32:
        differences.append(f"{evaluation.samples} samples per problem (paper: 32)")
    if evaluation.test_size is not None:
        differences.append(f"{evaluation.test_size} hard-test problems (paper: all)")
    return differences
