"""Reading an experiment file: bounded YAML, `${VAR}` interpolation, `when_cuda`, and error messages that name
the file, the key and the value."""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from moce_model.experiment.schema import Experiment
from moce_model.experiment.sections import (
    DATA_DIR_ENV,
    DEFAULT_EXPERIMENT,
    EXPERIMENT_ENV,
    EXPERIMENTS_DIR,
    ExperimentError,
)

# ------------------------------------------------------------------------------------------------ loading

# An experiment file is a page of settings. These bounds keep a careless or hostile one (an alias bomb: a few
# hundred bytes that expand to gigabytes) from hanging the loader or producing a message of megabytes.
MAX_FILE_CHARS = 1 << 20
MAX_ALIASES = 100
MAX_EXPANDED_CHARS = 1_000_000
# An error message shows a value in at most MAX_SHOWN_CHARS characters, a check's message in MAX_MESSAGE_CHARS.
MAX_SHOWN_CHARS = 300
MAX_MESSAGE_CHARS = 2_000


class _BoundedLoader(yaml.SafeLoader):
    """yaml's SafeLoader that refuses more than MAX_ALIASES aliases and a key given twice in one mapping
    (yaml keeps the last silently). The expanded size is checked on the composed document (`read_yaml`)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_ALIASES} aliases (*name): an experiment file needs few, if any",
                    self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first_line.get(key)
                except TypeError:  # an unhashable key: SafeConstructor names it below
                    continue
                if seen is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {_shown(key)} appears twice in this mapping (first on line {seen}); "
                        "yaml would keep only the last", key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _expanded_chars(root: yaml.Node) -> int:
    """The size of the document with every alias expanded: each node 1, each scalar its length besides. Shared
    nodes are counted once per use but sized once, so the count costs time linear in the file."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in in_progress:
            raise yaml.composer.ComposerError(None, None, "an alias refers to the node that contains it",
                                              node.start_mark)
        in_progress.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            total = 1 + len(node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(item) for item in node.value)
        else:
            total = 1 + sum(size(key) + size(value) for key, value in node.value)
        in_progress.discard(id(node))
        sizes[id(node)] = total
        if total > MAX_EXPANDED_CHARS:
            raise yaml.composer.ComposerError(
                None, None, f"the aliases here expand to more than {MAX_EXPANDED_CHARS:,} characters",
                node.start_mark)
        return total

    return size(root)


def read_yaml(text: str, name: str) -> Any:
    """`text` as yaml, within the bounds above; a yaml.YAMLError whose marks say `name` and the line."""
    if len(text) > MAX_FILE_CHARS:
        raise yaml.YAMLError(f"{len(text):,} characters, more than the {MAX_FILE_CHARS:,} an experiment may have")
    loader = _BoundedLoader(text)
    loader.name = name
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_chars(node)
        return loader.construct_document(node)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply to be a settings file") from None
    finally:
        loader.dispose()


def _shown(value: Any) -> str:
    """`repr(value)`, shortened past MAX_SHOWN_CHARS so that a message stays readable."""
    return _clipped(repr(value), MAX_SHOWN_CHARS)


