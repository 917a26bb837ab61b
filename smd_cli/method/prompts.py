"""Prompt weights in the syntax most shared prompts use, and prompts longer than CLIP's 77 tokens.

`parse` reads AUTOMATIC1111's attention syntax: `(word)` multiplies a span's weight by 1.1,
`[word]` divides it by 1.1, `(word:1.3)` sets it, brackets nest, and `\\(` is a literal bracket.
It is written here because compel, the library that turns weighted fragments into embeddings,
reads a syntax of its own (`(word)1.3`, `word+`) and nothing on PyPI parses this one; unlike the
original, an unclosed bracket or an unusable weight is an error, not a silent guess.

`WeightedEncoder` hands the fragments to compel's `EmbeddingsProvider`, which applies the weights
(scaling token states up, blending toward the prompt without the fragment for weights below 1)
and encodes long prompts in chunks of the tokenizer's length, each with its own start and end
token, joined side by side. A prompt that is plain and fits is never routed there, so it stays
exactly what diffusers' pipelines make of it.

Nothing here imports torch until a prompt is encoded, so scene validation stays instant.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

from smd_cli.core.errors import SmdError

UP = 1.1  # `(word)`
MAX_WEIGHT = 100.0
# Chunks of 75 tokens a prompt is read in, at most: the denoiser attends to every token of every
# chunk, so a prompt of a whole book would cost more than the picture; beyond, it is cut with a warning.
MAX_CHUNKS = 8
_TOKEN = re.compile(r"\\[()\[\]\\:]|\(|\)|\[|\]|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|[^\\()\[\]:]+|[\\:]")


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the text encoder's limit was cut."""


class PromptSyntaxError(SmdError, ValueError):
    """A weighted prompt that does not parse; the message says where and how to fix it."""


def parse(prompt: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) fragments, adjacent equal weights merged; a prompt with no
    syntax is one fragment of weight 1."""
    fragments: list[list] = []
    opened: list[tuple[str, int, int]] = []  # (bracket, first fragment index, character offset)
    for match in _TOKEN.finditer(prompt):
        token, number = match.group(0), match.group(1)
        if token in "([":
            opened.append((token, len(fragments), match.start()))
        elif number is not None or token == ")":
            if not opened or opened[-1][0] != "(":
                raise PromptSyntaxError(_unmatched(prompt, match.start(), ")"))
            weight = UP if number is None else float(number)
            if not 0.0 <= weight <= MAX_WEIGHT:
                raise PromptSyntaxError(f"weight {number} at character {match.start() + 1} is outside 0 to "
                                        f"{MAX_WEIGHT:g}")
            _scale(fragments, opened.pop()[1], weight)
        elif token == "]":
            if not opened or opened[-1][0] != "[":
                raise PromptSyntaxError(_unmatched(prompt, match.start(), "]"))
            _scale(fragments, opened.pop()[1], 1 / UP)
        else:
            fragments.append([token[1:] if token.startswith("\\") and len(token) == 2 else token, 1.0])
    if opened:
        bracket, _, where = opened[-1]
        closing = ")" if bracket == "(" else "]"
        raise PromptSyntaxError(f"'{bracket}' at character {where + 1} is never closed: add '{closing}', or write "
                                f"\\{bracket} for a literal bracket")
    merged: list[tuple[str, float]] = []
    for text, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        elif text:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def _scale(fragments: list[list], start: int, factor: float) -> None:
    for fragment in fragments[start:]:
        fragment[1] *= factor


def _unmatched(prompt: str, where: int, bracket: str) -> str:
    return (f"'{bracket}' at character {where + 1} closes nothing: remove it, or write \\{bracket} for a literal "
            "bracket")


def check(prompt: str) -> None:
    """Raise `PromptSyntaxError` where `parse` would."""
    parse(prompt)


def plain(prompt: str) -> str | None:
    """The prompt's text with escapes resolved when it asks for no weight but 1; else None."""
    fragments = parse(prompt)
    return "".join(text for text, _ in fragments) if all(weight == 1.0 for _, weight in fragments) else None


