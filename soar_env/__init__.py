"""soar-gym: Gymnasium environments for SOAR teacher-student curricula on math problems."""

from soar_env.config import PRESETS, EnvConfig, make_config
from soar_env.envs import ENV_IDS, register_envs
from soar_env.problems import Problem, Rejection

__version__ = "0.1.0"

# `import soar_env` (or gym.make("soar_env:SOAR-MATH-v0")) makes the ids available.
register_envs()

__all__ = ["ENV_IDS", "EnvConfig", "PRESETS", "Problem", "Rejection", "__version__", "make_config", "register_envs"]
