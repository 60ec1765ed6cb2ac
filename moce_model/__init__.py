"""Mixture-of-Clustered-Experts: the framework-free library behind the pipeline.

Importing the package registers the MoCE config and model with the transformers Auto classes, so
`AutoModelForCausalLM.from_pretrained(merged_dir)` works without `trust_remote_code`. The registration is here,
not in the modeling module, because a merged directory carries a copy of that module for interpreters without
this project (`moce_model.model.remote_code`): loaded from there, it must not take the `moce` model type over
from these classes.
"""

from moce_model.common.logs import drop_bitsandbytes_kernels_notice

# Before anything imports bitsandbytes, which logs the notice as it is imported (moce_model.common.logs says why).
drop_bitsandbytes_kernels_notice()

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from moce_model.model.config import MoCEConfig  # noqa: E402
from moce_model.model.modeling import MoCEForCausalLM  # noqa: E402

AutoConfig.register(MoCEConfig.model_type, MoCEConfig, exist_ok=True)
AutoModelForCausalLM.register(MoCEConfig, MoCEForCausalLM, exist_ok=True)
