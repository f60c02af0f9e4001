"""Constrained decoding: a token filter that keeps each sampled row inside a small grammar.

    vocabulary = Vocabulary.from_tokenizer(policy.tokenizer)
    answer = TokenFilter(vocabulary, AnswerGrammar(), eos_token_ids=policy.eos_token_ids)
    rollout = policy.sample([prompt + "\\\\boxed{"], token_filter=answer, max_new_tokens=12)
    logprobs, mask = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids,
                                           token_filters=[answer] * len(rollout.completion_ids))

A small teacher asked for ``\\boxed{...}`` writes "result" or "the endmarkruction" as often as a
number. A :class:`TokenFilter` lets a sampler draw each token only from those that keep the row's
text a prefix of the grammar's language: the sampler masks the other logits to -inf, so the row
is drawn from the renormalised masked distribution, and an update that scores the same tokens
under the same masks (``token_filters`` of ``LMPolicy.token_logprobs``) stays on-policy.

How a step stays cheap: every token's text is decoded once per tokenizer (:class:`Vocabulary`);
only tokens made of the grammar's alphabet are candidates (1,621 of SmolLM2's 49,152 for the
answer grammar), grouped by first character so a dead first character rules out its group at
once; the allowed set depends only on the grammar state of the row's text, so it is computed
once per state and then looked up. Deterministic: the same generated text gives the same set.

A row whose text has no allowed continuation (a dead state, or a grammar the vocabulary cannot
continue) may only end: its allowed set is the eos tokens, so no mask is ever empty and the row
ends as an unfinished text that the caller records as a rejection.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from typing import Any

import regex
import torch
from torch import Tensor

State = Hashable
"""A grammar's summary of a text: everything that decides which text may follow."""

