import json
from pathlib import Path

import polars as pl
import pytest

from moce_model.data.sources import (
    HF_PRESETS,
    RAW_COLUMNS,
    SourceSpec,
    load_source,
    scan_source,
)
from moce_model.experiment import load_experiment

REALMIX_SOURCES = load_experiment("realmix").sources


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _check_raw_shape(frame: pl.DataFrame) -> None:
    assert tuple(frame.columns[: len(RAW_COLUMNS)]) == RAW_COLUMNS
    for column in ("system", "instruction", "input", "response"):
        assert frame[column].dtype == pl.String
        assert frame[column].null_count() == 0


# ------------------------------------------------------------------------------------------------- local


def test_local_jsonl_with_mapping(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [
        {"question": "What is 2 + 2?", "answer": "4", "extra": 1},
        {"question": "Name a colour.", "answer": None, "extra": 2},
    ])
    frame = load_source({"name": "qa", "kind": "local", "path": str(path),
                         "mapping": {"instruction": "question", "response": "answer"}, "domain": "math"})
    _check_raw_shape(frame)
    assert frame["instruction"].to_list() == ["What is 2 + 2?", "Name a colour."]
    assert frame["response"].to_list() == ["4", ""]  # a null stays visible as empty, to be rejected later
    assert frame["domain"].to_list() == ["math", "math"]
    assert frame["source"].to_list() == ["qa", "qa"]


def test_local_json_array_and_parquet_and_max_rows(tmp_path):
    rows = [{"instruction": f"task {i}", "input": "" if i % 2 else f"in {i}", "output": f"out {i}", "cat": f"c{i % 3}"}
            for i in range(10)]
    array_path = tmp_path / "tasks.json"
    array_path.write_text(json.dumps(rows), encoding="utf-8")
    parquet_path = tmp_path / "tasks.parquet"
    pl.DataFrame(rows).write_parquet(parquet_path)
    mapping = {"instruction": "instruction", "input": "input", "response": "output", "domain": "cat"}
    from_json = load_source({"name": "a", "kind": "local", "path": str(array_path), "mapping": mapping})
    from_parquet = load_source({"name": "a", "kind": "local", "path": str(parquet_path), "mapping": mapping})
    _check_raw_shape(from_json)
    assert from_json.drop("origin").equals(from_parquet.drop("origin"))
    assert from_json["origin"][:2].to_list() == [f"{array_path} element 0", f"{array_path} element 1"]
    assert from_parquet["origin"][:2].to_list() == [f"{parquet_path} row 0", f"{parquet_path} row 1"]
    assert from_json["domain"].to_list()[:3] == ["c0", "c1", "c2"]
    limited = load_source({"name": "a", "kind": "local", "path": str(parquet_path), "mapping": mapping, "max_rows": 4})
    assert limited.height == 4


