"""Typed artifact references between assets: stored as JSON with their type, read back as the same type, and
references stored by an instance made before the types (plain dicts) still read, known by their fields."""

import pytest

from resources.refs import (
    AdaptersRef,
    BaseModelRef,
    CentroidsRef,
    EmbeddingsRef,
    HeldoutSplitRef,
    MergedModelRef,
    ReportRef,
    ref_from_json,
    ref_to_json,
)

REFS = [
    BaseModelRef("/m/base", "SmolLM2"),
    EmbeddingsRef("/m/emb", rows=3, dimension=8, embedder={"model": "e"}),
    CentroidsRef("/m/c", k=4, dimension=8, embedder={"model": "e"}, mode="fit", drift=(0.0, 0.1)),
    AdaptersRef("/m/a", variant="moce", k=4, moce_config={"variant": "moce"}, centroids="/m/c", embedder={"model": "e"}),
    MergedModelRef("/m/merged", variant="pesc", k=None, adapters="/m/a"),
    HeldoutSplitRef("/m/h", heldout_files={"gsm8k": "/m/h/gsm8k.parquet"}),
    ReportRef("/m/r", report="/m/r/benchmark_report.md"),
]


@pytest.mark.parametrize("ref", REFS, ids=lambda ref: type(ref).__name__)
def test_a_reference_reads_back_as_its_own_type(ref):
    assert ref_from_json(ref_to_json(ref), "ref.json") == ref


@pytest.mark.parametrize("ref", REFS, ids=lambda ref: type(ref).__name__)
def test_a_reference_stored_before_types_is_known_by_its_fields(ref):
    untyped = ref_to_json(ref)
    untyped.pop("ref_type")
    assert ref_from_json(untyped, "ref.json") == ref


def test_a_stored_reference_with_other_fields_is_a_clear_error():
    with pytest.raises(ValueError, match="kmeans.json: stored without its type, and its fields"):
        ref_from_json({"path": "/x", "k": 3}, "kmeans.json")
    with pytest.raises(ValueError, match="a CentroidsRef has the fields"):
        ref_from_json({"ref_type": "CentroidsRef", "path": "/x", "k": 3}, "kmeans.json")
    with pytest.raises(ValueError, match="unknown reference type 'Nope'"):
        ref_from_json({"ref_type": "Nope", "path": "/x"}, "kmeans.json")
