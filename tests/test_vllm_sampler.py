"""The vLLM sampler: our own logic on CPU, and vLLM against the transformers path on a GPU.

    python -m pytest tests/test_vllm_sampler.py -q -rs

The first half needs neither vLLM nor a GPU: converting vLLM outputs to a Rollout, seeds,
sampling parameters, change detection, weight names, exports, the install hint. The second
half (``needs_vllm_gpu``) builds real vLLM engines and skips, saying why, without vLLM or
CUDA; ``benchmarks/vllm_check.py`` runs it on a GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import vllm_check
from soar_env.config import make_config
from soar_env.models import EMBEDDED_DEFAULT, LMPolicy, LoraSettings, Rollout, build_tiny_model, load_model
from soar_env.models.vllm_sampler import (
    INSTALL_HINT,
    VLLMSampler,
    VLLMSettings,
    _check_adapter_folder,
    full_weights,
    hf_parameter_name,
    max_lora_rank,
    merged_lora_weights,
    request_seed,
    rollout_from_outputs,
    sampling_kwargs,
    sync_mode,
    trainable_fingerprint,
    vllm_loadable,
)
from soar_env.problems import Problem
from soar_env.prompts import student_prompt
from soar_env.student import Student, StudentConfig, build_student

QUESTIONS = [
    "What is 2 + 3?",
    "Find x if 3x + 4 = 19 and explain every step.",
    "Compute 7 * 8.",
    "What is 12 + 30?",
    "How many ways can 4 people sit in a row?",
    "Simplify \\sqrt{72}.",
]
GAP_TOL = 0.25
"""Largest logit gap at which a bfloat16 vLLM may pick another greedy token than the float32
policy. Measured on CPU (transformers float32 vs bfloat16): the first differing token had a
gap of 0.04-0.05 on the tiny model and on SmolLM2; a wrong weight or prompt shows up at gaps
of several nats."""


def tiny_policy_with(seed: int = 0, **kwargs) -> LMPolicy:
    model, tokenizer = build_tiny_model(seed=seed)
    return LMPolicy(model, tokenizer, **kwargs)


def prompts_for(policy: LMPolicy, count: int = 3) -> list[str]:
    return [policy.chat_prompt(student_prompt(q)) for q in QUESTIONS[:count]]


def outputs_for(rows: list[list[int]], prompts: list[list[int]] | None = None) -> list[SimpleNamespace]:
    """vLLM-shaped request outputs (``.prompt_token_ids``, ``.outputs[0].token_ids``) for given tokens."""
    return [
        SimpleNamespace(
            prompt_token_ids=None if prompts is None else prompts[k],
            outputs=[SimpleNamespace(token_ids=tuple(ids))],  # vLLM hands out tuples or arrays
        )
        for k, ids in enumerate(rows)
    ]


def first_stop_reference(tokenizer, ids: list[int], stop: str) -> list[int]:
    """Shortest prefix whose text holds ``stop``, by a plain scan (independent of LMPolicy.trim)."""
    for k in range(1, len(ids) + 1):
        if stop in tokenizer.decode(ids[:k], skip_special_tokens=True):
            return ids[:k]
    return ids


# ----------------------------------------------------------------------------------------------
# CPU: no vLLM needed


def test_building_without_vllm_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # what Python does when vllm is not installed
    policy = tiny_policy_with()
    with pytest.raises(ImportError, match=r"pip install 'soar-gym\[vllm\]'"):
        VLLMSampler(policy)
    assert INSTALL_HINT == "pip install 'soar-gym[vllm]'"


def test_env_setting_sampler_vllm_is_validated_and_builds_the_sampler(monkeypatch) -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_config("tiny", sampler="vllm", device="cpu")
    with pytest.raises(ValueError, match="sampler must be one of"):
        make_config("tiny", sampler="sglang")
    with pytest.raises(ValueError, match="vllm_lora_sync"):
        make_config("tiny", vllm_lora_sync="both")
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"pip install 'soar-gym\[vllm\]'"):  # the env's student asks for vLLM
        build_student(make_config("tiny", sampler="vllm"))
    assert build_student(make_config("tiny")).policy.sampler is None


def test_policy_sample_hands_over_to_its_sampler() -> None:
    policy = tiny_policy_with()
    prompts = prompts_for(policy)
    calls = []
    answer = Rollout(prompt_index=[], prompt_ids=[], completion_ids=[], texts=[], stopped=[])

    class Recorder:
        def sample(self, prompts, **kwargs):
            calls.append((list(prompts), kwargs))
            return answer

    policy.sampler = Recorder()
    got = policy.sample(prompts, num_samples=3, temperature=0.7, max_new_tokens=5, stop=["x"], seed=4, batch_size=8)
    assert got is answer
    assert calls == [(prompts, dict(num_samples=3, temperature=0.7, max_new_tokens=5, stop=["x"],
                                    greedy=False, seed=4, batch_size=8))]
    policy.sampler = None
    assert len(policy.sample(prompts, max_new_tokens=3, seed=0)) == 3  # the transformers path again


def test_request_seeds_are_deterministic_distinct_and_call_independent() -> None:
    grid = [[request_seed(7, i, j) for j in range(64)] for i in range(50)]
    flat = [s for row in grid for s in row]
    assert len(set(flat)) == len(flat)
    assert all(0 <= s < 2**63 for s in flat)
    assert grid == [[request_seed(7, i, j) for j in range(64)] for i in range(50)]
    # Seeds of one call do not reappear in the neighbouring calls (seed 6, 8) nor in seed 0.
    others = {request_seed(s, i, j) for s in (0, 6, 8) for i in range(50) for j in range(64)}
    assert not others & set(flat)
    assert request_seed(2**40 + 3, 0, 0) != request_seed(3, 0, 0)  # large seeds are not truncated


def test_sampling_kwargs_are_plain_ancestral_sampling() -> None:
    sampled = sampling_kwargs(temperature=0.7, greedy=False, max_new_tokens=9, stops=["</answer>"],
                              eos_token_ids=[2, 5], seed=123)
    assert sampled == {
        "n": 1, "temperature": 0.7, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
        "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "max_tokens": 9, "stop": ["</answer>"], "stop_token_ids": [2, 5], "seed": 123,
    }
    greedy = sampling_kwargs(temperature=0.7, greedy=True, max_new_tokens=9, stops=[], eos_token_ids=[2], seed=123)
    assert greedy["temperature"] == 0.0 and greedy["seed"] is None and greedy["stop"] is None


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_accepts_the_sampling_kwargs() -> None:
    from vllm import SamplingParams

    params = SamplingParams(**sampling_kwargs(temperature=1.0, greedy=False, max_new_tokens=4, stops=["x"],
                                              eos_token_ids=[2], seed=request_seed(1, 2, 3)))
    assert params.top_p == 1.0 and params.top_k in (-1, 0) and params.seed == request_seed(1, 2, 3)


def test_outputs_become_the_rollout_the_transformers_path_returns() -> None:
    """Fed the tokens the transformers path generated, the conversion rebuilds its Rollout exactly."""
    policy = tiny_policy_with()
    prompts = prompts_for(policy)
    free = policy.sample(prompts, num_samples=3, max_new_tokens=16, seed=2)
    stop = free.texts[0][2:4]  # a string that certainly occurs in the seed-2 samples
    for greedy in (False, True):
        expected = policy.sample(prompts, num_samples=3, max_new_tokens=16, seed=2, greedy=greedy, stop=[stop])
        if not greedy:
            assert stop in expected.texts[0] and expected.stopped[0]
        step = 3 if greedy else 1  # greedy: one request per prompt
        outputs = outputs_for(expected.completion_ids[::step], expected.prompt_ids[::step])
        got = rollout_from_outputs(outputs, [policy.encode(p) for p in prompts],
                                   num_samples=3, greedy=greedy, trim=lambda ids: policy.trim(ids, [stop]))
        assert got.prompt_index == expected.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert got.prompt_ids == expected.prompt_ids
        assert got.completion_ids == expected.completion_ids
        assert got.texts == expected.texts and got.stopped == expected.stopped
        assert got.prompt_ids[0] is got.prompt_ids[1] is got.prompt_ids[2]  # one list per prompt, as there
        assert got.completion_ids[0] is not got.completion_ids[1]  # greedy copies are separate lists


def test_outputs_are_cut_after_eos_or_the_first_stop_string() -> None:
    policy = tiny_policy_with()
    tokenizer = policy.tokenizer
    eos = tokenizer.eos_token_id
    body = tokenizer("so 12 + 30 = 42</answer> and 7 more", add_special_tokens=False)["input_ids"]
    rows = [
        body[:4] + [eos] + body[4:],  # eos first: kept, the rest dropped
        body,  # a stop string inside
        body[:3],  # neither: max_new_tokens cut it
    ]
    prompts = [[1, 5, 9], [1, 7]]
    got = rollout_from_outputs(outputs_for(rows[:2] + rows[2:] + rows[:1], None), prompts, num_samples=2,
                               greedy=False, trim=lambda ids: policy.trim(ids, ["</answer>"]))
    assert got.prompt_index == [0, 0, 1, 1] and got.prompt_ids == [prompts[0]] * 2 + [prompts[1]] * 2
    assert got.completion_ids[0] == body[:4] + [eos] and got.stopped[0]
    assert got.texts[0] == tokenizer.decode(body[:4], skip_special_tokens=True)
    cut = first_stop_reference(tokenizer, body, "</answer>")
    assert len(cut) < len(body) and got.completion_ids[1] == cut and got.stopped[1]
    assert got.texts[1].endswith("</answer>") and "more" not in got.texts[1]
    assert got.completion_ids[2] == body[:3] and not got.stopped[2]


def test_outputs_that_do_not_fit_the_requests_are_refused() -> None:
    policy = tiny_policy_with()
    trim = lambda ids: policy.trim(ids, [])  # noqa: E731
    with pytest.raises(RuntimeError, match="3 outputs for 4 requests"):
        rollout_from_outputs(outputs_for([[4]] * 3), [[1], [2]], num_samples=2, greedy=False, trim=trim)
    with pytest.raises(RuntimeError, match="out of order"):
        rollout_from_outputs(outputs_for([[4], [5]], [[2], [1]]), [[1], [2]], num_samples=3, greedy=True, trim=trim)


@pytest.mark.parametrize("lora", [LoraSettings(), None], ids=["lora", "full"])
def test_fingerprint_moves_with_every_write_and_only_then(lora) -> None:
    policy = tiny_policy_with(lora=lora)
    prompts = prompts_for(policy)
    start = trainable_fingerprint(policy.model)
    # Reading the policy (sampling with merged adapters, log-probs, snapshots) changes nothing.
    rollout = policy.sample(prompts, num_samples=2, max_new_tokens=4, seed=0)
    policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids)
    snapshot = policy.state_dict_trainable()
    assert trainable_fingerprint(policy.model) == start

    parameters = policy.trainable_parameters()

    def adamw(**options):
        def step() -> None:
            for p in parameters:
                p.grad = torch.full_like(p, 0.01)
            torch.optim.AdamW(parameters, lr=1e-3, **options).step()
        return step

    writes = {
        "AdamW": adamw(foreach=False),
        "AdamW foreach": adamw(foreach=True),
        "AdamW fused (no version bump)": adamw(fused=True),
        "load_state_dict_trainable": lambda: policy.load_state_dict_trainable(snapshot),
        ".data write": lambda: parameters[-1].data.add_(0.5),
    }
    for name, write in writes.items():
        before = trainable_fingerprint(policy.model)
        write()
        assert trainable_fingerprint(policy.model) != before, name


def test_merged_weights_carry_checkpoint_names_and_the_merged_values(tmp_path) -> None:
    policy = tiny_policy_with()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    plain, _ = build_tiny_model(seed=0)
    names = set(plain.state_dict())
    merged = dict(merged_lora_weights(policy.model))
    assert len(merged) == 2 * 7 and set(merged) <= names  # 7 projections in each of 2 layers
    policy.save_pretrained_full(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    for name, weight in merged.items():
        torch.testing.assert_close(weight, saved[name], rtol=0, atol=1e-6)
    assert hf_parameter_name("base_model.model.model.layers.1.mlp.up_proj.base_layer.weight") == (
        "model.layers.1.mlp.up_proj.weight"
    )
    full = tiny_policy_with(lora=None)
    assert {name for name, _ in full_weights(full.model)} <= names


def test_unmerged_export_is_the_base_model(tmp_path) -> None:
    policy = tiny_policy_with()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.2)
    policy.save_pretrained_full(tmp_path, merge_lora=False)
    model, _ = load_model(str(tmp_path))
    ids = torch.tensor([policy.encode(prompts_for(policy)[0])])
    with torch.no_grad(), policy.model.disable_adapter():
        base_logits = policy.model(input_ids=ids).logits
    with torch.no_grad():
        adapted_logits = policy.model(input_ids=ids).logits
        exported_logits = model(input_ids=ids).logits
    torch.testing.assert_close(exported_logits, base_logits)
    assert not torch.allclose(exported_logits, adapted_logits, atol=1e-3)  # the adapters matter here
    assert any("lora" in n for n, _ in policy.model.named_parameters())  # the policy keeps its adapters


def test_adapter_folder_holds_the_current_adapters(tmp_path) -> None:
    """What the adapter sync writes (peft's save_pretrained) is a folder vLLM reads, with today's tensors."""
    policy = tiny_policy_with()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1)
    policy.model.save_pretrained(str(tmp_path))
    _check_adapter_folder(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert set(config["target_modules"]) == set(LoraSettings().target_modules)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    current = {n.replace(".default", ""): p for n, p in policy.model.named_parameters() if p.requires_grad}
    assert set(saved) == set(current) and all(n.startswith("base_model.model.") for n in saved)
    assert all(torch.equal(saved[n], current[n]) for n in saved)


def test_bfloat16_lora_policy_samples_with_merged_adapters() -> None:
    """peft keeps adapters in float32 under a bfloat16 model; the merged weights must stay bfloat16."""
    model, tokenizer = build_tiny_model(seed=0)
    policy = LMPolicy(model.to(torch.bfloat16), tokenizer, lora=LoraSettings())
    rollout = policy.sample(prompts_for(policy), num_samples=2, max_new_tokens=5, seed=0)
    logprobs, mask = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids)
    assert len(rollout) == 6 and torch.isfinite(logprobs[mask]).all()


def test_settings_are_checked_before_any_engine_starts() -> None:
    lora_policy, full_policy = tiny_policy_with(), tiny_policy_with(lora=None)
    assert sync_mode(full_policy, VLLMSettings()) == "full"
    assert sync_mode(lora_policy, VLLMSettings()) == "adapter"
    assert sync_mode(lora_policy, VLLMSettings(lora_sync="merged", dtype="float32")) == "merged"
    with pytest.raises(ValueError, match="lora_sync='merged'"):
        sync_mode(lora_policy, VLLMSettings(dtype="float32"))
    with pytest.raises(ValueError, match="lora_sync must be one of"):
        sync_mode(lora_policy, VLLMSettings(lora_sync="fold"))
    assert [max_lora_rank(r) for r in (1, 8, 9, 16, 17, 300, 512)] == [8, 8, 16, 16, 32, 320, 512]
    with pytest.raises(ValueError, match="up to 512"):
        sync_mode(tiny_policy_with(lora=LoraSettings(r=600)), VLLMSettings())


def test_vllm_loads_folders_and_hub_ids_itself_and_gets_exports_otherwise(tmp_path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert vllm_loadable(str(tmp_path / "hf")) == str(tmp_path / "hf")
    assert vllm_loadable("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for name in (None, EMBEDDED_DEFAULT, "tiny", str(tmp_path), str(tmp_path / "model.gguf"), "./missing"):
        assert vllm_loadable(name) is None, name


def test_vllm_check_script_parses_its_options(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        vllm_check.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--runs" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# GPU: real vLLM engines against the transformers path


def _gpu_skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed ({INSTALL_HINT}); these checks run on a CUDA machine"
    if not torch.cuda.is_available():
        return "no CUDA device: the vLLM checks need a GPU"
    return None


GPU_SKIP = _gpu_skip_reason()
needs_vllm_gpu = pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
TEST_SETTINGS = dict(gpu_memory_utilization=0.15, enforce_eager=True, max_model_len=1024)
"""Small engines that start fast; each test class builds one and closes it."""


def vllm_tiny_policy(lora: LoraSettings | None) -> LMPolicy:
    """The tiny Llama with 64-wide attention heads (vLLM's kernels take no 16-wide ones), float32 on CUDA."""
    model, tokenizer = build_tiny_model(seed=0, hidden_size=128, heads=2, kv_heads=1, intermediate_size=256)
    return LMPolicy(model, tokenizer, lora=lora, device="cuda")


def logit_gap(policy: LMPolicy, prompt: list[int], prefix: list[int], preferred: int, other: int) -> float:
    """How much the policy's next-token logit of ``preferred`` exceeds that of ``other`` after prompt + prefix."""
    with torch.no_grad():
        logits = policy.model(input_ids=torch.tensor([prompt + prefix], device=policy.device)).logits[0, -1]
    return float(logits[preferred].float() - logits[other].float())


def assert_greedy_agrees(policy: LMPolicy, expected: Rollout, actual: Rollout, tol: float = GAP_TOL) -> float:
    """vLLM's greedy rows equal the policy's, except that a row may part from it at a near tie
    (logit gap below ``tol``), after which nothing more is compared. Returns the fraction of the
    policy's tokens that were matched."""
    assert actual.prompt_index == expected.prompt_index and actual.prompt_ids == expected.prompt_ids
    matched = 0
    for row, (a, b) in enumerate(zip(expected.completion_ids, actual.completion_ids)):
        if a == b:
            assert actual.texts[row] == expected.texts[row] and actual.stopped[row] == expected.stopped[row]
            matched += len(a)
            continue
        t = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), None)
        assert t is not None, f"row {row}: one completion is a prefix of the other, so trimming differs"
        gap = logit_gap(policy, expected.prompt_ids[row], a[:t], a[t], b[t])
        assert gap < tol, f"row {row} parts at token {t}: the policy prefers {a[t]} over vLLM's {b[t]} by {gap:.3f}"
        matched += t
    return matched / max(1, expected.num_tokens)


