"""The own decode loop (soar_env.models.fast_decode) against ``generate`` and LMPolicy.sample.

    python -m pytest tests/test_fast_decode.py -q
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from soar_env.models import LMPolicy, LoraSettings, build_tiny_model
from soar_env.models.decoding import SampleOptions, left_pad
from soar_env.models.decode_engines import FastDecodeSettings, supports_llama_engine
from soar_env.models.decoding import row_seed
from soar_env.models.fast_decode import _inverse_cdf, decode_rows, sample_rollout
from soar_env.prompts import student_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["What is 2 + 3?", "Find x if 3x + 4 = 19 and explain every step.", "Compute 7 * 8."]
LLAMA, HF = FastDecodeSettings(engine="llama"), FastDecodeSettings(engine="hf")
BF16 = FastDecodeSettings(engine="llama", dtype="bfloat16")
UNPACKED = FastDecodeSettings(engine="llama", prepack=False)


def prompt_ids(tokenizer, questions=QUESTIONS) -> list[list[int]]:
    """Chat prompts of different lengths, so a batch is left-padded."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": student_prompt(q)}], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def generate_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """``model.generate`` greedy on a left-padded batch, eos off: the reference rows."""
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    return out[:, ids.shape[1]:].tolist()


def options(**overrides) -> SampleOptions:
    given = dict(num_samples=4, temperature=1.0, max_new_tokens=12, stop=None, greedy=False, seed=0, batch_size=64)
    return SampleOptions(**(given | overrides))


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(seed=0)


# ----------------------------------------------------------------------------------------------
# greedy against generate


@pytest.mark.parametrize("settings", [LLAMA, UNPACKED, HF], ids=["llama", "llama-unpacked", "hf"])
def test_greedy_equals_generate_token_for_token(tiny, settings) -> None:
    model, tokenizer = tiny
    prompts = prompt_ids(tokenizer)
    assert len({len(p) for p in prompts}) == 3, "the batch must need left padding"
    reference = generate_greedy(model, tokenizer, prompts, 24)
    rows = decode_rows(model, prompts, samples=[1, 1, 1], max_new_tokens=24, greedy=True, settings=settings)
    assert rows == reference


@pytest.mark.parametrize("prompts", [
    [[5, 6, 7], [5, 6, 7, 8, 9], [5, 6, 7]],  # one prompt the prefix of another, a duplicate
    [[5, 6, 7, 8], [9, 10], [11]],  # nothing shared
    [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]],  # one prompt
], ids=["nested", "disjoint", "single"])
def test_greedy_equals_generate_whatever_the_prompts_share(tiny, prompts) -> None:
    """The shared prefix runs once and the suffixes after it; any overlap gives generate's tokens."""
    model, tokenizer = tiny
    reference = generate_greedy(model, tokenizer, prompts, 12)
    for settings in (LLAMA, HF):
        assert decode_rows(model, prompts, samples=[1] * len(prompts), max_new_tokens=12, greedy=True,
                           settings=settings) == reference


