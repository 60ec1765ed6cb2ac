"""An experiment is a YAML file: what to train on, with which models, at which scale, evaluated how.

`configs/experiments/<name>.yaml` (`demo`, `realmix`, `paper`) or any path; `MOCE_EXPERIMENT=<name or path>`
selects one. The asset graph is the same for every
experiment; the file only chooses the values of its resources and configs.

The file is checked against the typed schema below before anything runs. Unknown keys are errors, and every
error names the file, the key path and the value found there. Conventions:

- The experiment's name is its file name without `.yaml`; artifacts go to `storage_root`, by default
  `.moce_data/<name>` in the checkout (or `$MOCE_DATA_DIR` when it is set and the file names no root).
- Relative paths (a local source's `path`, an hf source's `data_files`, a `local` base model's `model_id`,
  `storage_root`) resolve against the directory of the file, so a file and its data can move together.
- `${VAR}` and `${VAR:-default}` take a value from the environment (the default when it is unset or empty).
  A value that is exactly one such reference is read as YAML, so numbers stay numbers and an empty value is
  null; inside longer text it is substituted as text. A variable without a default that is unset is an error.
- The file is read with bounds (`read_yaml`): at most 1,048,576 characters and 100 aliases, at most 1,000,000
  characters once aliases are expanded, and no key twice in one mapping; what breaks them is named with its line.

The package: `sections` (each key's model), `schema` (`Experiment`), `loading` (reading a file). It does
not import Dagster: the pipeline's assets and the `moce` command both read experiments here.
"""

from __future__ import annotations

from moce_model.experiment.loading import (
    MAX_ALIASES,
    MAX_EXPANDED_CHARS,
    MAX_FILE_CHARS,
    MAX_MESSAGE_CHARS,
    MAX_SHOWN_CHARS,
    deep_merged,
    experiment_path,
    load_experiment,
    read_yaml,
    selected_experiment,
)
from moce_model.experiment.schema import (
    MIN_ROWS_PER_CLUSTER,
    Experiment,
    available_devices,
    elbow_ks,
)
from moce_model.experiment.sections import (
    DATA_DIR_ENV,
    DEFAULT_EXPERIMENT,
    DEVICE_PATTERN,
    EXPERIMENT_ENV,
    EXPERIMENTS_DIR,
    REPO_ROOT,
    ACRouter,
    BalanceLoss,
    BaseModelSettings,
    Clustering,
    Embedder,
    Evaluation,
    ExperimentError,
    Experts,
    Launcher,
    SoftAssignment,
    Training,
)

__all__ = [
    "ACRouter", "BalanceLoss", "BaseModelSettings", "Clustering", "DATA_DIR_ENV", "DEFAULT_EXPERIMENT",
    "DEVICE_PATTERN", "EXPERIMENTS_DIR", "EXPERIMENT_ENV", "Embedder", "Evaluation", "Experiment",
    "ExperimentError", "Experts", "Launcher", "MAX_ALIASES", "MAX_EXPANDED_CHARS", "MAX_FILE_CHARS",
    "MAX_MESSAGE_CHARS", "MAX_SHOWN_CHARS", "MIN_ROWS_PER_CLUSTER", "REPO_ROOT", "SoftAssignment",
    "Training", "available_devices", "deep_merged", "elbow_ks", "experiment_path", "load_experiment", "read_yaml",
    "selected_experiment",
]
