"""Mixture-of-Clustered-Experts: the framework-free library behind the pipeline.

Importing the package registers the MoCE config and model with the transformers Auto classes, so
`AutoModelForCausalLM.from_pretrained(merged_dir)` works without `trust_remote_code`.
"""

from moce_model.common.logs import drop_bitsandbytes_kernels_notice

# Before anything imports bitsandbytes, which logs the notice as it is imported (moce_model.common.logs says why).
drop_bitsandbytes_kernels_notice()

from moce_model.model import modeling as _modeling  # noqa: E402, F401  (registers the Auto classes)
