"""The references artifact assets hand each other: where an artifact's directory is, plus the few facts
downstream assets need (k, the embedder, the variant). Typed, so each fact has one name from the asset that
writes it to the ones that read it; the json IO manager stores each with its type's name and gives the same
type back."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

REF_TYPE_KEY = "ref_type"


@dataclass(frozen=True)
class ArtifactRef:
    path: str


@dataclass(frozen=True)
class BaseModelRef(ArtifactRef):
    name: str


@dataclass(frozen=True)
class EmbeddingsRef(ArtifactRef):
    rows: int
    dimension: int
    embedder: dict


@dataclass(frozen=True)
class CentroidsRef(ArtifactRef):
    k: int
    dimension: int
    embedder: dict
    mode: str = "fit"
    drift: tuple[float, ...] = ()


@dataclass(frozen=True)
class AdaptersRef(ArtifactRef):
    variant: str
    k: int | None
    moce_config: dict
    centroids: str | None = None
    embedder: dict | None = None


@dataclass(frozen=True)
class MergedModelRef(ArtifactRef):
    variant: str
    k: int | None
    adapters: str
    centroids: str | None = None
    embedder: dict | None = None


@dataclass(frozen=True)
class HeldoutSplitRef(ArtifactRef):
    heldout_files: dict


@dataclass(frozen=True)
class ReportRef(ArtifactRef):
    report: str


REF_TYPES: dict[str, type[ArtifactRef]] = {
    cls.__name__: cls for cls in (ArtifactRef, BaseModelRef, EmbeddingsRef, CentroidsRef, AdaptersRef,
                                  MergedModelRef, HeldoutSplitRef, ReportRef)
}


def ref_to_json(ref: ArtifactRef) -> dict[str, Any]:
    return {REF_TYPE_KEY: type(ref).__name__, **dataclasses.asdict(ref)}


def ref_from_json(stored: dict[str, Any], where: str) -> ArtifactRef:
    """The reference a stored JSON object holds; ValueError naming `where` for an unknown type or fields. A reference
    stored without its type (by an instance made before references were typed) is known by its fields."""
    values = dict(stored)
    name = values.pop(REF_TYPE_KEY, None) or _type_by_fields(values, where)
    cls = REF_TYPES.get(name)
    if cls is None:
        raise ValueError(f"{where}: unknown reference type {name!r} (known: {sorted(REF_TYPES)})")
    fields = {field.name for field in dataclasses.fields(cls)}
    if set(values) - fields or {f.name for f in dataclasses.fields(cls)
                                if f.default is dataclasses.MISSING} - set(values):
        raise ValueError(f"{where}: a {name} has the fields {sorted(fields)}, the stored one {sorted(values)}; "
                         "materialize the asset again")
    if "drift" in values:
        values["drift"] = tuple(values["drift"])
    return cls(**values)


def stored_ref_type(values: dict[str, Any]) -> str | None:
    """The one reference type whose fields a stored object has, or None."""
    def fits(cls: type[ArtifactRef]) -> bool:
        fields = dataclasses.fields(cls)
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        return required <= set(values) <= {f.name for f in fields}

    matches = [name for name, cls in REF_TYPES.items() if cls is not ArtifactRef and fits(cls)]
    return matches[0] if len(matches) == 1 else None


def _type_by_fields(values: dict[str, Any], where: str) -> str:
    name = stored_ref_type(values)
    if name is None:
        raise ValueError(f"{where}: stored without its type, and its fields {sorted(values)} fit no single "
                         "reference type; materialize the asset again")
    return name
