"""A teacher in twenty lines: a difficulty ladder over the procedural problem generators.

    soar train --teacher examples.my_teacher:MyTeacher --preset tiny --steps 2
"""

import numpy as np

from agents import Teacher
from soar_env.data.generators import sample_problems


class MyTeacher(Teacher):
    """Serve generated problems one level harder after a step the student gained from, easier after a loss."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.level, self.rng = 1, np.random.default_rng(seed)

    def propose(self, num_datasets, problems_per_dataset):
        return [sample_problems(problems_per_dataset, self.rng, difficulty=self.level) for _ in range(num_datasets)]

    def update(self, rewards, infos):
        self.level = int(np.clip(self.level + np.sign(np.mean(rewards)), 1, 5))
        return {"level": self.level}

    def state_dict(self):
        return {"level": self.level, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.level, self.rng.bit_generator.state = state["level"], state["rng"]
