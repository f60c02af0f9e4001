"""Saving and restoring numpy generators, so a resumed run draws exactly what it would have.

    state = rng_state(env.np_random)          # plain dicts and ints: torch.save / json friendly
    env.np_random = rng_from_state(state)     # continues the very same stream

Environments, teachers and their checkpoints all keep a ``np.random.Generator``; this is the
one place that turns one into a picklable state and back.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """A deep copy of the generator's bit-generator state (later draws do not change it)."""
    return copy.deepcopy(rng.bit_generator.state)


def rng_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    """A new generator whose bit generator (PCG64, MT19937, ...) resumes exactly at ``state``."""
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = copy.deepcopy(dict(state))
    return np.random.Generator(bit_generator)


__all__ = ["rng_from_state", "rng_state"]