def _clipped(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, key: tuple, variables: dict[tuple, str], file: Path, env: Mapping[str, str]) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string; `variables` records which key took which."""
    if isinstance(node, dict):
        return {k: _interpolate(v, (*key, k), variables, file, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, (*key, i), variables, file, env) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def value_of(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        variables[key] = name
        value = env.get(name)
        if value:
            return value
        if default is not None:
            return default
        raise ExperimentError(
            f"{file}: {_dotted(key)} = {_shown(node)}: the environment variable {name} is not set and has no "
            f"default (write ${{{name}:-default}} to give one)"
        )

    whole = _REFERENCE.fullmatch(node)
    if whole:
        text = value_of(whole)
        if text == "":
            return None
        try:
            parsed = read_yaml(text, f"${whole.group(1)}")
        except yaml.YAMLError as err:
            raise ExperimentError(
                f"{file}: {_dotted(key)} = {_shown(node)}: the value of ${whole.group(1)}, {_shown(text)}, is not "
                f"a valid YAML value: {_clipped(str(err))}") from None
        return parsed if not isinstance(parsed, (dict, list)) else text
    return _REFERENCE.sub(value_of, node)


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _keys_allowed_at(loc: tuple) -> list[str]:
    """The keys the schema allows in the mapping at `loc` (for naming them beside an unknown key)."""
    model: Any = Experiment
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    if model is Experiment:
        return [name for name in model.model_fields if name != "name"]
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _describe(error: ValidationError, file: Path, variables: dict[tuple, str]) -> str:
    lines = [f"{file}: {error.error_count()} problem(s) in the experiment file:"]
    for problem in error.errors(include_url=False):
        loc = tuple(problem["loc"])
        key, value, kind = _dotted(loc), problem.get("input"), problem["type"]
        if kind == "missing":
            line = f"  {key}: required, but missing"
        elif kind == "extra_forbidden":
            allowed = _keys_allowed_at(loc[:-1])
            hint = f"; allowed here: {', '.join(allowed)}" if allowed else ""
            line = f"  {key}: unknown key (value {_shown(value)}){hint}"
        else:
            message = problem["msg"].removeprefix("Value error, ")
            line = f"  {key} = {_shown(value)}: {_clipped(message)}"
        source = next((name for where, name in variables.items() if loc[: len(where)] == where), None)
        if source is not None:
            line += f" (the value came from ${source})"
        lines.append(line)
    return "\n".join(lines)


def experiment_path(name_or_path: str) -> Path:
    """A name in configs/experiments/ (`demo`) or a path to a YAML file."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or len(candidate.parts) > 1:
        if not candidate.is_file():
            raise ExperimentError(f"experiment file not found: {candidate}")
        return candidate.resolve()
    path = EXPERIMENTS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
        raise ExperimentError(
            f"no experiment named {name_or_path!r} ({path} does not exist); known: {known}, or give the path of a "
            f"YAML file"
        )
    return path


def selected_experiment(env: Mapping[str, str] | None = None) -> str:
    """The experiment chosen by MOCE_EXPERIMENT; `demo` when it is not set."""
    env = os.environ if env is None else env
    return env.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


def load_experiment(name_or_path: str | os.PathLike[str] | None = None) -> Experiment:
    """Read and validate an experiment file; None: the one the environment selects (`selected_experiment`)."""
    path = experiment_path(str(name_or_path) if name_or_path is not None else selected_experiment())
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as err:
        raise ExperimentError(f"{path}: not UTF-8 text: {err}") from None
    except yaml.YAMLError as err:
        raise ExperimentError(f"{path}: not valid YAML: {_clipped(str(err))}") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: expected a mapping of experiment settings, got {type(raw).__name__}")
    if "name" in raw:
        raise ExperimentError(
            f"{path}: name = {_shown(raw['name'])}: an experiment is named by its file ({path.stem!r}); remove 'name'"
        )
    variables: dict[tuple, str] = {}
    values = _interpolate(raw, (), variables, path, os.environ)
    if values.get("storage_root") is None and os.environ.get(DATA_DIR_ENV):
        variables[("storage_root",)] = DATA_DIR_ENV
    # `when_cuda`: settings that replace the file's own where a CUDA GPU is present (QLoRA, bf16, paged AdamW,
    # torchrun, evaluation on the GPU). Both versions are validated, so a typo in either fails on any machine.
    on_gpu = values.pop("when_cuda", None)
    if on_gpu is not None and not isinstance(on_gpu, dict):
        raise ExperimentError(f"{path}: when_cuda = {_shown(on_gpu)}: expected a mapping of settings for CUDA machines")
    try:
        experiment = Experiment.model_validate({"name": path.stem, **values}, context={"base_dir": path.parent})
        if on_gpu:
            with_gpu = Experiment.model_validate({"name": path.stem, **deep_merged(values, on_gpu)},
                                                 context={"base_dir": path.parent})
            import torch

            if torch.cuda.is_available():
                experiment = with_gpu
    except ValidationError as err:
        raise ExperimentError(_describe(err, path, variables)) from None
    experiment._file = path
    return experiment


def deep_merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `override` laid over it: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merged(merged[key], value)
        else:
            merged[key] = value
    return merged
