"""Mixture-of-Clustered-Experts: the framework-free library behind the pipeline.

Importing the package registers the MoCE config and model with the transformers Auto classes, so
`AutoModelForCausalLM.from_pretrained(merged_dir)` works without `trust_remote_code`.
"""

from moce_model.model import modeling as _modeling  # noqa: F401  (registers the Auto classes)