@contextmanager
def _quiet_import() -> Iterator[None]:
    """compel imports every diffusers pipeline it wraps; transformers then notes optional image
    backends on stderr, which says nothing about the user's prompt."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


class WeightedEncoder:
    """One tokenizer and text encoder through compel: weighted fragments to token states, long
    prompts in chunks. `penultimate` takes the layer before the last without the final norm, as
    SDXL's encoders are read; else the last, normalised, as SD 1.x reads its one. With `length`
    (T5, and CLIP beside it on SD3) a prompt is read in one sequence of that many tokens and cut
    beyond, as diffusers' pipelines read it, with a warning."""

    def __init__(self, tokenizer, text_encoder, *, penultimate: bool, device, length: int | None = None):
        with _quiet_import():
            from compel.embeddings_provider import EmbeddingsProvider, ReturnedEmbeddingsType

        kind = (ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED if penultimate
                else ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED)
        self.provider = EmbeddingsProvider(tokenizer, text_encoder, truncate=length is not None,
                                           returned_embeddings_type=kind, device=device, model_max_length=length,
                                           dtype_for_device_getter=lambda _: text_encoder.dtype)
        self.provider.disable_no_weights_bypass()
        self.chunk = length or tokenizer.model_max_length
        self.cut = length is not None

    def states(self, prompts: Sequence[str], chunks: int = 1):
        """Token states [N, n * chunk, D], every row padded with the empty prompt's chunk to the
        longest row, and to at least `chunks` chunks."""
        import torch

        rows = []
        for prompt in prompts:
            fragments = self._cut(parse(prompt)) if self.cut else self._within_limit(parse(prompt))
            rows.append(self.provider.get_embeddings_for_weighted_prompt_fragments(
                [[text for text, _ in fragments]], [[weight for _, weight in fragments]],
                device=self.provider.device))
        longest = max([chunks * self.chunk] + [row.shape[1] for row in rows])
        empty = self.empty.to(rows[0].dtype)
        return torch.cat([torch.cat([row] + [empty] * ((longest - row.shape[1]) // self.chunk), dim=1)
                          for row in rows])

    def _cut(self, fragments: list[tuple[str, float]]) -> list[tuple[str, float]]:
        """The fragments as they are, with a warning naming what the one sequence cannot hold."""
        tokenizer, room = self.provider.tokenizer, self.chunk - len(self.provider.bos_sequence) - 1
        ids = [i for text, _ in fragments for i in tokenizer(text, add_special_tokens=False).input_ids]
        if len(ids) > room:
            warnings.warn(f"prompt longer than the text encoder's {self.chunk} tokens; cut: "
                          f"{tokenizer.decode(ids[room:])[:200]!r}", PromptTruncatedWarning, stacklevel=6)
        return fragments

    def _within_limit(self, fragments: list[tuple[str, float]]) -> list[tuple[str, float]]:
        """The fragments cut after `MAX_CHUNKS` chunks' worth of tokens, with a warning naming the cut."""
        budget, kept = MAX_CHUNKS * (self.chunk - 2), []
        tokenizer = self.provider.tokenizer
        for i, (text, weight) in enumerate(fragments):
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) <= budget:
                kept.append((text, weight))
                budget -= len(ids)
                continue
            if budget:
                kept.append((tokenizer.decode(ids[:budget]), weight))
            cut = tokenizer.decode(ids[budget:]) + "".join(rest for rest, _ in fragments[i + 1:])
            warnings.warn(f"prompt longer than {MAX_CHUNKS} chunks of {self.chunk - 2} tokens; cut: {cut[:200]!r}"
                          + ("..." if len(cut) > 200 else ""), PromptTruncatedWarning, stacklevel=6)
            break
        return kept or [("", 1.0)]

    @property
    def empty(self):
        """The empty prompt's token states, one chunk [1, chunk, D]: what pads a row to a longer one."""
        return self.provider.empty_z

    def pooled(self, prompts: Sequence[str]):
        """The encoder's pooled (projected) output of each prompt's first chunk, weights set aside:
        it is one vector, read at the end token, which weights cannot address."""
        plain = ["".join(text for text, _ in parse(prompt)) for prompt in prompts]
        return self.provider.get_pooled_embeddings(plain, device=self.provider.device)
