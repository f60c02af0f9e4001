"""The fail@K hard-set builder: what it keeps, what it writes, and that it resumes."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass

import pytest
import torch

from soar_env.cli import main as soar_main
from soar_env.config import make_config
from soar_env.data.hardset import HardSetConfig, build_hardset, hard_splits, load_hardset
from soar_env.data.loaders import load_problems

POOL = "generator:addition@1#12%3"


@dataclass
class ScriptedRollout:
    prompt_index: list[int]
    texts: list[str]


class ScriptedPolicy:
    """Answers correctly exactly for the questions in ``solvable``; counts samples drawn."""

    def __init__(self, solvable: dict[str, str]):
        self.solvable = solvable
        self.samples_drawn = 0

    def chat_prompt(self, user: str, *, reply_prefix: str = "") -> str:
        return user

    def sample(self, prompts, *, num_samples=1, **kwargs):
        texts, index = [], []
        for i, prompt in enumerate(prompts):
            answer = next((a for q, a in self.solvable.items() if q in prompt), None)
            for _ in range(num_samples):
                texts.append(f"\\boxed{{{answer}}}" if answer is not None else "I do not know.")
                index.append(i)
        self.samples_drawn += len(texts)
        return ScriptedRollout(index, texts)


def test_keeps_only_problems_failed_k_of_k_and_splits_them(tmp_path):
    pool = load_problems(POOL)
    solvable = {p.question: p.answer for p in pool[:4]}
    out = tmp_path / "hard.jsonl"
    config = HardSetConfig(source=POOL, out=str(out), k=6, chunk=3, train_fraction=0.5, seed=1)
    result = build_hardset(config, policy=ScriptedPolicy(solvable), progress=False)

    assert (result.pool, result.kept, result.train, result.test) == (12, 8, 4, 4)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["question"] for r in rows} == {p.question for p in pool[4:]}
    assert all(r["meta"]["correct"] == 0 and r["meta"]["samples"] == 6 for r in rows)
    assert sorted(r["meta"]["split"] for r in rows) == ["test"] * 4 + ["train"] * 4
    meta = json.loads((tmp_path / "hard.jsonl.meta.json").read_text())
    assert meta["settings"]["k"] == 6 and meta["settings"]["source"] == POOL
    # Solved problems stop at their first chunk: 4 x 3 samples, the 8 hard ones 6 each.
    assert meta["pool_samples"] == 4 * 3 + 8 * 6
    assert len(load_hardset(str(out), split="train")) == 4
    assert len(load_hardset(str(out), split=None)) == 8


def test_resumes_without_resampling_finished_problems(tmp_path):
    out = tmp_path / "hard.jsonl"
    config = HardSetConfig(source=POOL, out=str(out), k=4, chunk=4, batch_size=8)  # slices of 2 problems
    first = ScriptedPolicy({})
    build_hardset(HardSetConfig(**{**config.__dict__, "limit": 6}), policy=first, progress=False)
    assert first.samples_drawn == 6 * 4

    # A kill mid-write leaves a cut line: that problem is redone, the rest are kept.
    partial = tmp_path / "hard.jsonl.partial.jsonl"
    with partial.open("a") as handle:
        handle.write('{"id": "cut sh')
    second = ScriptedPolicy({})
    result = build_hardset(config, policy=second, progress=False)
    assert second.samples_drawn == 6 * 4
    assert result.kept == 12


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "hard.jsonl"
    build_hardset(HardSetConfig(source=POOL, out=str(out), k=2, limit=2), policy=ScriptedPolicy({}), progress=False)
    with pytest.raises(ValueError, match="other settings"):
        build_hardset(HardSetConfig(source=POOL, out=str(out), k=3, limit=2), policy=ScriptedPolicy({}),
                      progress=False)


def test_builds_with_the_tiny_model_through_the_cli(tmp_path, capsys):
    out = tmp_path / "tiny_hard.jsonl"
    code = soar_main(["hardset", "--model", "tiny", "--source", "generator:multiplication@3#4", "--k", "2",
                      "--max-new-tokens", "4", "--no-require-box", "--out", str(out)])
    assert code == 0
    assert "kept 4/4" in capsys.readouterr().out  # a random tiny model solves nothing
    assert len(out.read_text().splitlines()) == 4


def test_bad_values_fail_before_loading_a_model(tmp_path, capsys):
    assert soar_main(["hardset", "--source", POOL, "--k", "0", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "k must be >= 1" in capsys.readouterr().err


def test_bundled_hardset_is_shipped_and_split():
    train, test = load_hardset("bundled", "train"), load_hardset("bundled", "test")
    assert len(train) >= 20 and len(test) >= 20
    assert not {p.id for p in train} & {p.id for p in test}
    assert all(p.meta["correct"] == 0 for p in train + test)


@pytest.mark.parametrize("name", ["bundled-fail32", "bundled-edge"])
def test_the_fail32_sets_are_shipped_larger_and_stricter_and_the_old_one_stays(name):
    """Issue 17: >= 150 train and >= 150 test problems, every one wrong in 32 of 32 samples, its
    settings recorded; "bundled" still names the old fail@16 set, so old studies reproduce."""
    from soar_env.data.hardset import BUNDLED_HARDSETS, bundled_hardset_path

    train, test = hard_splits(make_config("cpu", hardset=name))
    assert len(train) >= 150 and len(test) >= 150
    assert not {p.question for p in train} & {p.question for p in test}
    assert all(p.meta["correct"] == 0 and p.meta["samples"] == 32 for p in train + test)
    meta = json.loads(bundled_hardset_path(name).with_name(BUNDLED_HARDSETS[name] + ".meta.json").read_text())
    assert meta["settings"]["k"] == 32 and meta["settings"]["max_new_tokens"] == 48
    old_train = load_hardset("bundled", "train")
    assert len(old_train) == 39 and bundled_hardset_path().name == "hardset_smollm2.jsonl"


def test_the_edge_set_holds_only_the_families_the_student_can_learn():
    """The cpu preset's hard set: addition, subtraction and multiplication at difficulty 2-3 only,
    so the hardset_families slice of the fail@32 set studied in benchmarks/README.md section 8
    is what every problem of it is."""
    problems = load_hardset("bundled-edge", split=None)
    kinds = {(p.source, p.meta["difficulty"]) for p in problems}
    assert kinds == {(f"generator:{family}", d) for family in ("addition", "subtraction", "multiplication")
                     for d in (2, 3)}


# -- where it runs: device, dtype, sampler ----------------------------------------------------------

VLLM_MISSING = importlib.util.find_spec("vllm") is None


class FakeFromName:
    """Stands in for `LMPolicy.from_name`: records where the model would load, returns a scripted policy."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, name, **kwargs):
        self.calls.append({"name": name, **kwargs})
        return ScriptedPolicy({})


