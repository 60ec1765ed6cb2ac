from __future__ import annotations

from typing import Any

import dagster as dg


class EmbedderResource(dg.ConfigurableResource):
    """The frozen sentence encoder that places every instruction (input side only) on the sphere."""

    model: str
    kind: str = "sentence-transformers"
    instruction: str = ""
    # `fixed` or `system_prompt` (moce_model.clustering.embedding.INSTRUCTION_SOURCES).
    instruction_source: str = "fixed"
    max_seq_length: int = 256
    batch_size: int = 64
    shard_rows: int = 2048
    device: str | None = None
    # e.g. ["cuda:0", ..., "cuda:7"]: one encoding process per device.
    devices: list[str] = []

    def spec(self) -> dict[str, Any]:
        spec = {
            "model": self.model,
            "kind": self.kind,
            "instruction": self.instruction,
            "max_seq_length": self.max_seq_length,
        }
        # Only away from its default, so the specs recorded before the setting existed stay the same.
        if self.instruction_source != "fixed":
            spec["instruction_source"] = self.instruction_source
        return spec

    def load(self):
        from moce_model.clustering.embedding import load_embedder

        return load_embedder(self.spec(), device=self.device, devices=self.devices)
