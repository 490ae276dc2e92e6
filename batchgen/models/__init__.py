"""Model families: one ``ModelSpec`` per family holds every fact the rest of batchgen needs, and the callables
that reach the family's code (``models/<family>/``). No torch here: the control plane reads specs, detects a
directory's family and checks weights before any weights load."""

from __future__ import annotations

from pathlib import Path

from batchgen.core.errors import ConfigError, InputError, ModelMismatchError
from batchgen.models.mochi import MOCHI
from batchgen.models.spec import ModelSpec, ParallelPlan, uses_cfg
from batchgen.models.wan import WAN

__all__ = [
    "FAMILIES",
    "MOCHI",
    "WAN",
    "ModelSpec",
    "ParallelPlan",
    "check_weights",
    "detect_family",
    "spec_for",
    "uses_cfg",
]


FAMILIES: dict[str, ModelSpec] = {spec.family: spec for spec in (MOCHI, WAN)}
"""Every model family by name; a new family is a folder with its spec, listed here."""


def spec_for(family: str) -> ModelSpec:
    """The spec of ``family``; ConfigError listing the known families otherwise."""
    try:
        return FAMILIES[family]
    except (KeyError, TypeError):
        raise ConfigError(f"model family must be one of {', '.join(sorted(FAMILIES))}, got {family!r}") from None


def detect_family(model_dir: str | Path) -> str:
    """The family of the weights in ``model_dir`` from its files alone (no torch): ``model_index.json``'s pipeline
    class, else the transformer config's class, else each family's own official layout (``ModelSpec.official_layout``:
    Genmo's ``dit.safetensors``; Wan's root ``config.json`` with ``model_type``, or its ``high_noise_model/``)."""
    from batchgen.models.common.weights import read_json_object

    path = Path(model_dir)
    if not path.is_dir():
        raise InputError(f"model directory {path} does not exist or is not a directory")
    index = read_json_object(path / "model_index.json")
    for spec in FAMILIES.values():
        if index.get("_class_name") in spec.pipeline_classes:
            return spec.family
    transformer_class = read_json_object(path / "transformer" / "config.json").get("_class_name", "")
    for spec in FAMILIES.values():
        if transformer_class.startswith(spec.transformer_prefix):
            return spec.family
    for spec in FAMILIES.values():
        if spec.official_layout(path):
            return spec.family
    raise InputError(
        f"{path}: cannot tell the model family: no model_index.json naming "
        f"{' or '.join(c for s in FAMILIES.values() for c in s.pipeline_classes)}, no transformer/config.json, "
        f"and none of {', '.join(s.official_layout_hint for s in FAMILIES.values())}"
    )


def check_weights(model_dir: str | Path, *, family: str, weights: str = "", fingerprint: str | None = None) -> None:
    """Refuse (ModelMismatchError, exit 4) weights in ``model_dir`` of another family than ``family`` or, when
    ``weights`` is known, with another fingerprint: before any weights load, naming both sides."""
    found = detect_family(model_dir)
    if found != family:
        raise ModelMismatchError(
            f"{model_dir} holds a {spec_for(found).title} model (family {found!r}), but the run uses family "
            f"{family!r}; one run never mixes two models (use weights of that family, or plan another run)"
        )
    if not weights:
        return
    if fingerprint is None:
        from batchgen.models.common.weights import fingerprint_model_dir

        fingerprint = fingerprint_model_dir(model_dir)
    if fingerprint != weights:
        raise ModelMismatchError(
            f"{model_dir} has weights fingerprint {fingerprint}, but the run was planned with weights {weights}; "
            "one run never mixes two models (use those weights, or plan another run)"
        )