@pytest.fixture
def fake_from_name(monkeypatch):
    from soar_env.models.policy import LMPolicy

    fake = FakeFromName()
    monkeypatch.setattr(LMPolicy, "from_name", fake)
    return fake


@pytest.mark.parametrize("gpu, device, dtype", [(True, "cuda", torch.bfloat16), (False, "cpu", torch.float32)])
def test_auto_device_takes_the_gpu_when_there_is_one(tmp_path, monkeypatch, fake_from_name, gpu, device, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    out = tmp_path / "hard.jsonl"
    build_hardset(HardSetConfig(source=POOL, out=str(out), k=2, limit=3), progress=False)
    assert [(c["device"], c["dtype"], c["lora"]) for c in fake_from_name.calls] == [(device, dtype, None)]
    meta = json.loads((tmp_path / "hard.jsonl.meta.json").read_text())
    assert meta["runtime"] == {"device": device, "dtype": str(dtype).split(".")[1], "sampler": "transformers"}


def test_cpu_builds_sample_exactly_as_before(one_thread):
    """On the CPU the resolved model is the one the builder always loaded: same weights, same samples."""
    from soar_env.data.hardset import load_policy, resolve_runtime
    from soar_env.models.policy import LMPolicy

    config = HardSetConfig(source=POOL, out="unused.jsonl", model="tiny", device="cpu")
    runtime = resolve_runtime(config)
    assert runtime == {"device": "cpu", "dtype": "float32", "sampler": "transformers"}
    new, old = load_policy(config, runtime), LMPolicy.from_name("tiny", lora=None)
    prompts = [new.chat_prompt("What is 2 + 3?"), new.chat_prompt("What is 7 * 6?")]
    first = new.sample(prompts, num_samples=3, temperature=1.0, max_new_tokens=6, seed=11)
    second = old.sample(prompts, num_samples=3, temperature=1.0, max_new_tokens=6, seed=11)
    assert first.texts == second.texts and first.prompt_index == second.prompt_index


@pytest.mark.skipif(not VLLM_MISSING, reason="vLLM is installed here")
def test_vllm_without_the_extra_is_a_clear_error_before_any_model_loads(tmp_path, capsys, fake_from_name):
    code = soar_main(["hardset", "--source", POOL, "--out", str(tmp_path / "x.jsonl"), "--sampler", "vllm",
                      "--device", "cuda"])
    assert code == 2
    assert "soar-gym[vllm]" in capsys.readouterr().err
    assert fake_from_name.calls == []
    with pytest.raises(ImportError, match=r"soar-gym\[vllm\]"):
        build_hardset(HardSetConfig(source=POOL, out=str(tmp_path / "y.jsonl"), sampler="vllm", device="cuda"),
                      progress=False)


def test_vllm_needs_a_gpu(tmp_path, monkeypatch, fake_from_name):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        HardSetConfig(source=POOL, out="x.jsonl", sampler="vllm", device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="resolved to 'cpu'"):
        build_hardset(HardSetConfig(source=POOL, out=str(tmp_path / "x.jsonl"), sampler="vllm"), progress=False)
    assert fake_from_name.calls == []


def test_vllm_sampler_is_attached_like_the_env_student_does(tmp_path, monkeypatch, fake_from_name):
    import soar_env.models.vllm_sampler as vllm_sampler

    attached = []

    class FakeVLLMSampler:
        def __init__(self, policy, settings):
            attached.append(settings)

    monkeypatch.setattr(vllm_sampler, "import_vllm", lambda: None)
    monkeypatch.setattr(vllm_sampler, "VLLMSampler", FakeVLLMSampler)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = HardSetConfig(source=POOL, out=str(tmp_path / "x.jsonl"), k=2, limit=2, sampler="vllm",
                           vllm_gpu_memory_utilization=0.5)
    build_hardset(config, progress=False)
    assert [(s.dtype, s.gpu_memory_utilization) for s in attached] == [("bfloat16", 0.5)]


def test_train_gets_the_fraction_rounded_down(tmp_path):
    out = tmp_path / "hard.jsonl"
    result = build_hardset(HardSetConfig(source=POOL, out=str(out), k=2, limit=7), policy=ScriptedPolicy({}),
                           progress=False)
    assert (result.train, result.test) == (3, 4)
