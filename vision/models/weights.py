"""Starting weights from elsewhere: a state dict loaded by name and shape, and torchvision's published weights.

``load_matching(model, state)`` loads every tensor of ``state`` whose name (after lining up the prefixes
of the two key spaces) and shape match one of the model's; the rest of the model keeps its initialisation.
So a detection head with another class count (91 COCO classes in the file, K + 1 in the model) is
skipped and stays freshly initialised, and a torchvision state dict (``backbone.body.conv1.weight``) loads
into a visionflow model that wraps the torchvision network (``net.backbone.body.conv1.weight``).
The returned ``InitReport`` says what loaded and what did not; ``report.line()`` is its one-line summary.

``published_weights(name)`` is the state dict of torchvision's published weights for a registered
architecture (its entry's ``weights``); it downloads them (torch's hub cache) and raises
``WeightsUnavailable`` with one line when the download fails (no internet).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn as nn

# Wrappers that add a prefix to every key: DDP's ``module.``, torch.compile's ``_orig_mod.``.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Batch norm's step counter: absent from frozen batch norm and from many published files; never reported.
_COUNTER = "num_batches_tracked"
_PREFIX_DEPTH = 3  # prefixes of up to three dotted components are tried (e.g. ``net.backbone.body.``)


class WeightsUnavailable(RuntimeError):
    """torchvision's published weights could not be downloaded (no internet); the message is one line."""


