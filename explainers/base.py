"""The explainer interface, its registry, and what each explainer needs of a model.

`explain(model, batch, outputs, targets) -> maps [K, h, w]`, non-negative, on the attention grid of the
forward (`outputs.grid`), one map per target. Padding cells are zero. Maps are raw: normalise at use.

This module loads no torch: the registry knows the built-in explainers by name and needs (`BUILTIN`), and
imports an explainer's module only when it is asked for, so the CLI can refuse an impossible run
(`check_supported`) in a moment, before any model, image or Prefect server starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable, Protocol

from eive_audit.pipeline.config import EXPLAINER_SETTINGS, ExplainerSettings, did_you_mean
from eive_audit.pipeline.models.families import Family

if TYPE_CHECKING:
    import torch

    from eive_audit.pipeline.models.detr import DetectorOutput, DetrAdapter
    from eive_audit.pipeline.models.preprocess import PixelBatch
    from eive_audit.pipeline.models.targets import Targets


DETECT = frozenset({"detect"})
CLASSIFY = frozenset({"classify"})
BOTH = DETECT | CLASSIFY


@dataclass(frozen=True)
class Needs:
    """What an explainer needs of a model. `check_supported` refuses a model that lacks it; without
    `gradients`, `register` runs the explainer's `explain` under torch.no_grad."""

    dense_attention: bool = False  # attention matrices (or memory) over one grid: no multi-scale deformable model
    gradients: bool = False  # autograd through the model
    model_types: frozenset[str] = frozenset()  # the model types it is defined for; empty: every family
    tasks: frozenset[str] = DETECT  # detect (DETR-family detectors) and / or classify (ViT classifiers)
    reconstructed: bool = False  # no public code: rebuilt from the paper's abstract, its defaults chosen by measurement


# The built-in explainers and their needs. The explainer `a-b` is the class that explainers/a_b.py registers,
# imported on first use; `register` sets these needs on it as the class attribute `needs`.
BUILTIN: dict[str, Needs] = {
    "eive": Needs(),  # dense rows, or the splat of a deformable model's sampling points
    "raw-attention": Needs(tasks=BOTH),  # a detector's last cross-attention row; a ViT's last CLS row
    "rollout": Needs(dense_attention=True, tasks=BOTH),
    "chefer": Needs(dense_attention=True, gradients=True),
    "legrad-detr": Needs(dense_attention=True, gradients=True),
    "cdam-detr": Needs(dense_attention=True, gradients=True),  # the one-grid encoder memory
    "odam": Needs(gradients=True),  # the finest projected level of a deformable model
    "drise": Needs(),  # black box: forwards of masked images
    # ViT classifiers (METHODS.md 3)
    "legrad": Needs(gradients=True, tasks=CLASSIFY),
    "cdam": Needs(gradients=True, tasks=CLASSIFY),
    "cdam-smooth": Needs(gradients=True, tasks=CLASSIFY),
    "cdam-integrated": Needs(gradients=True, tasks=CLASSIFY),
    "iba": Needs(gradients=True, tasks=CLASSIFY, reconstructed=True),  # METHODS.md 3c
    "grad-cam": Needs(gradients=True, tasks=CLASSIFY),  # the grad-cam package (pytorch-grad-cam)
    "score-cam": Needs(tasks=CLASSIFY),  # the grad-cam package: forwards of masked images
    # learned (METHODS.md 3d): a decoder trained for the model; a detector's needs its memory on one grid
    "aha": Needs(dense_attention=True, gradients=True, tasks=BOTH),
}


class Explainer(Protocol):
    name: ClassVar[str]
    needs: ClassVar[Needs]

    def explain(self, model: DetrAdapter, batch: PixelBatch, outputs: DetectorOutput, targets: Targets) -> torch.Tensor:
        ...


_REGISTRY: dict[str, type] = {}


def _module_of(name: str) -> str:
    return f"{__package__}.{name.replace('-', '_')}"


