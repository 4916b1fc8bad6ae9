"""Prompt generation for the image pipeline: deterministic, pluggable.

A *prompt source* is anything with a ``prompts() -> list[str]`` method (:class:`PromptSource`).
Three are provided:

- :class:`TemplatePrompts` — templates × subjects × styles, sampled without repetition by a
  seeded RNG: the same seed and lists always give the same prompts in the same order (which is
  what makes a rerun reconnect to the tasks already paid for instead of paying again).
- :class:`ListPrompts` — your own list (the first ``count`` entries).
- :class:`CallablePrompts` — any ``fn(count, seed) -> Sequence[str]``, e.g. a call to an LLM.
  Make it deterministic for a given seed (cache its answer) or pass an explicit ``run_key`` to the
  pipeline: different prompts are different paid work.

:func:`as_prompt_source` turns a list, a callable, a source or an import path
(``"package.module:attribute"``, handy as a deployment parameter) into a source.
"""

from __future__ import annotations

import importlib
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DEFAULT_STYLES",
    "DEFAULT_SUBJECTS",
    "DEFAULT_TEMPLATES",
    "CallablePrompts",
    "ListPrompts",
    "PromptInput",
    "PromptSource",
    "TemplatePrompts",
    "as_prompt_source",
]

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a poster of {subject}, {style}",
    "{subject}, {style}, wide establishing shot",
    "{subject} at golden hour, {style} illustration",
)
DEFAULT_SUBJECTS: tuple[str, ...] = (
    "a red lighthouse on a rocky coast",
    "a fox crossing a snowy forest",
    "a tram in a rainy city street",
    "a hot-air balloon over vineyards",
    "an old observatory on a mountain",
)
DEFAULT_STYLES: tuple[str, ...] = (
    "watercolor",
    "art deco",
    "photorealistic",
    "isometric 3D",
)


@runtime_checkable
class PromptSource(Protocol):
    """Anything that can produce the pipeline's prompts, in a stable order."""

    def prompts(self) -> list[str]: ...


def _clean(values: Sequence[str], name: str) -> list[str]:
    if isinstance(values, str):
        raise ValueError(f"{name}: must be a list of strings, not a single string")
    out = [str(v) for v in values]
    if not out:
        raise ValueError(f"{name}: must not be empty")
    for i, v in enumerate(out):
        if not v.strip():
            raise ValueError(f"{name}[{i}]: must contain non-whitespace characters")
    return out


@dataclass(frozen=True)
class TemplatePrompts:
    """``count`` distinct prompts from templates × subjects × styles, chosen by ``seed``.

    Templates use ``{subject}`` and ``{style}`` placeholders. Deterministic: the combinations
    are enumerated in a fixed order and sampled with ``random.Random(seed)``.
    """

    templates: Sequence[str] = DEFAULT_TEMPLATES
    subjects: Sequence[str] = DEFAULT_SUBJECTS
    styles: Sequence[str] = DEFAULT_STYLES
    seed: int = 0
    count: int = 3

    def __post_init__(self) -> None:
        templates = _clean(self.templates, "templates")
        _clean(self.subjects, "subjects")
        _clean(self.styles, "styles")
        for i, t in enumerate(templates):
            try:
                t.format(subject="s", style="s")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"templates[{i}]: only {{subject}} and {{style}} placeholders are allowed "
                    f"({type(exc).__name__}: {exc})"
                ) from None
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"count: must be a positive integer, got {self.count!r}")
        if self.count > self.combinations:
            raise ValueError(
                f"count: {self.count} prompts requested but templates × subjects × styles give "
                f"only {self.combinations} distinct prompts"
            )

    @property
    def combinations(self) -> int:
        return len(self.templates) * len(self.subjects) * len(self.styles)

    def prompts(self) -> list[str]:
        combos = list(itertools.product(range(len(self.templates)), self.subjects, self.styles))
        picked = random.Random(self.seed).sample(combos, self.count)
        return [self.templates[t].format(subject=s, style=st) for t, s, st in picked]


@dataclass(frozen=True)
class ListPrompts:
    """The first ``count`` prompts of your own list (all of them when ``count`` is None)."""

    items: Sequence[str]
    count: int | None = None

    def __post_init__(self) -> None:
        items = _clean(self.items, "prompts")
        if self.count is not None and not 1 <= self.count <= len(items):
            raise ValueError(f"count: {self.count} prompts requested but the list has {len(items)}")

    def prompts(self) -> list[str]:
        items = list(self.items)
        return items if self.count is None else items[: self.count]


@dataclass(frozen=True)
class CallablePrompts:
    """Prompts from ``fn(count, seed)`` — plug in an LLM or any generator here."""

    fn: Callable[[int, int], Sequence[str]]
    count: int = 3
    seed: int = 0
    _cache: list[list[str]] = field(default_factory=list, repr=False, compare=False)

    def prompts(self) -> list[str]:
        if not self._cache:
            produced = _clean(list(self.fn(self.count, self.seed)), "prompt_source")
            if len(produced) < self.count:
                raise ValueError(
                    f"prompt_source: returned {len(produced)} prompts, {self.count} requested"
                )
            self._cache.append(produced[: self.count])
        return list(self._cache[0])


def _import(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"prompt_source: {path!r} must look like 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"prompt_source: cannot import {path!r}: {exc}") from None
    return obj


# What a user may pass as a prompt source: see :func:`as_prompt_source`.
PromptInput = PromptSource | Sequence[str] | Callable[..., Any] | str | None


def as_prompt_source(
    source: PromptInput,
    *,
    count: int,
    seed: int = 0,
) -> PromptSource:
    """Normalise what a user passed into a :class:`PromptSource` producing ``count`` prompts.

    ``None`` means :class:`TemplatePrompts` with the default lists. A string is an import path
    to a source, a list, a callable ``fn(count, seed)``, or a zero-argument factory of a source.
    """
    if source is None:
        return TemplatePrompts(seed=seed, count=count)
    if isinstance(source, str):
        source = _import(source)
        if isinstance(source, type):
            source = source()
    if isinstance(source, PromptSource):
        return source
    if isinstance(source, Sequence) and not isinstance(source, str | bytes):
        return ListPrompts(list(source), count=count)
    if callable(source):
        return CallablePrompts(source, count=count, seed=seed)
    raise ValueError(
        "prompt_source: expected a PromptSource, a list of prompts, a callable fn(count, seed) "
        f"or an import path, got {type(source).__name__}"
    )
