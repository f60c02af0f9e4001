"""A tiny, randomly initialised Llama model with a locally trained tokenizer.

Tests and smoke runs need a causal LM that behaves like the real ones (same architecture
family, a chat template, special tokens, LoRA target modules) but builds in milliseconds,
offline and deterministically. Its weights are random, so what it writes is noise; the point
is that every code path (sampling, log-probs, LoRA, saving) runs exactly as for a real model.

    >>> from soar_env.models.tiny import build_tiny_model
    >>> model, tokenizer = build_tiny_model(seed=0)
    >>> tokenizer.decode(tokenizer("What is 2 + 3?")["input_ids"])
    'What is 2 + 3?'
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
"""Ids 0, 1, 2 in this order. The chat markers double as bos/eos, as in SmolLM2."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, the format of SmolLM2, so prompts of the tiny model look like the embedded one's."""

_CORPUS = (
    "Solve the following math problem step by step. Put your final answer in \\boxed{}.",
    "What is 2 + 3? The answer is \\boxed{5}.",
    "What is 12 + 30? 12 + 30 = 42, so the answer is \\boxed{42}.",
    "Compute 7 * 8 - 6 / 2. First 7 * 8 = 56 and 6 / 2 = 3, so 56 - 3 = \\boxed{53}.",
    "Find x if 3x + 4 = 19. Subtract 4: 3x = 15, divide by 3: x = \\boxed{5}.",
    "If a = 1, b = -2 and c = 0.5, then a^2 + b^2 + c^2 = 5.25.",
    "The sum of the angles of a triangle is 180 degrees.",
    "How many ways can 4 people sit in a row? 4! = 24, the answer is \\boxed{24}.",
    "Let f(x) = x^2 - 9. Then f(3) = 0 and f(-4) = 7. Solve (x - 1)(x + 2) = 0.",
    "A number is prime if it has exactly two divisors: 2, 3, 5, 7, 11, 13, 17, 19.",
    "The probability of rolling a 6 with a fair die is \\frac{1}{6}.",
    "Write one new, original math problem that needs a few steps of reasoning, "
    "and give its final answer.",
    "<question>What is the remainder when 100 is divided by 7?</question>\n"
    "<answer>\\boxed{2}</answer>",
    "<question>Simplify \\sqrt{72}.</question>\n<answer>\\boxed{6\\sqrt{2}}</answer>",
    "<question>A rectangle has sides 4 and 9. What is its area?</question>\n"
    "<answer>\\boxed{36}</answer>",
    "You are a helpful assistant. user assistant system",
    "0123456789 10 20 30 40 50 60 70 80 90 100 1000 [1, 2] {3} (4) |5| %",
    "Therefore, the final answer is \\boxed{0}. We have shown that x > y and y < z.",
)
"""A few lines of math text: the BPE merges learn digits, operators, ``\\boxed{}`` and tags."""


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the built-in corpus: any text encodes, no file is read.

    Byte-level means every string round-trips through encode/decode, which the stop-string
    and decoding code relies on. Training is deterministic and takes milliseconds.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    seed: int = 0,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.2,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random Llama (grouped-query attention, tied embeddings, like SmolLM2) and its tokenizer.

    The weights depend only on ``seed``; the global torch RNG is left as it was. The large
    ``initializer_range`` makes the next-token distribution far from uniform, so greedy decoding
    and sampling give visibly different, seed-dependent texts.
    """
    tokenizer = build_tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.eval()
    return model, tokenizer


def perturbed_state(policy: Any, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """``policy``'s trainable state plus ``scale`` x N(0, 1) noise from a generator seeded ``seed``.

    For tests: peft starts every LoRA B at zero, so adapters add nothing and A gets no gradient
    until B moves; a perturbed state makes runs, adapters and references tell apart.
    """
    generator = torch.Generator().manual_seed(seed)
    return {name: tensor + scale * torch.randn(tensor.shape, generator=generator)
            for name, tensor in policy.state_dict_trainable().items()}
