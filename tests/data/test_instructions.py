import polars as pl
import pytest

from moce_model.data.instructions import (
    INSTRUCTION_COLUMNS,
    REJECTED_COLUMNS,
    content_id,
    normalise_instructions,
    rejection_counts,
    source_counts,
)
from moce_model.data.synthetic import generate_synthetic


def _raw(rows: list[dict], source: str) -> pl.DataFrame:
    full = [{"system": "", "input": "", "domain": None, **row, "source": source} for row in rows]
    return pl.DataFrame(full, schema={c: pl.String for c in ("system", "instruction", "input", "response", "domain", "source")})


@pytest.fixture()
def messy() -> list[pl.DataFrame]:
    a = _raw([
        {"instruction": "Add 2 and 3.", "response": "5"},
        {"instruction": "   ", "response": "nothing asked"},
        {"instruction": "Say hi.", "response": " \n "},
        {"instruction": "Broken \ufffd text", "response": "x"},
        {"instruction": "Control \x07 char", "response": "x"},
        {"instruction": "Long " + "word " * 50, "response": "y"},
        {"instruction": "Add 2 and 3.", "response": "5"},  # duplicate of the first row
        {"instruction": "Tabs\tand\nnewlines are fine", "response": "ok"},
    ], "a")
    b = _raw([
        {"instruction": "Add 2 and 3.", "response": "5"},  # duplicate across sources
        {"instruction": "Add 2 and 3.", "response": "6"},  # same prompt, other response: not a duplicate
        {"system": "Be brief.", "instruction": "Name a fruit.", "response": "Apple.", "domain": "facts"},
    ], "b").lazy()
    return [a, b]


def test_every_row_is_kept_or_rejected_with_its_reason(messy):
    kept, rejected = normalise_instructions(messy, max_chars=200)
    assert tuple(kept.columns) == INSTRUCTION_COLUMNS
    assert tuple(rejected.columns) == REJECTED_COLUMNS
    assert kept.height + rejected.height == 11
    reasons = dict(zip(rejected["instruction"].to_list(), rejected["reason"].to_list(), strict=True))
    assert reasons["   "] == "empty_instruction"
    assert reasons["Say hi."] == "empty_response"
    assert reasons["Broken \ufffd text"] == "bad_encoding"
    assert reasons["Control \x07 char"] == "bad_encoding"
    assert reasons["Long " + "word " * 50] == "too_long"
    duplicates = rejected.filter(pl.col("reason") == "duplicate")
    assert duplicates.select("source", "instruction", "response").rows() == [("a", "Add 2 and 3.", "5"), ("b", "Add 2 and 3.", "5")]
    # The first occurrence is the one kept.
    assert kept.filter(pl.col("instruction") == "Add 2 and 3.").select("source", "response").rows() == [("a", "5"), ("b", "6")]
    assert "Tabs\tand\nnewlines are fine" in kept["instruction"].to_list()


def test_ids_are_stable_content_hashes_and_unique(messy):
    kept, _ = normalise_instructions(messy, max_chars=200)
    assert kept["id"].n_unique() == kept.height
    assert kept["id"].str.len_chars().unique().to_list() == [16]
    row = kept.filter(pl.col("instruction") == "Name a fruit.").row(0, named=True)
    assert row["id"] == content_id("Be brief.", "Name a fruit.", "", "Apple.")
    # Stable across runs and independent of row order or source.
    again, _ = normalise_instructions(list(reversed(messy)), max_chars=200)
    assert set(again["id"].to_list()) == set(kept["id"].to_list())
    # Field boundaries matter: moving text between fields changes the id.
    assert content_id("", "ab", "c", "r") != content_id("", "a", "bc", "r")


def test_counts_per_source_and_reason(messy):
    kept, rejected = normalise_instructions(messy, max_chars=200)
    counts = {(s, r): n for s, r, n in rejection_counts(rejected).iter_rows()}
    assert counts == {
        ("a", "bad_encoding"): 2, ("a", "duplicate"): 1, ("a", "empty_instruction"): 1,
        ("a", "empty_response"): 1, ("a", "too_long"): 1, ("b", "duplicate"): 1,
    }
    totals = {row["source"]: (row["kept"], row["rejected"], row["total"]) for row in source_counts(kept, rejected).iter_rows(named=True)}
    assert totals == {"a": (2, 6, 8), "b": (2, 1, 3)}


def test_n_chars_domain_and_eval_columns_left_out():
    synthetic = generate_synthetic(5, seed=0).with_columns(pl.lit("synthetic").alias("source"))
    kept, rejected = normalise_instructions([synthetic], max_chars=10_000)
    assert rejected.height == 0 and kept.height == 20
    assert "answer" not in kept.columns and "test_code" not in kept.columns
    assert set(kept["domain"].to_list()) == {"arithmetic", "python", "text", "units"}
    expected = synthetic.select(
        pl.col("system").str.len_chars() + pl.col("instruction").str.len_chars()
        + pl.col("input").str.len_chars() + pl.col("response").str.len_chars()
    ).to_series()
    assert kept["n_chars"].to_list() == expected.to_list()


def test_missing_optional_columns_and_nulls():
    frame = pl.DataFrame({"instruction": ["Do it.", None], "response": ["Done.", "x"], "source": ["s", "s"]})
    kept, rejected = normalise_instructions([frame])
    assert kept.select("system", "input").rows() == [("", "")]
    assert kept["domain"].to_list() == [None]
    assert rejected["reason"].to_list() == ["empty_instruction"]


def test_bad_calls():
    with pytest.raises(ValueError, match="no input frames"):
        normalise_instructions([])
    with pytest.raises(ValueError, match=r"frame 0 lacks column\(s\) \['source'\]"):
        normalise_instructions([pl.DataFrame({"instruction": ["a"], "response": ["b"]})])
    with pytest.raises(ValueError, match="max_chars"):
        normalise_instructions([pl.DataFrame({"instruction": ["a"], "response": ["b"], "source": ["s"]})], max_chars=0)


def test_a_malformed_line_is_its_own_reason_and_details_name_the_origin():
    frame = pl.DataFrame({
        "instruction": ["", "Add.", "Add.", "Add.", "Tell."],
        "response": ["", "5", "5", "5", "x"],
        "source": ["s"] * 5,
        "problem": [None, None, "f.jsonl line 3: column 'a' (mapped to 'response') holds a number, expected text",
                    None, None],
        "origin": ["f.jsonl line 1", "f.jsonl line 2", "f.jsonl line 3", "f.jsonl line 4", None],
        "malformed": ["invalid JSON (Expecting value at column 1)", None, None, None, None],
    })
    kept, rejected = normalise_instructions([frame, _raw([{"instruction": "Tell.", "response": "x"}], "t")])
    assert kept["instruction"].to_list() == ["Add.", "Tell."]
    assert rejected.select("reason", "detail").rows() == [
        ("malformed_line", "f.jsonl line 1: invalid JSON (Expecting value at column 1)"),
        ("wrong_type", "f.jsonl line 3: column 'a' (mapped to 'response') holds a number, expected text"),
        ("duplicate", "f.jsonl line 4: duplicate of f.jsonl line 2"),
        ("duplicate", None),  # a frame without origins (an older stored table) has nothing to name
    ]