def test_greedy_equals_generate_on_qwen2_with_qkv_biases() -> None:
    """Qwen2 (q/k/v biases, no norm quirks) runs on the llama engine and matches generate."""
    _, tokenizer = build_tiny_model(seed=0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         tie_word_embeddings=False, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
        with torch.no_grad():
            for layer in model.model.layers:  # biases default to zero: make them matter
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    assert supports_llama_engine(model)
    prompts = prompt_ids(tokenizer)
    reference = generate_greedy(model, tokenizer, prompts, 16)
    assert decode_rows(model, prompts, samples=[1, 1, 1], max_new_tokens=16, greedy=True, settings=LLAMA) == reference


def test_other_architectures_fall_back_to_their_own_forward() -> None:
    _, tokenizer = build_tiny_model(seed=0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                        initializer_range=0.2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
    assert not supports_llama_engine(model)
    with pytest.raises(ValueError, match="llama engine"):
        decode_rows(model, [[5, 6]], samples=[1], max_new_tokens=2, greedy=True, settings=LLAMA)
    prompts = prompt_ids(tokenizer)
    reference = generate_greedy(model, tokenizer, prompts, 12)
    assert decode_rows(model, prompts, samples=[1, 1, 1], max_new_tokens=12, greedy=True) == reference


# ----------------------------------------------------------------------------------------------
# the whole LMPolicy.sample replacement


@pytest.mark.parametrize("settings", [LLAMA, HF], ids=["llama", "hf"])
def test_greedy_rollout_equals_lmpolicy_sample_with_lora(lora_policy, settings) -> None:
    """Adapters folded in, stop strings, trimming and the greedy copies: the same Rollout."""
    prompts = [lora_policy.chat_prompt(student_prompt(q)) for q in QUESTIONS]
    encoded = [lora_policy.encode(p) for p in prompts]
    free = lora_policy.sample(prompts, num_samples=2, max_new_tokens=20, greedy=True)
    stop = next(text[3:5] for text in free.texts if len(text) >= 5)  # a string some row writes
    for stops in (None, [stop]):
        reference = lora_policy.sample(prompts, num_samples=2, max_new_tokens=20, greedy=True, stop=stops)
        ours = sample_rollout(lora_policy.model, lora_policy.tokenizer, encoded,
                              options(num_samples=2, max_new_tokens=20, greedy=True, stop=stops),
                              eos_token_ids=lora_policy.eos_token_ids, settings=settings)
        assert ours == reference
    with lora_policy.model.disable_adapter():
        plain = sample_rollout(lora_policy.model, lora_policy.tokenizer, encoded,
                               options(num_samples=1, max_new_tokens=20, greedy=True),
                               eos_token_ids=lora_policy.eos_token_ids, settings=settings)
    assert plain.completion_ids != free.completion_ids[::2], "the adapters change the output"


def test_plain_model_and_peft_model_without_adapters_agree(tiny) -> None:
    model, tokenizer = tiny
    prompts = prompt_ids(tokenizer)
    policy = LMPolicy(*build_tiny_model(seed=0), lora=LoraSettings(r=4))  # B = 0: adapters add nothing
    plain = decode_rows(model, prompts, samples=[2, 2, 2], max_new_tokens=10, seed=1)
    wrapped = decode_rows(policy.model, prompts, samples=[2, 2, 2], max_new_tokens=10, seed=1)
    assert plain == wrapped


# ----------------------------------------------------------------------------------------------
# sampling: seeds, per-row streams, the distribution


@pytest.mark.parametrize("settings", [LLAMA, HF], ids=["llama", "hf"])
def test_same_seed_same_tokens_other_seed_other_tokens(tiny, settings) -> None:
    model, tokenizer = tiny
    prompts = prompt_ids(tokenizer)
    first = decode_rows(model, prompts, samples=[3, 3, 3], max_new_tokens=12, seed=7, settings=settings)
    again = decode_rows(model, prompts, samples=[3, 3, 3], max_new_tokens=12, seed=7, settings=settings)
    other = decode_rows(model, prompts, samples=[3, 3, 3], max_new_tokens=12, seed=8, settings=settings)
    assert first == again and first != other
    assert len({tuple(row) for row in first}) == 9, "every row has its own stream"


def test_seedless_call_uses_the_global_rng(tiny) -> None:
    model, tokenizer = tiny
    prompts = prompt_ids(tokenizer)[:1]
    torch.manual_seed(11)
    first = decode_rows(model, prompts, samples=[2], max_new_tokens=8)
    torch.manual_seed(11)
    assert decode_rows(model, prompts, samples=[2], max_new_tokens=8) == first
    state = torch.get_rng_state()
    decode_rows(model, prompts, samples=[2], max_new_tokens=8, seed=0)
    assert torch.equal(torch.get_rng_state(), state), "a seeded call leaves the global RNG alone"


def test_a_rows_tokens_do_not_depend_on_its_batch(tiny) -> None:
    """Row (prompt 1, sample 2) alone, in a full batch, and in small batches: the same tokens."""
    model, tokenizer = tiny
    prompts = prompt_ids(tokenizer)
    full = decode_rows(model, prompts, samples=[4, 4, 4], max_new_tokens=16, seed=3)
    alone = decode_rows(model, [prompts[1]], row_prompts=[0], row_seeds=[row_seed(3, 1, 2)], max_new_tokens=16)
    assert alone[0] == full[4 + 2]
    big = sample_rollout(model, tokenizer, prompts, options(batch_size=64, max_new_tokens=16, seed=3), eos_token_ids=[2])
    small = sample_rollout(model, tokenizer, prompts, options(batch_size=3, max_new_tokens=16, seed=3), eos_token_ids=[2])
    assert big == small


def test_finished_rows_leave_the_batch_without_changing_the_others(tiny) -> None:
    """Eos tokens that end most rows early: compacting after every end or never, the same rows."""
    model, tokenizer = tiny
    prompts = prompt_ids(tokenizer)
    free = decode_rows(model, prompts, samples=[4, 4, 4], max_new_tokens=16, seed=5)
    counts = Counter(t for row in free for t in row[2:10])
    eos = [t for t, _ in counts.most_common(4)]
    ended = [next((k for k, t in enumerate(row) if t in eos), None) for row in free]
    assert sum(k is not None and k < 15 for k in ended) >= 6, "the test needs rows that end early"
    assert len({k for k in ended if k is not None}) >= 3, "... at different steps"
    rows = {}
    for fraction in (0.0, 0.5, 1.0):
        settings = FastDecodeSettings(compact_fraction=fraction)
        rows[fraction] = decode_rows(model, prompts, samples=[4, 4, 4], max_new_tokens=16, seed=5,
                                     eos_token_ids=eos, settings=settings)
    assert rows[0.0] == rows[0.5] == rows[1.0]
    for row, whole, end in zip(rows[0.0], free, ended):
        cut = len(whole) if end is None else end + 1
        assert row == whole[:cut], "a row ends after its eos and is otherwise unchanged"


def test_stop_strings_end_a_row_at_the_completing_token(tiny) -> None:
    model, tokenizer = tiny
    prompts = prompt_ids(tokenizer)
    free = decode_rows(model, prompts, samples=[3, 3, 3], max_new_tokens=20, seed=2)
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in free]
    stop = " "
    assert sum(stop in t for t in texts) >= 3
    cut = decode_rows(model, prompts, samples=[3, 3, 3], max_new_tokens=20, seed=2, stops=[stop], tokenizer=tokenizer)
    for row, whole, text in zip(cut, free, texts):
        assert row == whole[: len(row)]
        if stop in text:
            assert stop in tokenizer.decode(row) and stop not in tokenizer.decode(row[:-1])
        else:
            assert row == whole


def test_inverse_cdf_draws_the_softmax() -> None:
    """Evenly spread uniforms land on each token in proportion to its probability (known answer)."""
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0, -30.0]])
    n = 10_000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens = _inverse_cdf(logits.expand(n, -1), uniforms, temperature=0.7)
    counts = torch.bincount(tokens, minlength=5).double()
    expected = torch.softmax(logits[0].double() / 0.7, -1) * n
    assert (counts - expected).abs().max() <= 1.0
    assert counts[4] == 0