def test_every_row_has_its_origin_and_a_bad_line_is_a_row_marked_malformed(tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = [json.dumps(row) for row in SLIMORCA_ROWS] + ['{"conversations": [', json.dumps(SLIMORCA_ROWS[1])]
    path.write_text("\n\n".join(lines) + "\n", encoding="utf-8")  # blank lines between: numbers still count them
    spec = {"name": "chat", "kind": "local", "path": str(path), "conversations": "conversations",
            "max_bad_row_share": 0.25}
    frame = load_source(spec)
    _check_raw_shape(frame)
    assert frame["origin"].to_list() == [f"{path} line {n}" for n in (1, 3, 5, 7)]
    assert frame["malformed"].to_list() == [None, None, "invalid JSON (Expecting value at column 20)", None]
    assert frame.row(2, named=True) | {"origin": None, "malformed": None} == {
        "system": "", "instruction": "", "input": "", "response": "", "domain": None, "source": "chat",
        "problem": None, "origin": None, "malformed": None}
    assert frame["response"].to_list() == ["Bonjour.", "Rome.", "", "Rome."]
    # max_rows counts the lines read, bad ones included, so the raw frame never has more rows than asked for
    assert load_source({**spec, "max_rows": 3, "max_bad_row_share": 0.5})["origin"].to_list()[-1] == f"{path} line 5"
    synthetic = load_source({"name": "syn", "kind": "synthetic", "n_per_domain": 1})
    assert synthetic["origin"].to_list() == [f"syn row {i}" for i in range(4)]
    assert synthetic["malformed"].null_count() == 4


def test_profile_spellings_fields_and_dataset_are_accepted(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"q": "a", "a": "b"}])
    spec = SourceSpec.from_dict({"name": "x", "kind": "local", "path": str(path), "fields": {"instruction": "q", "response": "a"}})
    assert spec.mapping == {"instruction": "q", "response": "a"}
    hf = SourceSpec.from_dict({"name": "orca", "kind": "hf", "dataset": "Open-Orca/SlimOrca", "format": "slimorca"})
    assert hf.path == "Open-Orca/SlimOrca" and hf.conversations == "conversations" and hf.domain == "general"


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match=r"unknown kind 'ftp'"):
        SourceSpec.from_dict({"name": "x", "kind": "ftp", "path": "a"})


def test_missing_mapped_column_names_field_file_and_columns(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError) as err:
        load_source({"name": "qa", "kind": "local", "path": str(path),
                     "mapping": {"instruction": "prompt", "response": "answer"}})
    message = str(err.value)
    assert "'instruction'" in message and "'prompt'" in message and str(path) in message
    assert "['question', 'answer']" in message


def test_mapping_without_required_field_is_rejected(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "q"}])
    with pytest.raises(ValueError, match=r"lacks required field\(s\) \['response'\]"):
        SourceSpec.from_dict({"name": "qa", "kind": "local", "path": str(path), "mapping": {"instruction": "question"}})


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"q": "a", "a": "b"}\n{"q": "c", "a": "d"}\n{"q": "e", "a": \n', encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_source({"name": "b", "kind": "local", "path": str(path), "mapping": {"instruction": "q", "response": "a"}})
    assert str(path) in str(err.value) and "line 3" in str(err.value)


def test_malformed_json_array_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"q": "a", "a": "b"},\n {"q": "c" "a": "d"}\n]\n', encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_source({"name": "b", "kind": "local", "path": str(path), "mapping": {"instruction": "q", "response": "a"}})
    assert str(path) in str(err.value) and "line 3" in str(err.value)


def test_empty_dataset_and_missing_file(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="no rows"):
        load_source({"name": "e", "kind": "local", "path": str(empty), "mapping": {"instruction": "q", "response": "a"}})
    with pytest.raises(ValueError, match="file not found"):
        SourceSpec.from_dict({"name": "m", "kind": "local", "path": str(tmp_path / "nope.jsonl"),
                              "mapping": {"instruction": "q", "response": "a"}})


