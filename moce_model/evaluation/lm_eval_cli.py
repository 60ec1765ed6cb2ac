"""`moce-lm-eval`: lm-eval's own command line, with the `moce` model registered and the run's task folders handed
to it.

    moce-lm-eval run --model moce --model_args pretrained=DIR --include_path my_tasks --tasks my_task
    moce-lm-eval --model moce --model_args pretrained=DIR --tasks gsm8k --apply_chat_template
    moce-lm-eval ls tasks --include_path my_tasks
    python -m moce_model.evaluation.lm_eval_cli ...        (the same, without the installed script)

lm-eval's `lm_eval` command knows only the models of its own package: `MoCELM` registers itself as `moce` when
`moce_model.evaluation.lm` is imported, which that command never does, and lm-eval 0.4.13 has no entry point
through which an installed package adds a model. This command imports it, then runs lm-eval's command line
unchanged: every option, the results table and `--output_path` are lm-eval's.

`MoCELM` routes every request by its own document, so it looks each request's task up by name; lm-eval's command
line hands the model neither its tasks nor its task index. For `--model moce` this command adds the run's task
folders to the model arguments as `include_path`: `--include_path` (or the `--config` file's), and the folder of
every task given as a YAML file or a folder. Model arguments that name `include_path` themselves are left as
they are.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

# lm-eval's command line is its `_cli` package: the parser and runner its own `lm_eval` command uses.
from lm_eval._cli import HarnessCLI
from lm_eval.utils import setup_logging, simple_parse_args_string

# Importing MoCELM registers `moce` with lm-eval (and, through the package, the MoCE classes with transformers).
from moce_model.evaluation.lm import MoCELM  # noqa: F401

MODEL_NAME = "moce"
PROG = "moce-lm-eval"


def _config_file(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of the run's `--config` YAML file (empty without one); lm-eval reads it again itself."""
    path = getattr(args, "config", None)
    if not path:
        return {}
    try:
        settings = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"{PROG}: --config {path}: {error}") from None
    if not isinstance(settings, dict):
        raise SystemExit(f"{PROG}: --config {path}: expected a mapping of settings, got {type(settings).__name__}")
    return settings


def task_folders(args: argparse.Namespace) -> list[str]:
    """The folders the run's tasks come from: its include path, and the folder of each task given as a YAML
    file (a glob pattern's folder part) or as a folder of YAML files. Absolute, in order, without repeats."""
    config = _config_file(args)
    include = args.include_path or config.get("include_path")
    folders: list[Path] = [Path(p) for p in (include if isinstance(include, list) else [include]) if p]
    tasks = args.tasks or config.get("tasks") or []
    for entry in [tasks] if isinstance(tasks, str) else tasks:
        for name in str(entry).split(","):
            path = Path(name.strip())
            if path.suffix == ".yaml":
                folders.append(path.parent)
            elif name.strip() and path.is_dir():
                folders.append(path)
    return list(dict.fromkeys(str(folder.absolute()) for folder in folders))


def hand_task_folders_to_model(args: argparse.Namespace) -> None:
    """For a run of the `moce` model: add `include_path` (the run's task folders) to its model arguments."""
    config = _config_file(args)
    if (args.model or config.get("model")) != MODEL_NAME:
        return
    # lm-eval takes the command line's model arguments in place of the config file's, not merged with them.
    model_args = args.model_args or config.get("model_args") or {}
    if isinstance(model_args, str):
        model_args = simple_parse_args_string(model_args)
    if "include_path" in model_args:
        return
    folders = task_folders(args)
    if folders:
        args.model_args = {**model_args, "include_path": folders[0] if len(folders) == 1 else folders}


def parse_args(argv: Sequence[str] | None = None) -> tuple[HarnessCLI, argparse.Namespace]:
    """lm-eval's parser on `argv` (default: the process's arguments), with the `moce` additions applied."""
    cli = HarnessCLI()
    saved = sys.argv
    # HarnessCLI reads sys.argv (and inserts `run` for the legacy form without a subcommand).
    sys.argv = [PROG, *(sys.argv[1:] if argv is None else argv)]
    try:
        args = cli.parse_args()
    finally:
        sys.argv = saved
    if getattr(args, "command", None) == "run":
        hand_task_folders_to_model(args)
    return cli, args


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    cli, args = parse_args(argv)
    cli.execute(args)


if __name__ == "__main__":
    main()