def train_towards(policy: LMPolicy, prompt_ids: list[int], target: list[int], *, steps: int, lr: float) -> None:
    """Make ``target`` the greedy reply to the prompt: AdamW on its negative log-likelihood."""
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        logprobs, mask = policy.token_logprobs([prompt_ids], [target])
        loss = -(logprobs * mask).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def check_sync_follows_training(policy: LMPolicy, sampler: VLLMSampler, lr: float) -> None:
    """After an update vLLM samples the trained weights, once per change; after a reset, the old ones."""
    prompt = policy.chat_prompt(student_prompt("What is 6 * 7?"))
    ids = policy.encode(prompt)
    target = policy.tokenizer("\\boxed{42}", add_special_tokens=False)["input_ids"] + [policy.tokenizer.eos_token_id]
    baseline = policy.state_dict_trainable()
    before = sampler.sample([prompt], max_new_tokens=12, greedy=True)
    assert before.completion_ids[0] != target
    syncs = sampler.syncs
    try:
        train_towards(policy, ids, target, steps=30, lr=lr)
        assert policy.sample([prompt], max_new_tokens=12, greedy=True).completion_ids[0] == target
        after = sampler.sample([prompt], max_new_tokens=12, greedy=True)
        assert sampler.syncs == syncs + 1
        assert after.completion_ids[0] == target and after.stopped[0] and after.texts[0] == "\\boxed{42}"
        sampler.sample([prompt], max_new_tokens=12, greedy=True)
        assert sampler.syncs == syncs + 1, "no change, no push"
        prompts = prompts_for(policy, 6)  # fresh prompts and the cached one, all with the new weights
        assert_greedy_agrees(policy, policy.sample(prompts + [prompt], max_new_tokens=24, greedy=True),
                             sampler.sample(prompts + [prompt], max_new_tokens=24, greedy=True))
    finally:
        policy.load_state_dict_trainable(baseline)
    restored = sampler.sample([prompt], max_new_tokens=12, greedy=True)
    assert sampler.syncs == syncs + 2
    assert_greedy_agrees(policy, policy.sample([prompt], max_new_tokens=12, greedy=True), restored)


