"""The tiny teacher model that knows the output format ("tiny-format"), for tests and the tiny preset.

    model, tokenizer = tiny_format_model()      # seconds the first time, then from the cache

A random-initialised tiny Llama writes no valid teacher output, so tests of the LLM teacher
would see only rejections. A few dozen supervised steps on well-formatted generated problems
teach it the tags (never the arithmetic).
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from agents.teacher_config import ARITHMETIC_TOPICS
from soar_env.atomic import atomic_torch_save
from soar_env.data.generators import sample_problems
from soar_env.prompts import teacher_prompt

_TINY_FORMAT_CACHE: dict[tuple[str, int, int], tuple[Any, Any]] = {}


def cache_dir() -> Path:
    """``$SOAR_GYM_CACHE``, else ``$XDG_CACHE_HOME/soar-gym`` (default ``~/.cache/soar-gym``)."""
    root = os.environ.get("SOAR_GYM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "soar-gym")
    return Path(root).expanduser()


def tiny_format_model(topics: str = ARITHMETIC_TOPICS, *, seed: int = 0, steps: int = 40) -> tuple[Any, Any]:
    """The tiny random Llama after ``steps`` supervised steps on well-formatted generated problems.

    Trained on the exact teacher prompt (without reply prefix) followed by
    ``<question>Q</question>\\n<answer>\\boxed{A}</answer>``, so every prefill mode continues it.
    It learns the tags in a few dozen steps, the arithmetic never: answers are mostly wrong,
    which a teacher's answers may be. Deterministic for a seed. The weights are kept per
    process and in `cache_dir`, so a new process (a resumed run, a test's subprocess) does
    not train them again; callers get copies.
    """
    # Lazy: torch, transformers and the model zoo load only when a tiny teacher is built.
    import torch
    import transformers

    from soar_env.models import build_tiny_model

    key = (topics, seed, steps)
    if key not in _TINY_FORMAT_CACHE:
        model, tokenizer = build_tiny_model(seed=seed)
        digest = hashlib.sha1(repr((key, transformers.__version__, torch.__version__)).encode()).hexdigest()[:16]
        path = cache_dir() / f"tiny-format-{digest}.pt"
        state = None
        if path.is_file():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state)
            except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, never fatal
                state = None
        if state is None:
            _train_format(model, tokenizer, topics, seed, steps)
            try:
                atomic_torch_save(model.state_dict(), path)
            except OSError:
                pass  # a read-only home only costs the retraining
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
            parameter.grad = None
        _TINY_FORMAT_CACHE[key] = (model, tokenizer)
    model, tokenizer = _TINY_FORMAT_CACHE[key]
    return copy.deepcopy(model), copy.deepcopy(tokenizer)


def _train_format(model: Any, tokenizer: Any, topics: str, seed: int, steps: int) -> None:
    import torch  # lazy, as above

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": teacher_prompt(topics)}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(steps):
            batch = sample_problems(8, rng, families=("addition", "subtraction", "multiplication"), difficulty=(1, 2))
            rows = [prompt_ids + tokenizer(f"<question>{p.question}</question>\n<answer>\\boxed{{{p.answer}}}"
                                           "</answer>", add_special_tokens=False)["input_ids"]
                    + [tokenizer.eos_token_id] for p in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), tokenizer.pad_token_id)  # (B, L), right-padded
            labels = torch.full((len(rows), width), -100)  # loss on the reply only
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(row)
                labels[i, len(prompt_ids):len(row)] = torch.tensor(row[len(prompt_ids):])
                mask[i, :len(row)] = 1
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