@dataclass
class InitReport:
    """What ``load_matching`` did: ``loaded`` model names; ``shape_mismatch`` (name, model shape, source
    shape) skipped; ``missing`` model names the source does not hold; ``unused`` source names that
    matched nothing; ``mapping`` (prefix removed from the source's keys, prefix added)."""

    source: str
    tensors: int  # the model's state-dict tensors (without batch norm's step counters)
    loaded: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    mapping: tuple[str, str] = ("", "")

    @property
    def skipped(self) -> list[str]:
        """The model's tensors left at their initialisation: other shape, or not in the source."""
        return [n for n, _, _ in self.shape_mismatch] + self.missing

    def line(self, few: int = 6) -> str:
        """One line: how many tensors loaded, which were skipped (listed when few), how many of the
        source's went unused."""
        def names(items: list[str]) -> str:
            if len(items) <= few:
                return ", ".join(items)
            return ", ".join(items[:3]) + f", ... ({len(items) - 3} more)"

        parts = [f"init from {self.source}: loaded {len(self.loaded)} of the model's {self.tensors} tensors"]
        if self.shape_mismatch:
            shown = [f"{n} {list(m)} vs {list(s)}" for n, m, s in self.shape_mismatch]
            parts.append(f"skipped {len(self.shape_mismatch)} whose shape differs (model vs file), re-initialised: "
                         + names(shown))
        if self.missing:
            parts.append(f"{len(self.missing)} not in the file, kept as initialised: " + names(self.missing))
        if self.unused:
            parts.append(f"{len(self.unused)} of the file's tensors unused")
        return "; ".join(parts)

    def summary(self) -> dict:
        """A JSON-able record (``run.json``'s ``init``)."""
        return {"source": self.source, "loaded": len(self.loaded), "tensors": self.tensors,
                "skipped_shape": [{"name": n, "model": list(m), "file": list(s)} for n, m, s in self.shape_mismatch],
                "missing": self.missing[:50], "missing_count": len(self.missing), "unused_count": len(self.unused)}


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def _dedupe(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without aliases: a module registered under two names (``TorchvisionDetector._heads`` is also
    ``net.roi_heads``) lists each of its tensors twice; the first name is kept. Aliases are the same object
    (``state_dict(keep_vars=True)``) or the same storage, offset, shape and stride."""
    seen_ids, seen_views, out = set(), set(), {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        view = None
        if value.device.type != "meta" and value.numel():
            view = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                    tuple(value.stride()), value.dtype)
        if id(value) in seen_ids or (view is not None and view in seen_views):
            continue
        seen_ids.add(id(value))
        if view is not None:
            seen_views.add(view)
        out[key] = value
    return out


def _prefixes(keys) -> set[str]:
    """Every dotted prefix (``a.``, ``a.b.``, ...) of up to ``_PREFIX_DEPTH`` components of ``keys``."""
    found = set()
    for k in keys:
        parts = k.split(".")[:-1]
        for d in range(1, min(len(parts), _PREFIX_DEPTH) + 1):
            found.add(".".join(parts[:d]) + ".")
    return found


def _shape(t) -> tuple:
    return tuple(t.shape) if hasattr(t, "shape") else ()


def match_state(model_state: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor],
                source_label: str = "state dict") -> tuple[InitReport, dict[str, torch.Tensor]]:
    """(report, {model name: source tensor} to load). The source's keys are lined up with the model's by
    removing a prefix from them and adding another (each tried among the keys' own prefixes), taking the
    pair under which most tensors share name and shape. Aliases (one tensor under two names) count once,
    by their first name, on both sides."""
    source = _dedupe(_strip_wrappers(source))
    model_shapes = {k: _shape(v) for k, v in _dedupe(model_state).items()}
    best, best_score = ("", ""), (-1, -1, 0)
    for remove in [""] + sorted(_prefixes(source)):
        stripped = {k[len(remove):]: v for k, v in source.items() if k.startswith(remove)}
        for add in [""] + sorted(_prefixes(model_shapes)):
            same_name = same_shape = 0
            for k, v in stripped.items():
                shape = model_shapes.get(add + k)
                if shape is not None:
                    same_name += 1
                    same_shape += shape == _shape(v)
            score = (same_shape, same_name, -len(remove) - len(add))
            if score > best_score:
                best, best_score = (remove, add), score
    remove, add = best
    mapped = {add + k[len(remove):]: (k, v) for k, v in source.items() if k.startswith(remove)}
    report = InitReport(source=source_label, tensors=sum(1 for k in model_shapes if not k.endswith(_COUNTER)),
                        mapping=best)
    to_load: dict[str, torch.Tensor] = {}
    used = set()
    for name, shape in model_shapes.items():
        hit = mapped.get(name)
        if hit is None:
            if not name.endswith(_COUNTER):
                report.missing.append(name)
            continue
        src_key, value = hit
        used.add(src_key)
        if _shape(value) != shape:
            report.shape_mismatch.append((name, shape, _shape(value)))
            continue
        to_load[name] = value
        if not name.endswith(_COUNTER):
            report.loaded.append(name)
    report.unused = [k for k in source if k not in used and not k.endswith(_COUNTER)]
    return report, to_load


def load_matching(model: nn.Module, source: Mapping[str, torch.Tensor], source_label: str = "state dict") -> InitReport:
    """Load the tensors of ``source`` that match the model's by name and shape (``match_state``) into
    ``model``, in place; the others keep their initialisation. Returns the report."""
    report, to_load = match_state(model.state_dict(keep_vars=True), source, source_label)
    if to_load:
        with torch.no_grad():
            model.load_state_dict({k: v.detach() for k, v in to_load.items()}, strict=False)
    return report


def torchvision_weights(tv_name: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, description) of torchvision's default published weights of its model ``tv_name``
    (``torchvision.models.get_model(tv_name, weights="DEFAULT")``, which also applies torchvision's own
    key fix-ups). Downloads into torch's hub cache; ``WeightsUnavailable`` when that fails."""
    from http.client import HTTPException

    import torchvision

    weights = torchvision.models.get_model_weights(tv_name).DEFAULT
    try:
        net = torchvision.models.get_model(tv_name, weights=weights)
    except (OSError, HTTPException) as e:  # urllib's URLError, connection errors, timeouts, a cut download
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise WeightsUnavailable(
            f"could not download torchvision's published weights {weights} ({weights.url}): {reason}; "
            f"they need the internet (or torch's hub cache, {torch.hub.get_dir()}); without it, start from a "
            "file: --init-from PATH (a torchvision state dict or a visionflow checkpoint)") from e
    return net.state_dict(), f"torchvision {weights}"


# Builder settings torchvision's published weights were trained with and its builder sets when it loads them,
# but a state dict cannot carry: a model built without them and given those weights computes something else.
# GoogLeNet's weights expect its inputs re-scaled to [-1, 1] (``transform_input``): without it a red pixel of
# 1.0 reached conv1 as 2.25.
PUBLISHED_MODEL_KWARGS = {"googlenet": {"transform_input": True}}


def published_model_kwargs(name: str) -> dict:
    """The builder keywords registered architecture ``name`` needs to run its published weights as trained."""
    from vision.models.registry import get_entry

    weights = get_entry(name).weights
    return dict(PUBLISHED_MODEL_KWARGS.get(weights, {})) if isinstance(weights, str) else {}


def published_weights(name: str, **model_kwargs) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, description) of torchvision's published weights for the registered architecture
    ``name``: what its entry's ``weights`` names (a torchvision model, or a function of the model's
    keywords). ValueError when it has none; ``WeightsUnavailable`` when they cannot be downloaded."""
    from vision.models.registry import get_entry

    entry = get_entry(name)
    if entry.weights is None:
        raise ValueError(f"{name} has no published torchvision weights; start from a file instead: --init-from PATH")
    if callable(entry.weights):
        return entry.weights(**model_kwargs)
    return torchvision_weights(entry.weights)