@needs_vllm_gpu
class TestFullWeights:
    """A policy without LoRA: vLLM starts from an export of its weights and gets them pushed."""

    @pytest.fixture(scope="class")
    def full(self):
        policy = vllm_tiny_policy(lora=None)
        sampler = VLLMSampler(policy, VLLMSettings(**TEST_SETTINGS))
        yield policy, sampler
        sampler.close()

    def test_greedy_agrees_with_the_policy(self, full) -> None:
        policy, sampler = full
        prompts = prompts_for(policy, 6)
        for stop in (None, [" "]):
            expected = policy.sample(prompts, num_samples=2, max_new_tokens=32, greedy=True, stop=stop)
            actual = sampler.sample(prompts, num_samples=2, max_new_tokens=32, greedy=True, stop=stop)
            assert assert_greedy_agrees(policy, expected, actual) >= 0.25
        assert sampler.syncs == 0, "the exported weights are the policy's: nothing to push"

    def test_first_tokens_follow_the_policy_distribution(self, full) -> None:
        policy, sampler = full
        prompt = prompts_for(policy)[0]
        ids = policy.encode(prompt)
        with torch.no_grad():
            logits = policy.model(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1].float().cpu()
        draws = 4096
        for temperature in (1.0, 0.7):
            probs = torch.softmax(logits / temperature, -1).double()
            rollout = sampler.sample([prompt], num_samples=draws, temperature=temperature, max_new_tokens=1, seed=0)
            first = torch.tensor([c[0] for c in rollout.completion_ids])
            freq = torch.bincount(first, minlength=len(probs)).double() / draws
            # Exact sampling has TV = sum |freq - p| / 2 ~ its mean +- a small sd (a sum of many
            # independent terms); 0.02 allows for bfloat16 vs float32. A sampler at the wrong
            # temperature (0.7 vs 1) measured ~0.26 on this model, exact bfloat16 sampling 0.05-0.09.
            tv = 0.5 * float((freq - probs).abs().sum())
            var = probs * (1 - probs) / draws
            mean = 0.5 * float(torch.sqrt(2 * var / math.pi).sum())
            sd = 0.5 * math.sqrt((1 - 2 / math.pi) * float(var.sum()))
            assert tv < mean + 5 * sd + 0.02, f"T={temperature}: total variation {tv:.3f}, exact sampling ~{mean:.3f}"
            # The tail beyond the policy's 90% nucleus keeps its mass: no top-p/top-k cut.
            order = probs.argsort(descending=True)
            tail = order[probs[order].cumsum(0) > 0.9]
            p_tail, f_tail = float(probs[tail].sum()), float(freq[tail].sum())
            assert abs(f_tail - p_tail) < 4 * math.sqrt(p_tail * (1 - p_tail) / draws) + 0.02, (p_tail, f_tail)

    def test_seeded_calls_repeat_and_rows_differ(self, full) -> None:
        policy, sampler = full
        prompts = prompts_for(policy)
        sampler.sample(prompts, num_samples=4, max_new_tokens=16, seed=5)  # warm the prefix cache
        first = sampler.sample(prompts, num_samples=4, max_new_tokens=16, seed=5)
        second = sampler.sample(prompts, num_samples=4, max_new_tokens=16, seed=5)
        other = sampler.sample(prompts, num_samples=4, max_new_tokens=16, seed=6)
        assert first.completion_ids == second.completion_ids and first.texts == second.texts
        assert first.completion_ids != other.completion_ids
        assert len(set(map(tuple, first.completion_ids[:4]))) > 1
        assert first.prompt_index == [0] * 4 + [1] * 4 + [2] * 4

    def test_weights_follow_full_fine_tuning(self, full) -> None:
        policy, sampler = full
        check_sync_follows_training(policy, sampler, lr=1e-3)