def test_bad_names_and_unknown_keys():
    with pytest.raises(ValueError, match="must match"):
        SourceSpec.from_dict({"name": "a/b", "kind": "synthetic"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"):
        SourceSpec.from_dict({"name": "a", "kind": "synthetic", "colour": "red"})
    with pytest.raises(ValueError, match="no built-in field mapping"):
        SourceSpec.from_dict({"name": "a", "kind": "hf", "path": "someone/unknown-dataset"})


def test_lone_surrogate_in_json_array_is_kept_as_replacement_char(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('[{"q": "bad \\ud800 text", "a": "ok"}]', encoding="utf-8")
    frame = load_source({"name": "s", "kind": "local", "path": str(path), "mapping": {"instruction": "q", "response": "a"}})
    assert "\ufffd" in frame["instruction"][0]


# ----------------------------------------------------------------------------------- hf (local files only)


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    # datasets caches prepared local files; keep that out of the user's home cache.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


SLIMORCA_ROWS = [
    {"conversations": [
        {"from": "system", "value": "You are an AI assistant."},
        {"from": "human", "value": "Translate 'hello' to French."},
        {"from": "gpt", "value": "Bonjour."},
    ]},
    {"conversations": [
        {"from": "human", "value": "What is the capital of Italy?"},
        {"from": "gpt", "value": "Rome."},
    ]},
]


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_slimorca_conversations_from_local_file(tmp_path, streaming):
    path = _write_jsonl(tmp_path / "slimorca.jsonl", SLIMORCA_ROWS)
    preset = HF_PRESETS["Open-Orca/SlimOrca"]
    spec = SourceSpec.from_dict({"name": "slimorca", "kind": "hf", "path": "json", "data_files": str(path),
                                 "streaming": streaming, **preset})
    frame = load_source(spec)
    _check_raw_shape(frame)
    assert frame.select("system", "instruction", "input", "response").rows() == [
        ("You are an AI assistant.", "Translate 'hello' to French.", "", "Bonjour."),
        ("", "What is the capital of Italy?", "", "Rome."),
    ]
    assert frame["domain"].to_list() == ["general", "general"]


@pytest.mark.parametrize(
    ("dataset_id", "row"),
    [
        ("meta-math/MetaMathQA", {"query": "What is 3 * 4?", "response": "12", "type": "GSM_Rephrased"}),
        ("ise-uiuc/Magicoder-OSS-Instruct-75K", {"problem": "Write a sort.", "solution": "def s(x): return sorted(x)", "lang": "python"}),
        ("ise-uiuc/Magicoder-Evol-Instruct-110K", {"instruction": "Explain recursion.", "response": "A function calling itself."}),
    ],
)
def test_hf_presets_map_the_paper_schemas(tmp_path, dataset_id, row):
    path = _write_jsonl(tmp_path / "data.jsonl", [row] * 3)
    preset = HF_PRESETS[dataset_id]
    spec = SourceSpec.from_dict({"name": "paper", "kind": "hf", "path": "json", "data_files": str(path),
                                 "max_rows": 2, **preset})
    frame = load_source(spec)
    _check_raw_shape(frame)
    assert frame.height == 2
    mapping = preset["mapping"]
    assert frame["instruction"][0] == row[mapping["instruction"]]
    assert frame["response"][0] == row[mapping["response"]]
    # Magicoder-OSS names its instruction column `problem`: data, not the raw shape's problem marker.
    assert frame["problem"].null_count() == frame.height


def test_a_data_column_named_problem_is_not_taken_for_a_problem_marker(tmp_path):
    """Magicoder-OSS's instruction column is called `problem`, like the raw shape's problem marker."""
    mapping = HF_PRESETS["ise-uiuc/Magicoder-OSS-Instruct-75K"]["mapping"]
    hf_path = _write_jsonl(tmp_path / "hf.jsonl", [{"problem": "Write a sort.", "solution": "sorted(x)"}])
    hf = load_source({"name": "oss", "kind": "hf", "path": "json", "data_files": str(hf_path), "mapping": mapping})
    assert hf.select("instruction", "response", "problem").rows() == [("Write a sort.", "sorted(x)", None)]
    local_path = _write_jsonl(tmp_path / "local.jsonl", [{"problem": "Write a sort.", "solution": "sorted(x)"},
                                                         {"problem": "Write a max.", "solution": 7}])
    local = load_source({"name": "oss", "kind": "local", "path": str(local_path), "mapping": mapping})
    assert local["instruction"].to_list() == ["Write a sort.", "Write a max."]
    assert local["problem"][0] is None
    assert "column 'solution' (mapped to 'response') holds a number" in local["problem"][1]


def test_hf_source_reads_a_local_mirror_with_the_presets_mapping(tmp_path, monkeypatch):
    """A mirrored copy of a Hub dataset (a directory, or one file) is read through `datasets` with the mapping
    of the dataset id, so users with mirrored datasets keep the paper's specs."""
    mirror_dir = tmp_path / "MetaMathQA"
    mirror_dir.mkdir()
    rows = [{"query": f"What is {i} + 1?", "response": f"The answer is: {i + 1}", "type": "GSM_AnsAug",
             "original_question": "q"} for i in range(3)]
    (mirror_dir / "MetaMathQA-395K.json").write_text(json.dumps(rows))  # one JSON array, as on the Hub
    by_dir = load_source({"name": "mm", "kind": "hf", "path": "meta-math/MetaMathQA", "mirror": str(mirror_dir)})
    by_file = load_source({"name": "mm", "kind": "hf", "path": "meta-math/MetaMathQA",
                           "mirror": str(mirror_dir / "MetaMathQA-395K.json"), "max_rows": 2})
    _check_raw_shape(by_dir)
    assert by_dir["instruction"].to_list() == [r["query"] for r in rows]
    assert by_dir["domain"].to_list() == ["math"] * 3 and by_dir["problem"].null_count() == 3
    assert by_file.equals(by_dir.head(2))
    with pytest.raises(ValueError, match="mirror of 'meta-math/MetaMathQA' not found"):
        SourceSpec.from_dict({"name": "mm", "kind": "hf", "path": "meta-math/MetaMathQA",
                              "mirror": str(tmp_path / "x")})
    with pytest.raises(ValueError, match="'mirror' is a local copy of an hf dataset"):
        SourceSpec(name="l", kind="local", path=str(mirror_dir / "MetaMathQA-395K.json"), mapping={
            "instruction": "query", "response": "response"}, mirror=str(mirror_dir)).validate()
    # the rehearsal experiment reads the paper experiment's four datasets from mirrors, with the same ids
    monkeypatch.setenv("MOCE_REHEARSAL_DIR", str(tmp_path / "fixtures"))
    rehearsal, paper = load_experiment("paper-rehearsal").sources, load_experiment("paper").sources
    assert [(s.name, s.path) for s in rehearsal] == [(s.name, s.path) for s in paper]
    assert [s.mirror for s in rehearsal] == [str(tmp_path / "fixtures" / "datasets" / s.name) for s in paper]


def test_hf_missing_column_is_named(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "a"}])
    spec = SourceSpec.from_dict({"name": "mm", "kind": "hf", "path": "json", "data_files": str(path),
                                 **HF_PRESETS["meta-math/MetaMathQA"]})
    with pytest.raises(ValueError, match=r"'query' not found .*available columns: \['question', 'answer'\]"):
        load_source(spec)


def test_paper_and_demo_experiments_sources():
    specs = load_experiment("paper").sources
    assert [s.path for s in specs] == list(HF_PRESETS)
    assert all(s.kind == "hf" and (s.mapping or s.conversations) and s.domain for s in specs)  # presets filled in
    demo = [SourceSpec(name=spec.name, kind=spec.kind, n_per_domain=5, seed=spec.seed)
            for spec in load_experiment("demo").sources]
    frame = load_source(demo[0])
    assert frame.height == 20 and {"answer", "test_code"} <= set(frame.columns)
    assert scan_source(demo[0]).collect().equals(frame)


# --------------------------------------------------------------------------------------- the real samples


@pytest.mark.skipif(not Path(REALMIX_SOURCES[0].path).is_file(), reason="realmix samples not present")
def test_realmix_samples_load():
    frames = {spec.name: load_source(spec) for spec in REALMIX_SOURCES}
    assert set(frames) == {"gsm8k", "gpteacher_codegen", "gpteacher_roleplay", "gpteacher_toolformer"}
    for name, frame in frames.items():
        _check_raw_shape(frame)
        assert frame.height == 800, name
        assert (frame["instruction"].str.len_chars() > 0).all()
        assert (frame["response"].str.len_chars() > 0).all()
    assert frames["gsm8k"]["response"].str.contains("####").all()
    assert (frames["gpteacher_codegen"]["input"] != "").any()
