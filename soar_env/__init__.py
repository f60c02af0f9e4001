"""soar-gym: Gymnasium environments for SOAR teacher-student curricula on math problems."""

from soar_env.problems import Problem, Rejection

__version__ = "0.1.0"
__all__ = ["Problem", "Rejection", "__version__"]