def register(name: str) -> Callable[[type], type]:
    """Class decorator adding an explainer under `name`; a duplicate name (a built-in one included, loaded
    or not) is an error, not an override. A class registered under a new name keeps the needs it inherits
    (none, for a class of its own)."""

    def decorate(cls: type) -> type:
        if name in BUILTIN and cls.__module__ != _module_of(name):
            explainer_class(name)  # the built-in holds the name even before its module is loaded
        if name in _REGISTRY:
            raise ValueError(f"explainer {name!r} is already registered")
        cls.name = name  # type: ignore[attr-defined]
        cls.needs = BUILTIN.get(name) or getattr(cls, "needs", Needs())  # type: ignore[attr-defined]
        if not cls.needs.gradients:  # type: ignore[attr-defined]
            import torch

            cls.explain = torch.no_grad()(cls.explain)  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return decorate


def available() -> list[str]:
    return sorted(set(BUILTIN) | set(_REGISTRY))


def explainer_class(name: str) -> type:
    """The class registered under `name`, importing a built-in's module on first use."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(_module_of(name))
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY[name]


def get_explainer(name: str, settings: ExplainerSettings | None = None) -> Explainer:
    """An explainer instance by registry name. A parametrised explainer (a name in EXPLAINER_SETTINGS)
    takes `settings`, by default its settings class's defaults; the others take none."""
    cls = explainer_class(name)
    kind = EXPLAINER_SETTINGS.get(name)
    if kind is None:
        if settings is not None and type(settings).model_fields:
            raise ValueError(f"explainer {name!r} takes no parameters, got {settings!r}")
        return cls()
    return cls(settings if settings is not None else kind())


def needs_of(name: str) -> Needs:
    """What the explainer `name` needs of a model (its tasks, attention, gradients)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name in _REGISTRY:
        return getattr(_REGISTRY[name], "needs", Needs())
    raise _unknown(name)


def _unknown(name: str) -> ValueError:
    """The error for a name no explainer has, with the closest names (a typo is the usual cause)."""
    return ValueError(f"unknown explainer {name!r}; {did_you_mean(name.lower(), available())}"
                      f"available: {', '.join(available())}")


def capabilities(name: str) -> str:
    """What an explainer needs of a model, in words, for --help: which tasks and families can run it."""
    needs = needs_of(name)
    wants = [" and ".join(f"{task}ion" if task == "detect" else f"{task} (ViT)" for task in sorted(needs.tasks))]
    wants += [text for wanted, text in ((needs.dense_attention and "detect" in needs.tasks,
                                         "dense attention, so no deformable model"),
                                        (needs.gradients, "gradients")) if wanted]
    if needs.model_types:
        wants.append(f"model types {', '.join(sorted(needs.model_types))}")
    if needs.reconstructed:
        wants.append("RECONSTRUCTED from the paper's abstract, no public code")
    return f"{name} ({'; '.join(wants)})"


def check_supported(names: Iterable[str], family: Family | None) -> None:
    """Raise ValueError, one line, for an unknown explainer name or one whose needs `family` cannot meet (its
    task, detect or classify, and for a detector its attention). With family None (a hub model, known only once
    loaded) only the names are checked."""
    for name in names:
        needs = needs_of(name)
        if family is None:
            continue
        if family.task not in needs.tasks:
            fits = [n for n in BUILTIN if family.task in BUILTIN[n].tasks]
            raise ValueError(f"{name} explains {' and '.join(sorted(needs.tasks))} models, not {family.name} "
                             f"({family.task}); for it use {', '.join(fits)}")
        if needs.dense_attention and family.deformable:
            raise ValueError(f"{name} needs dense attention over one grid, which {family.name} "
                             f"({family.model_type}, multi-scale deformable attention) does not have; use "
                             f"{', '.join(n for n in BUILTIN if not BUILTIN[n].dense_attention and 'detect' in BUILTIN[n].tasks)}")
        if needs.model_types and family.model_type not in needs.model_types:
            raise ValueError(f"{name} is defined for the model types {', '.join(sorted(needs.model_types))}, "
                             f"not {family.model_type} ({family.name})")
