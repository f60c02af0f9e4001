"""Teacher names of ``soar train`` and the benchmarks: a built-in name or ``module:Class`` -> the class.

    resolve_teacher_class("rloo")                            # RLOOTeacher
    resolve_teacher_class("examples.my_teacher:MyTeacher")   # imports the module, loads no model
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from agents.alp_gmm import ALPGMMTeacher
from agents.base import PROTOCOL_METHODS
from agents.baselines import BaseTeacher, HardOnlyTeacher, IntrinsicTeacher, RandomTeacher
from agents.rloo_teacher import RLOOTeacher
from agents.sb3_teacher import SB3Teacher, require_sb3

BUILTIN_TEACHERS = {
    "rloo": "SOAR's teacher (Grounded-T): an LLM trained with RLOO on the grounded reward",
    "random": "uniformly random generated problems",
    "base": "the untrained LLM teacher (Base-T)",
    "intrinsic": "the LLM teacher trained on the learnability reward (Intrinsic-T)",
    "hard-only": "the hard train problems themselves (Hard-Only)",
    "sb3": "stable-baselines3 PPO over the procedural curriculum (SOAR-MATH-Param-v0's action)",
    "alp-gmm": "ALP-GMM: absolute learning progress over a Gaussian mixture of (family mixture, difficulty) tasks",
}
"""Built-in teacher names and what each one is."""

TEACHER_CLASSES: dict[str, type] = {
    "rloo": RLOOTeacher,
    "random": RandomTeacher,
    "base": BaseTeacher,
    "intrinsic": IntrinsicTeacher,
    "hard-only": HardOnlyTeacher,
    "sb3": SB3Teacher,
    "alp-gmm": ALPGMMTeacher,
}
"""The class behind each built-in name."""

LLM_TEACHERS = ("rloo", "base", "intrinsic")
"""Built-in teachers that load a language model (and take a `TeacherConfig`)."""


def resolve_teacher_class(spec: str) -> Any:
    """A built-in teacher name or ``module:Class`` -> the class (imports the module, loads no model)."""
    if spec in TEACHER_CLASSES:
        if spec == "sb3":
            require_sb3()
        return TEACHER_CLASSES[spec]
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"teacher {spec!r} is neither {', '.join(TEACHER_CLASSES)} nor module:Class")
    # A user's module is usually next to where they run the command.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"cannot import the teacher module {module_name!r}: {error}") from None
    cls = module
    for part in class_name.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise ValueError(f"module {module_name!r} has no {class_name!r}")
    missing = [m for m in PROTOCOL_METHODS if not hasattr(cls, m)]
    if missing:
        raise ValueError(f"{spec} is not a teacher: it lacks {', '.join(missing)} (subclass agents.Teacher)")
    return cls