_CONTROL = regex.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""Control characters other than tab and line break: the problem parser rejects a text holding one."""

_PROBE = "\\frac{12}{5}}</answer> What is 3 + 4?\n"
"""A text whose tokens must decode one by one to it, or token texts cannot be trusted."""


class Vocabulary:
    """Each token's text, decoded once per tokenizer; what the filters check candidates against."""

    def __init__(self, tokenizer: Any, texts: list[str], special_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.texts = texts
        """``texts[i]``: the text token i adds after another token (leading spaces kept)."""
        self.special_ids = special_ids

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> Vocabulary:
        """Decode every token; a tokenizer without a vocabulary, or whose tokens do not decode one
        by one to its text, fails here with a clear error (not in the middle of a run)."""
        get_vocab = getattr(tokenizer, "get_vocab", None)
        decode = getattr(tokenizer, "batch_decode", None)
        if not callable(get_vocab) or not callable(decode) or not get_vocab():
            raise ValueError(f"constrained decoding needs a tokenizer with a vocabulary (get_vocab, batch_decode); "
                             f"{type(tokenizer).__name__} has none")
        size = max(len(tokenizer), max(get_vocab().values()) + 1)
        # Each token decoded after an anchor token: SentencePiece tokenizers drop a token's
        # leading space when it is decoded alone, but not in the middle of a text.
        anchor = list(tokenizer("0", add_special_tokens=False)["input_ids"])[:1]
        if not anchor:
            raise ValueError(f"{type(tokenizer).__name__} cannot encode the text '0'; constrained decoding needs a "
                             "tokenizer that encodes digits")
        head = tokenizer.decode(anchor)
        texts = [text[len(head):] if text.startswith(head) else text
                 for text in decode([anchor + [i] for i in range(size)], skip_special_tokens=True)]
        special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
        vocabulary = cls(tokenizer, texts, special)
        ids = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
        if not tokenizer.decode(ids).endswith("".join(texts[i] for i in ids[1:])):
            raise ValueError(f"the tokens of {type(tokenizer).__name__} do not decode one by one to its text, so "
                             "constrained decoding cannot tell which tokens keep a grammar")
        return vocabulary

    def __len__(self) -> int:
        return len(self.texts)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of generated ids, as the sampler's stop strings and the parser see it."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True)) if ids else ""


class Grammar(ABC):
    """A prefix-closed language over characters: once a text is dead, every extension is dead."""

    alphabet: frozenset[str] | None = None
    """Characters any text of the language uses; None: any character (every token is a candidate)."""

    @property
    @abstractmethod
    def start(self) -> State:
        """The state of the empty text."""

    @abstractmethod
    def advance(self, state: State, piece: str) -> State | None:
        """The state after ``piece`` follows a text in ``state``; None when no text of the language starts so."""

    @abstractmethod
    def can_end(self, state: State) -> bool:
        """Whether a text in ``state`` may end here (the eos tokens are allowed)."""


# ---------------------------------------------------------------------------------------------
# The answer field: the forms of the target benchmark's answers

_INT = r"(?:0|[1-9][0-9]{0,9})"
_NONZERO = r"[1-9][0-9]{0,9}"
_DECIMAL = _INT + r"(?:\.[0-9]{1,6})?"
_IRRATIONAL = r"(?:\\pi|\\sqrt\{" + _NONZERO + r"\})"
_ATOM = r"(?:" + _DECIMAL + r"|(?:" + _NONZERO + r")?" + _IRRATIONAL + r")"  # 12, 0.5, \pi, 3\pi, 2\sqrt{3}
_POWER = _INT + r"\^(?:[0-9]|\{-?" + _INT + r"\})"  # 2^5, 2^{10}, 10^{-3}
_FRACTION = r"\\frac\{-?" + _ATOM + r"\}\{" + _ATOM + r"\}"  # \frac{3}{4}, \frac{\sqrt{3}}{2}
_SLASH = _INT + r"/" + _NONZERO  # 27/140
ANSWER_PATTERN = r"-?(?:" + "|".join((_ATOM, _POWER, _FRACTION, _SLASH)) + r")"
"""What may stand in the box: integers, decimals, a/b, \\frac{a}{b}, \\sqrt{n}, \\pi and their
multiples, a^b, each optionally negative (the bundled hard set's answers are integers and a/b)."""


class PatternGrammar(Grammar):
    """Texts that are prefixes of a regular expression's matches; one may end once it matches whole.

    The state is the text itself, so keep it to short fields (an answer, a one-line question).
    ``alphabet``: every character a match can hold (None: any), which bounds the candidates.
    """

    def __init__(self, pattern: str, alphabet: str | None = None) -> None:
        self.pattern = regex.compile(pattern)
        self.alphabet = None if alphabet is None else frozenset(alphabet)

    @property
    def start(self) -> State:
        return ""

    def advance(self, state: State, piece: str) -> State | None:
        text = str(state) + piece
        return text if self.pattern.fullmatch(text, partial=True) is not None else None

    def can_end(self, state: State) -> bool:
        return self.pattern.fullmatch(str(state)) is not None


class AnswerGrammar(PatternGrammar):
    """The text after a forced ``\\boxed{``: an answer of :data:`ANSWER_PATTERN`, ``}``, then the end tag or eos."""

    def __init__(self, pattern: str = ANSWER_PATTERN, end_tag: str = "</answer>") -> None:
        super().__init__(f"(?:{pattern})\\}}(?:{regex.escape(end_tag)})?",
                         "0123456789-./^{}\\" + "fracsqrtpi" + end_tag)


def question_form_grammar(pattern: str, alphabet: str, *, newline_ends: bool = False,
                          close_tag: str = "</question>") -> PatternGrammar:
    """The text after a forced ``<question>`` when the question must match ``pattern`` (a form of
    `soar_env.prompts.QUESTION_FORMS`): the form, then the closing tag (or a line break, with
    ``newline_ends``), or eos."""
    ends = [regex.escape(close_tag)] + (["\n"] if newline_ends else [])
    return PatternGrammar(f"(?:{pattern})(?:{'|'.join(ends)})?", alphabet + close_tag + ("\n" if newline_ends else ""))


# ---------------------------------------------------------------------------------------------
# The question field: free text that opens no tag


class QuestionGrammar(Grammar):
    """The text after a forced ``<question>``: anything that opens no other tag, and is not empty.

    No control characters (other than tab and line break). A ``<`` followed by a letter or ``/``
    must begin ``</question>`` (which ends the question); ``<`` before anything else is a
    less-than sign. The question may not end (eos, the closing tag, or a line break when
    ``newline_ends``) before it holds a non-space character. The state is (has content, the
    unfinished tag after a ``<``, ended): a handful of states in all.
    """

    def __init__(self, *, newline_ends: bool = False, close_tag: str = "</question>") -> None:
        self.newline_ends = newline_ends
        self.close_tag = close_tag

    @property
    def start(self) -> State:
        return (False, "", False)

    def advance(self, state: State, piece: str) -> State | None:
        content, pending, ended = state  # type: ignore[misc]
        if ended:
            return state  # the sampler stops the row at the token that ended it
        if _CONTROL.search(piece):
            return None
        if not pending and "<" not in piece and not (self.newline_ends and "\n" in piece):
            return (content or bool(piece.strip()), "", False)  # the common case, without a loop
        for ch in piece:
            if ended:
                break
            if pending:
                candidate = pending + ch
                if self.close_tag.startswith(candidate):
                    if candidate == self.close_tag:
                        if not content:
                            return None
                        pending, ended = "", True
                    else:
                        pending = candidate
                    continue
                if pending != "<" or ch.isalpha() or ch == "/":
                    return None  # another tag, or a closing tag that is not the question's
                pending, content = "", True  # "<" was a less-than sign
            if ch == "<":
                pending = "<"
            elif ch == "\n" and self.newline_ends:
                if not content:
                    return None
                ended = True
            elif not ch.isspace():
                content = True
        return (content, pending, ended)

    def can_end(self, state: State) -> bool:
        content, pending, _ = state  # type: ignore[misc]
        return bool(content) and not pending


# ---------------------------------------------------------------------------------------------
# The filter


class TokenFilter:
    """Which tokens may follow a row's generated ids under ``grammar`` (see the module doc).

    ``allowed(generated)`` is a sorted id tensor; ``mask(rows, width)`` a (B, width) bool mask
    for a batch of rows (ids past the vocabulary, e.g. a padded output head, never allowed).
    """

    def __init__(self, vocabulary: Vocabulary, grammar: Grammar, *, eos_token_ids: Sequence[int],
                 cache_size: int = 4096) -> None:
        if not eos_token_ids:
            raise ValueError("a token filter needs the eos token ids: a row must always be able to end")
        self.vocabulary = vocabulary
        self.grammar = grammar
        self.eos = torch.tensor(sorted({int(t) for t in eos_token_ids}), dtype=torch.long)
        alphabet = grammar.alphabet
        groups: dict[str, list[int]] = {}
        for i, text in enumerate(vocabulary.texts):
            if text and i not in vocabulary.special_ids and (alphabet is None or set(text) <= alphabet):
                groups.setdefault(text[0], []).append(i)
        self._groups = groups
        """Candidate ids by first character."""
        self._cache: dict[State | None, Tensor] = {}
        self._cache_size = cache_size
        self._states: dict[tuple[int, ...], tuple[str, State | None]] = {}
        """Text and state of recently seen rows, so a row one token longer advances from its prefix."""

    def state(self, generated: Sequence[int]) -> State | None:
        """The grammar state of a row's generated ids (None: dead).

        A row one token longer than a row seen before extends that row's text by the last token's
        text and advances its state by it alone, so a sampled row costs O(T), not a decode and a
        grammar pass over the whole text at each of its T tokens. Where appending is not what the
        tokenizer's decode gives (a special token, a piece of a multi-byte character, shown as
        U+FFFD) the whole row is decoded, so the text is always the one the parser sees.
        """
        key = tuple(int(t) for t in generated)
        known = self._states.get(key)
        if known is not None:
            return known[1]
        shorter = self._states.get(key[:-1]) if key else None
        piece = self.vocabulary.texts[key[-1]] if key and key[-1] < len(self.vocabulary.texts) else ""
        if (shorter is not None and piece and "\ufffd" not in piece and not shorter[0].endswith("\ufffd")
                and key[-1] not in self.vocabulary.special_ids):
            text = shorter[0] + piece
            state = None if shorter[1] is None else self.grammar.advance(shorter[1], piece)
        else:
            text = self.vocabulary.decode(key)
            state = self.grammar.advance(self.grammar.start, text)
        if len(self._states) >= self._cache_size:
            self._states.clear()
        self._states[key] = (text, state)
        return state

    def allowed(self, generated: Sequence[int]) -> Tensor:
        """Sorted ids that may follow ``generated`` (never empty: eos at least when nothing else fits)."""
        state = self.state(generated)
        found = self._cache.get(state)
        if found is None:
            found = self._compute(state)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[state] = found
        return found

    def _compute(self, state: State | None) -> Tensor:
        if state is None:
            return self.eos
        grammar, texts = self.grammar, self.vocabulary.texts
        ids = [i for first, group in self._groups.items() if grammar.advance(state, first) is not None
               for i in group if grammar.advance(state, texts[i]) is not None]
        if grammar.can_end(state):
            ids.extend(self.eos.tolist())
        if not ids:
            return self.eos
        return torch.tensor(sorted(set(ids)), dtype=torch.long)

    def mask(self, rows: Sequence[Sequence[int]], width: int, device: torch.device | str = "cpu") -> Tensor:
        """(B, width) bool: True where a token may follow row b's generated ids."""
        out = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, generated in enumerate(rows):
            ids = self.allowed(generated)
            out[b, ids[ids < width]] = True
        return out.to(device)

    def prefix_mask(self, completion: Sequence[int], width: int, device: torch.device | str = "cpu") -> Tensor:
        """(T, width) bool: the mask each token of a sampled completion was drawn under."""
        return self.mask([completion[:t] for t in range(len(completion))], width, device)


def position_masks(completion_ids: Sequence[Sequence[int]], token_filters: Sequence[TokenFilter | None], width: int,
                   device: torch.device | str = "cpu") -> Tensor:
    """(N, width) bool over the N tokens of ``completion_ids``, row by row: what each was drawn from.

    A row without a filter (None) was drawn from every token.
    """
    rows = [f.prefix_mask(c, width) if f is not None else torch.ones(len(c), width, dtype=torch.bool)
            for c, f in zip(completion_ids, token_filters) if len(c)]
    return torch.cat(rows, 0).to(device) if rows else torch.zeros(0, width, dtype=torch.bool, device=device)
