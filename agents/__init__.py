"""Teachers for SOAR-MATH-v0: SOAR's RLOO teacher, the paper's baselines, and the protocol to write your own.

    import gymnasium as gym
    import soar_env
    from agents import RLOOTeacher, make_teacher_config

    envs = gym.make_vec("SOAR-MATH-v0", num_envs=2, preset="cpu")
    RLOOTeacher(make_teacher_config("cpu")).learn(envs, total_steps=10, run_dir="runs/soar")

``soar train`` (`agents.train`) is the same thing from the command line. Importing this
package loads no model and no torch-heavy module; models load when ``learn`` starts.

Modules: `agents.base` (the protocol, `Teacher`), `agents.loop` (`run_learning`),
`agents.callbacks`, `agents.driver` (single and vector env behind one interface),
`agents.run_dir` (checkpoints and run files), `agents.logger`, the teachers
(`agents.rloo_teacher` with `agents.teacher_config` and `agents.teacher_sampling`,
`agents.baselines`, `agents.sb3_teacher`, `agents.alp_gmm` with `agents.gmm`), `agents.registry`
(teacher names), `agents.train` (``soar train``) and `agents.testing` (the conformance check).
"""

from agents.alp_gmm import ALPGMMTeacher
from agents.base import Teacher, TeacherProtocol
from agents.baselines import BaseTeacher, HardOnlyTeacher, IntrinsicTeacher, RandomTeacher
from agents.callbacks import BaseCallback, CallbackList, FunctionCallback, StepRecord, StopAfterPromotions
from agents.driver import env_config, env_core, unbatch_infos
from agents.logger import Logger, TensorBoardWriter
from agents.loop import check_batches, run_learning
from agents.rloo_teacher import RLOOTeacher
from agents.run_dir import checkpoint_dirs, checkpoint_step, latest_checkpoint, read_pq
from agents.sb3_teacher import SB3Teacher
from agents.teacher_config import TEACHER_PRESETS, TeacherConfig, make_teacher_config

__all__ = [
    "ALPGMMTeacher",
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
    "TensorBoardWriter",
    "Teacher",
    "TeacherConfig",
    "TeacherProtocol",
    "check_batches",
    "checkpoint_dirs",
    "checkpoint_step",
    "env_config",
    "env_core",
    "latest_checkpoint",
    "read_pq",
    "make_teacher_config",
    "run_learning",
    "unbatch_infos",
]
