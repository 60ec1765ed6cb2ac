"""The GPU benchmarks run end to end at a tiny shape on the CPU, so that their code paths are tested in CI."""

from __future__ import annotations

from bench import generate, train_step


def test_train_step_times_every_variant_and_prints_the_ratios(capsys, tmp_path) -> None:
    assert train_step.main(["--device", "cpu", "--shape", "tiny", "--steps", "1", "--warmup", "0",
                            "--json", str(tmp_path / "rows.json")]) == 0
    out = capsys.readouterr().out
    for key in ("moce_over_lora_eager", "moce_over_lora_compiled", "eager_moce_over_compiled_moce",
                "pesc_over_moce_eager", "reference_over_moce_eager"):
        assert f"\n{key}: " in out
    import json

    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert {(row["variant"], row["mode"]) for row in rows} == {
        (variant, mode) for variant in train_step.VARIANTS for mode in ("eager", "compiled")
    } - {("reference", "compiled")}
    trainable = {row["variant"]: row["trainable_params"] for row in rows if row["mode"] == "eager"}
    assert trainable["lora"] < trainable["dense_adapter"] < trainable["pesc"] < trainable["moce"]
    assert trainable["reference"] == trainable["moce"]


def test_train_step_compares_the_two_precisions_in_one_run(capsys, tmp_path) -> None:
    assert train_step.main(["--device", "cpu", "--shape", "tiny", "--steps", "1", "--warmup", "0", "--modes", "eager",
                            "--variants", "lora,moce", "--precision", "both", "--json", str(tmp_path / "rows.json")]) == 0
    out = capsys.readouterr().out
    assert "\nmoce_eager_bf16_over_fp32: " in out and "\nlora_eager_bf16_over_fp32: " in out
    assert "\nmoce_over_lora_eager: " in out
    import json

    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert sorted((row["variant"], row["precision"]) for row in rows) == [
        ("lora", "bf16"), ("lora", "fp32"), ("moce", "bf16"), ("moce", "fp32")]


def test_generate_times_base_and_moce(capsys) -> None:
    assert generate.main(["--device", "cpu", "--shape", "tiny", "--batches", "1,2", "--prompt-len", "8",
                          "--new-tokens", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for cache in ("dynamic", "static"):
        for batch in (1, 2):
            assert f"decode_moce_over_base_{cache}_batch{batch}: " in out


def test_generate_times_the_gathered_decoding_path_beside(capsys, monkeypatch) -> None:
    import moce_model.model.experts

    paths = []
    one_token_rows = moce_model.model.experts.AdapterExperts._one_token_rows
    gathered = moce_model.model.experts.AdapterExperts._gathered

    def spy(name, method):
        def wrapped(self, x, *args):
            if x.shape[1] == 1:
                paths.append(name)
            return method(self, x, *args)
        return wrapped

    monkeypatch.setattr(moce_model.model.experts.AdapterExperts, "_one_token_rows", spy("all_groups", one_token_rows))
    monkeypatch.setattr(moce_model.model.experts.AdapterExperts, "_gathered", spy("gathered", gathered))
    threshold = moce_model.model.experts.ALL_GROUPS_MIN_ROWS_PER_GROUP
    assert generate.main(["--device", "cpu", "--shape", "tiny", "--batches", "8", "--prompt-len", "8",
                          "--new-tokens", "3", "--repeats", "1", "--caches", "dynamic", "--decode-paths", "both"]) == 0
    out = capsys.readouterr().out
    assert "decode_moce_over_moce_gathered_dynamic_batch8: " in out
    assert "decode_moce_over_base_dynamic_batch8: " in out
    # 8 rows of 4 groups: `moce` decodes on the all-groups path, `moce_gathered` on the gathered one
    assert set(paths) == {"all_groups", "gathered"}
    assert moce_model.model.experts.ALL_GROUPS_MIN_ROWS_PER_GROUP == threshold  # restored
