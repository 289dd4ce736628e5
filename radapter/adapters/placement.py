"""Where adapters go, described as data.

A placement spec is a JSON file (see ``radapter/adapters/placements/``): a list of rules, each
``{"tower", "kind", "pattern"}`` where ``pattern`` is a regular expression over
``model.named_modules()`` names and ``kind`` names a :mod:`radapter.adapters.sites` kind. An
optional ``"fold_into"`` names a sibling of the site (a path relative to the site's
parent) that the kind folds into as well, e.g. the conv before a ``conv_bn`` site.
Supporting a new architecture means writing a spec, not editing code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from torch import nn

from ..errors import PlacementError
from .config import RAdapterConfig
from .sites import get_site_kind


@dataclass(frozen=True)
class SiteRule:
    tower: str
    kind: str
    pattern: str
    fold_into: str | None = None


@dataclass(frozen=True)
class PlacementSpec:
    name: str
    rules: tuple[SiteRule, ...]
    description: str = ""

    @classmethod
    def from_dict(cls, data: dict) -> PlacementSpec:
        try:
            rules = tuple(SiteRule(r["tower"], r["kind"], r["pattern"], r.get("fold_into")) for r in data["sites"])
            return cls(name=data["name"], rules=rules, description=data.get("description", ""))
        except (KeyError, TypeError) as e:
            raise PlacementError(f"malformed placement spec: missing {e}") from None


@dataclass(frozen=True)
class SitePlan:
    """One resolved adapter site: module path, tower, kind, feature width, and the fold target's path."""

    path: str
    tower: str
    kind: str
    features: int
    fold_into: str | None = None


_PLACEMENTS: dict[str, PlacementSpec] = {}


def register_placement(spec: PlacementSpec | dict | str | Path) -> PlacementSpec:
    """Register a spec given as an object, a dict, or a path to a JSON file."""
    if isinstance(spec, (str, Path)):
        spec = json.loads(Path(spec).read_text())
    if isinstance(spec, dict):
        spec = PlacementSpec.from_dict(spec)
    for rule in spec.rules:
        get_site_kind(rule.kind)
        re.compile(rule.pattern)
    _PLACEMENTS[spec.name] = spec
    return spec


def list_placements() -> list[str]:
    return sorted(_PLACEMENTS)


def get_placement(name: str) -> PlacementSpec:
    try:
        return _PLACEMENTS[name]
    except KeyError:
        raise PlacementError(f"unknown placement {name!r}; registered: {list_placements()}") from None


def _builtin_specs() -> None:
    for entry in sorted(resources.files("radapter.adapters.placements").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            register_placement(json.loads(entry.read_text()))


def _fold_target(model: nn.Module, path: str, rule: SiteRule) -> tuple[str | None, nn.Module | None]:
    if rule.fold_into is None:
        return None, None
    parent = path.rpartition(".")[0]
    target_path = f"{parent}.{rule.fold_into}" if parent else rule.fold_into
    try:
        return target_path, model.get_submodule(target_path)
    except AttributeError:
        raise PlacementError(f"site {path!r}: fold_into {rule.fold_into!r} names no sibling module") from None


def resolve_sites(model: nn.Module, config: RAdapterConfig) -> list[SitePlan]:
    """Match the placement rules against ``model`` and return the sites, in module order.

    ``config.placement == "auto"`` uses every registered spec; rules are anchored and
    specific, so a model only matches the specs that describe its towers.
    """
    specs = list(_PLACEMENTS.values()) if config.placement == "auto" else [get_placement(config.placement)]
    rules = [(re.compile(r.pattern), r) for s in specs for r in s.rules if r.tower in config.towers]
    plans: list[SitePlan] = []
    for path, module in model.named_modules():
        for regex, rule in rules:
            if regex.fullmatch(path):
                kind = get_site_kind(rule.kind)
                kind.check(module, path)
                target_path, target = _fold_target(model, path, rule)
                kind.check_fold_target(module, target, path)
                plans.append(SitePlan(path, rule.tower, rule.kind, kind.features(module), target_path))
                break
    for tower in config.towers:
        if not any(p.tower == tower for p in plans):
            raise PlacementError(
                f"no adapter sites found for the {tower} tower of {type(model).__name__} "
                f"(placement {config.placement!r}); describe it with radapter.register_placement"
            )
    return plans


def site_weights(model: nn.Module, config: RAdapterConfig | None = None) -> dict[str, nn.Parameter]:
    """The weight each adapter site of ``config``'s placement folds into, by site path.

    For placing another method (e.g. LoRA) on exactly the layers R-Adapter adapts; the
    model is not changed.
    """
    out = {}
    for plan in resolve_sites(model, config or RAdapterConfig()):
        if plan.fold_into is not None:  # a site that folds into another module folds into that one's weight
            out[plan.path] = model.get_submodule(plan.fold_into).weight
        else:
            out[plan.path] = get_site_kind(plan.kind).weight_and_bias(model.get_submodule(plan.path))[0]
    return out


_builtin_specs()