def test_temperature_zero_and_greedy_are_argmax(tiny) -> None:
    model, tokenizer = tiny
    prompts = prompt_ids(tokenizer)
    greedy = decode_rows(model, prompts, samples=[1, 1, 1], max_new_tokens=8, greedy=True)
    assert decode_rows(model, prompts, samples=[1, 1, 1], max_new_tokens=8, temperature=0.0, seed=4) == greedy


# ----------------------------------------------------------------------------------------------
# bfloat16


def test_bf16_runs_deterministically_and_mostly_agrees_with_fp32(tiny) -> None:
    model, tokenizer = tiny
    questions = [f"What is {a} + {b}?" for a in range(4) for b in range(5)]
    prompts = prompt_ids(tokenizer, questions)
    fp32 = decode_rows(model, prompts, samples=[1] * 20, max_new_tokens=6, greedy=True, settings=LLAMA)
    bf16 = decode_rows(model, prompts, samples=[1] * 20, max_new_tokens=6, greedy=True, settings=BF16)
    assert bf16 == decode_rows(model, prompts, samples=[1] * 20, max_new_tokens=6, greedy=True, settings=BF16)
    first_agree = sum(a[0] == b[0] for a, b in zip(fp32, bf16))
    assert first_agree >= 16, f"bf16 greedy first tokens agree with fp32 on {first_agree}/20"
    sampled = decode_rows(model, prompts[:2], samples=[2, 2], max_new_tokens=6, seed=0, settings=BF16)
    assert sampled == decode_rows(model, prompts[:2], samples=[2, 2], max_new_tokens=6, seed=0, settings=BF16)


def test_model_weights_are_untouched(lora_policy) -> None:
    before = {n: p.clone() for n, p in lora_policy.model.named_parameters()}
    encoded = [lora_policy.encode(lora_policy.chat_prompt(q)) for q in QUESTIONS]
    for settings in (LLAMA, BF16):
        sample_rollout(lora_policy.model, lora_policy.tokenizer, encoded, options(), eos_token_ids=[2], settings=settings)
    after = dict(lora_policy.model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())


def test_sampler_speed_benchmark_runs_on_tiny() -> None:
    from benchmarks import sampler_speed

    results = sampler_speed.main(["--model", "tiny", "--runs", "1", "--warmup", "0", "--max-new-tokens", "6",
                                  "--sides", ",".join(sampler_speed.SIDES)])
    assert set(results["sides"]) == set(sampler_speed.SIDES)
    assert all(side["tokens"][0] > 0 for side in results["sides"].values())
    assert results["gemm_gflops"]["fp32"][0] > 0 and results["roofline_tokens_per_s"] > 0