@needs_vllm_gpu
class TestLoRA:
    """A LoRA policy, with adapters sent to vLLM ("adapter") or folded into its weights ("merged")."""

    @pytest.fixture(scope="class", params=["adapter", "merged"])
    def lora(self, request):
        policy = vllm_tiny_policy(lora=LoraSettings())
        sampler = VLLMSampler(policy, VLLMSettings(**TEST_SETTINGS, lora_sync=request.param))
        yield policy, sampler
        sampler.close()

    def test_weights_follow_lora_training(self, lora) -> None:
        policy, sampler = lora
        check_sync_follows_training(policy, sampler, lr=1e-2)

    def test_student_trains_with_the_sampler_attached(self, lora) -> None:
        policy, sampler = lora
        policy.sampler = sampler
        try:
            rollout = policy.sample(prompts_for(policy), num_samples=4, max_new_tokens=16, seed=0)
            assert rollout.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
            logprobs, mask = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids)
            assert int(mask.sum()) == rollout.num_tokens and torch.isfinite(logprobs[mask]).all()
            config = StudentConfig(steps=2, batch_size=2, group_size=4, max_new_tokens=16, lr=1e-2,
                                   require_box=False, skip_zero_advantage=False, grade_processes=1)
            problems = [Problem("What is 2 + 3?", "5"), Problem("What is 6 * 7?", "42")]
            result = Student(policy, config).train(problems)
            assert result.ok and result.steps_done == 2 and result.tokens > 0
        finally:
            policy.sampler = None


@needs_vllm_gpu
@pytest.mark.embedded
class TestEmbedded:
    """The embedded SmolLM2 (LoRA, adapters sent to vLLM): greedy replies agree with transformers."""

    def test_greedy_agrees_on_student_prompts(self) -> None:
        policy = LMPolicy.from_name(EMBEDDED_DEFAULT, device="cuda")
        with VLLMSampler(policy, VLLMSettings(**TEST_SETTINGS)) as sampler:
            prompts = prompts_for(policy, 6)
            expected = policy.sample(prompts, max_new_tokens=48, greedy=True)
            actual = sampler.sample(prompts, max_new_tokens=48, greedy=True)
            assert assert_greedy_agrees(policy, expected, actual) >= 0.5
            sampled = sampler.sample(prompts, num_samples=8, max_new_tokens=48, seed=0)
            assert len(sampled) == 48 and sampled.num_tokens > 0
