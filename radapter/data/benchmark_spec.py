"""Benchmark specs: class names, prompt names, templates and core-feature descriptions, as data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class BenchmarkSpec:
    """What a benchmark asks of a model, fixed a priori (never tuned on its test sets).

    ``classnames`` are the dataset's own names; ``prompt_names`` (same order) are what
    the text encoder reads; ``descriptions`` map each prompt name to a description of
    the object's own visual features (DRM's core-feature prompts).
    """

    name: str
    task: str
    description: str
    classnames: tuple[str, ...] = ()
    prompt_names: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    descriptions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def description_list(self) -> list[str]:
        """Descriptions in class order."""
        return [self.descriptions[n] for n in self.prompt_names]


_KNOWN = {"name", "task", "description", "classnames", "prompt_names", "templates", "descriptions"}


def get_spec(name: str) -> BenchmarkSpec:
    try:
        text = resources.files("radapter.data.specs").joinpath(f"{name}.json").read_text()
    except FileNotFoundError:
        raise KeyError(f"unknown benchmark {name!r}; known: {list_benchmarks()}") from None
    data = json.loads(text)
    spec = BenchmarkSpec(
        name=data["name"], task=data["task"], description=data.get("description", ""),
        classnames=tuple(data.get("classnames", ())), prompt_names=tuple(data.get("prompt_names", ())),
        templates=tuple(data.get("templates", ())), descriptions=dict(data.get("descriptions", {})),
        extra={k: v for k, v in data.items() if k not in _KNOWN},
    )
    if spec.prompt_names and len(spec.prompt_names) != len(spec.classnames):
        raise ValueError(f"{name}: prompt_names and classnames differ in length")
    missing = [n for n in spec.prompt_names if spec.descriptions and n not in spec.descriptions]
    if missing:
        raise ValueError(f"{name}: no description for {missing}")
    return spec


def list_benchmarks() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("radapter.data.specs").iterdir() if p.name.endswith(".json"))
