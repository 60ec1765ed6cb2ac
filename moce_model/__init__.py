"""Mixture-of-Clustered-Experts: the framework-free library behind the pipeline.

Importing the package registers the MoCE config and model with the transformers Auto classes, so
`AutoModelForCausalLM.from_pretrained(merged_dir)` works without `trust_remote_code`. The registration is here,
not in the modeling module, because a merged directory carries a copy of that module for interpreters without
this project (`moce_model.model.remote_code`): loaded from there, it must not take the `moce` model type over
from these classes.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from moce_model.model.config import MoCEConfig
from moce_model.model.modeling import MoCEForCausalLM

AutoConfig.register(MoCEConfig.model_type, MoCEConfig, exist_ok=True)
AutoModelForCausalLM.register(MoCEConfig, MoCEForCausalLM, exist_ok=True)
