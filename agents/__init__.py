"""Teachers for SOAR-MATH-v0: SOAR's RLOO teacher, the paper's baselines, and the protocol to write your own.

    import gymnasium as gym
    import soar_env
    from agents import RLOOTeacher, make_teacher_config

    envs = gym.make_vec("SOAR-MATH-v0", num_envs=2, preset="cpu")
    RLOOTeacher(make_teacher_config("cpu")).learn(envs, total_steps=10, run_dir="runs/soar")

``soar train`` (`agents.train`) is the same thing from the command line. Importing this
package loads no model and no torch-heavy module; models load when ``learn`` starts.
"""

from agents.base import (
    BaseCallback,
    CallbackList,
    FunctionCallback,
    StepRecord,
    StopAfterPromotions,
    Teacher,
    TeacherProtocol,
    latest_checkpoint,
    run_learning,
)
from agents.baselines import BaseTeacher, HardOnlyTeacher, RandomTeacher
from agents.logger import Logger
from agents.rloo_teacher import TEACHER_PRESETS, IntrinsicTeacher, RLOOTeacher, TeacherConfig, make_teacher_config
from agents.sb3_teacher import SB3Teacher

__all__ = [
    "BaseCallback",
    "BaseTeacher",
    "CallbackList",
    "FunctionCallback",
    "HardOnlyTeacher",
    "IntrinsicTeacher",
    "Logger",
    "RLOOTeacher",
    "RandomTeacher",
    "SB3Teacher",
    "StepRecord",
    "StopAfterPromotions",
    "TEACHER_PRESETS",
    "Teacher",
    "TeacherConfig",
    "TeacherProtocol",
    "latest_checkpoint",
    "make_teacher_config",
    "run_learning",
]
