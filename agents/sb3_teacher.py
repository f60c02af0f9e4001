"""A curriculum teacher learned by stable-baselines3's PPO, through the same ``learn`` loop.

    envs = gym.make_vec("SOAR-MATH-v0", num_envs=4, preset="tiny")
    SB3Teacher(n_steps=8).learn(envs, total_steps=64)        # pip install "soar-gym[sb3]"

The agent acts exactly as in SOAR-MATH-Param-v0: its observation is the env's Box(5,) summary
of the student, its action a Box over the procedural families' weights plus a difficulty, and
`soar_env.envs.parametric.decode_action` turns the action into a mixture from which n problems
are drawn. With g datasets per step PPO sees g parallel envs (its ``n_envs``). PPO is fed by
hand (policy forward, rollout buffer, ``train()``) instead of by ``PPO.learn``, so the loop,
logging and checkpoints are those of every other teacher and a killed run resumes. For plain
SB3 on the Param env, ``PPO("MlpPolicy", gym.make("SOAR-MATH-Param-v0")).learn(...)`` works too.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from agents.base import Teacher
from soar_env.data.generators import MAX_DIFFICULTY, MIN_DIFFICULTY, checked_families, sample_problems
from soar_env.envs.spaces import OBS_FIELDS
from soar_env.problems import Problem
from soar_env.rng import rng_from_state, rng_state

INSTALL_HINT = "pip install 'soar-gym[sb3]'  (or: pip install stable-baselines3)"


def require_sb3() -> None:
    """Fail with the extra to install when stable-baselines3 is missing (checked without importing it)."""
    if importlib.util.find_spec("stable_baselines3") is None:
        raise ImportError(f"SB3Teacher needs stable-baselines3: {INSTALL_HINT}")


class SB3Teacher(Teacher):
    """PPO choosing a family mixture and difficulty per dataset (SOAR-MATH-Param-v0's action).

    ``n_steps`` teacher steps fill PPO's rollout buffer (n_steps x g transitions), then
    ``n_epochs`` of minibatch updates run. Other keyword arguments go to ``PPO``.
    """

    def __init__(self, families: Sequence[str] | None = None, *, n_steps: int = 8, batch_size: int | None = None,
                 n_epochs: int = 4, learning_rate: float = 3e-4, gamma: float = 0.99, seed: int = 0,
                 **ppo_kwargs: Any) -> None:
        require_sb3()
        super().__init__()
        self.families = checked_families(families)
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        self.n_steps = int(n_steps)
        self.batch_size = batch_size
        self.n_epochs = int(n_epochs)
        self.learning_rate = float(learning_rate)
        self.gamma = float(gamma)
        self.seed = int(seed)
        self.ppo_kwargs = dict(ppo_kwargs)
        self.rng = np.random.default_rng(seed)
        self.model: Any = None
        self.num_envs: int | None = None
        self._obs: np.ndarray | None = None
        self._pending: tuple[np.ndarray, np.ndarray, Any, Any, np.ndarray] | None = None
        self._episode_starts: np.ndarray | None = None
        self._torch_rng: Any = None

    # -- model -----------------------------------------------------------------------------------

    def setup(self, env: Any, total_steps: int) -> None:
        num_envs = int(getattr(env, "num_envs", 1))
        self._build(num_envs)

    def _build(self, num_envs: int) -> None:
        if self.model is not None and self.num_envs == num_envs:
            return
        # Lazy: stable-baselines3 is an optional extra, and torch loads only when PPO is built.
        import torch
        from stable_baselines3 import PPO
        from stable_baselines3.common.logger import Logger as SB3Logger
        from stable_baselines3.common.vec_env import DummyVecEnv

        observation_space = spaces.Box(-np.inf, np.inf, shape=(len(OBS_FIELDS),), dtype=np.float32)
        action_space = spaces.Box(-1.0, 1.0, shape=(len(self.families) + 1,), dtype=np.float32)

        class SpacesOnly(gym.Env):
            """PPO wants an env to read spaces from; transitions come from the real env."""

            def __init__(self) -> None:
                self.observation_space, self.action_space = observation_space, action_space

            def reset(self, *, seed: int | None = None, options: Any = None) -> tuple[np.ndarray, dict]:
                super().reset(seed=seed)
                return np.zeros(observation_space.shape, dtype=np.float32), {}

            def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
                return np.zeros(observation_space.shape, dtype=np.float32), 0.0, False, False, {}

        self.num_envs = num_envs
        with torch.random.fork_rng(devices=[]):
            state = np.random.get_state()
            self.model = PPO("MlpPolicy", DummyVecEnv([SpacesOnly] * num_envs), n_steps=self.n_steps,
                             batch_size=self.batch_size or self.n_steps * num_envs, n_epochs=self.n_epochs,
                             learning_rate=self.learning_rate, gamma=self.gamma, seed=self.seed, device="cpu",
                             verbose=0, **self.ppo_kwargs)
            self._torch_rng = torch.get_rng_state()
            np.random.set_state(state)
        self.model.set_logger(SB3Logger(folder=None, output_formats=[]))  # values are read back, never written
        self._episode_starts = np.ones(num_envs, dtype=bool)

    @contextlib.contextmanager
    def _isolated(self) -> Iterator[None]:
        """Run PPO's sampling/training on the teacher's own torch and numpy RNG streams."""
        import torch  # lazy, as in _build

        with torch.random.fork_rng(devices=[]):
            np_state = np.random.get_state()
            torch.set_rng_state(self._torch_rng)
            np.random.seed(int(self.rng.integers(2**31 - 1)))
            try:
                yield
            finally:
                self._torch_rng = torch.get_rng_state()
                np.random.set_state(np_state)

    # -- acting ----------------------------------------------------------------------------------

    def observe(self, observation: np.ndarray) -> None:
        self._obs = np.asarray(observation, dtype=np.float32).reshape(-1, observation.shape[-1])

    def propose(self, num_datasets: int, problems_per_dataset: int) -> list[list[Problem]]:
        import torch  # lazy, as in _build
        from stable_baselines3.common.utils import obs_as_tensor

        # Lazy: the Param env's module loads the env and its student (torch); only the decoder is needed.
        from soar_env.envs.parametric import decode_action

        self._build(num_datasets)
        obs = self._obs if self._obs is not None and len(self._obs) == num_datasets else \
            np.zeros((num_datasets, len(OBS_FIELDS)), dtype=np.float32)
        with self._isolated(), torch.no_grad():
            actions, values, log_probs = self.model.policy(obs_as_tensor(obs, self.model.device))
        actions = actions.cpu().numpy()  # (g, F + 1), unclipped: PPO scores what it sampled
        self._pending = (obs.copy(), actions, values, log_probs, self._episode_starts.copy())
        batches, levels = [], []
        for action in np.clip(actions, -1.0, 1.0):
            weights, level = decode_action(action, self.families, MIN_DIFFICULTY, MAX_DIFFICULTY)
            batches.append(sample_problems(problems_per_dataset, self.rng, families=self.families, weights=weights,
                                           difficulty=level))
            levels.append(level)
        self.record("teacher/difficulty_mean", float(np.mean(levels)))
        return batches

    def update(self, rewards: np.ndarray, infos: Sequence[Mapping[str, Any]] = ()) -> dict[str, float]:
        """Add the transition; when the buffer holds n_steps of them, run PPO's update."""
        import torch  # lazy, as in _build
        from stable_baselines3.common.utils import obs_as_tensor

        if self._pending is None:
            raise RuntimeError("update() needs a propose() first")
        obs, actions, values, log_probs, starts = self._pending
        self._pending = None
        model = self.model
        buffer = model.rollout_buffer
        buffer.add(obs, actions, np.asarray(rewards, dtype=np.float32), starts, values, log_probs)
        self._episode_starts = np.zeros(self.num_envs, dtype=bool)
        model.num_timesteps += self.num_envs
        if not buffer.full:
            return {}
        next_obs = self._obs if self._obs is not None else obs
        with self._isolated():
            with torch.no_grad():
                last_values = model.policy.predict_values(obs_as_tensor(next_obs, model.device))
            # Truncations bootstrap from the value, as SB3 does for time limits: no terminal dones.
            buffer.compute_returns_and_advantage(last_values=last_values, dones=np.zeros(self.num_envs))
            model.train()
        buffer.reset()
        logged = dict(model.logger.name_to_value)
        model.logger.dump()  # no writers: this only clears the values
        return {f"ppo_{key.split('/', 1)[-1]}": float(value) for key, value in logged.items()
                if isinstance(value, (int, float, np.floating))}

    # -- state -----------------------------------------------------------------------------------

    _BUFFER_FIELDS = ("observations", "actions", "rewards", "episode_starts", "values", "log_probs")

    def state_dict(self) -> dict[str, Any]:
        if self.model is None:
            raise RuntimeError("SB3Teacher.state_dict before setup(): there is no PPO model yet")
        buffer = self.model.rollout_buffer
        return {
            "num_envs": self.num_envs,
            "policy": self.model.policy.state_dict(),
            "optimizer": self.model.policy.optimizer.state_dict(),
            "n_updates": self.model._n_updates,
            "num_timesteps": self.model.num_timesteps,
            "buffer": {name: np.array(getattr(buffer, name), copy=True) for name in self._BUFFER_FIELDS},
            "buffer_pos": buffer.pos,
            "buffer_full": buffer.full,
            "rng": rng_state(self.rng),
            "torch_rng": self._torch_rng.clone(),
            "obs": None if self._obs is None else self._obs.copy(),
            "episode_starts": self._episode_starts.copy(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._build(int(state["num_envs"]))
        model = self.model
        model.policy.load_state_dict(state["policy"])
        model.policy.optimizer.load_state_dict(state["optimizer"])
        model._n_updates = int(state["n_updates"])
        model.num_timesteps = int(state["num_timesteps"])
        buffer = model.rollout_buffer
        for name in self._BUFFER_FIELDS:
            getattr(buffer, name)[...] = state["buffer"][name]
        buffer.pos, buffer.full = int(state["buffer_pos"]), bool(state["buffer_full"])
        self.rng = rng_from_state(state["rng"])
        self._torch_rng = state["torch_rng"].clone()
        self._obs = None if state["obs"] is None else np.asarray(state["obs"], dtype=np.float32)
        self._episode_starts = np.asarray(state["episode_starts"], dtype=bool)
        self._pending = None
