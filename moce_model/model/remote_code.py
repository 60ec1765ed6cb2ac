"""The model code a merged directory carries, so that it loads where this project is not installed.

`AutoModelForCausalLM.from_pretrained(dir)` with transformers' `trust_remote_code` switched on by the user (and
`transformers.pipeline`, lm-eval's `hf` model) imports the classes that `auto_map` in config.json names from python
files inside the directory. Those files are this library's own modules, copied when the model is merged with their
`moce_model.` imports made relative: the directory runs the code the project runs, self-routing from the prompt
included, and there is no second copy to keep in step. transformers' `register_for_auto_class` would copy only the
modeling module itself, whose absolute `moce_model.` imports would then fail; and transformers reads remote code
from one flat folder (relative imports of sibling files), so every module becomes one file named after it.

The carried modules import only the standard library and `REMOTE_CODE_PACKAGES`, checked as they are copied: a
module that starts to import, say, polars fails the merge here instead of every load elsewhere.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

LIBRARY = "moce_model"
LIBRARY_DIR = Path(__file__).resolve().parents[1]
# The modules `auto_map` names; the others are what they import, found by reading their imports.
CONFIG_MODULE = "moce_model.model.config"
MODELING_MODULE = "moce_model.model.modeling"
# transformers' own naming for remote code (configuration_<type>.py, modeling_<type>.py).
REMOTE_FILE_NAMES = {CONFIG_MODULE: "configuration_moce", MODELING_MODULE: "modeling_moce"}
AUTO_MAP = {
    "AutoConfig": f"{REMOTE_FILE_NAMES[CONFIG_MODULE]}.MoCEConfig",
    "AutoModelForCausalLM": f"{REMOTE_FILE_NAMES[MODELING_MODULE]}.MoCEForCausalLM",
}
# What an interpreter needs besides the standard library (sentence-transformers only to route by embedding).
REMOTE_CODE_PACKAGES = ("numpy", "torch", "transformers", "sentence_transformers")
_FROM_LIBRARY = re.compile(rf"^(\s*)from\s+({LIBRARY}(?:\.\w+)+)\s+import\b")


def _source_file(module: str) -> Path:
    return LIBRARY_DIR.parent.joinpath(*module.split(".")).with_suffix(".py")


def _library_imports(module: str, tree: ast.Module) -> list[ast.ImportFrom]:
    """The `from moce_model.x import ...` statements of a module; any other form of importing the library is
    refused, since only this one can be made relative to a sibling file."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == LIBRARY for a in node.names):
            raise ValueError(f"{_source_file(module)}:{node.lineno}: `import {LIBRARY}...` cannot be carried into a "
                             f"model directory; write `from {LIBRARY}.<module> import <name>`")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == LIBRARY:
            if not _source_file(node.module).is_file():
                raise ValueError(f"{_source_file(module)}:{node.lineno}: `from {node.module} import ...` imports "
                                 "from a package, not a module file; name the module")
            found.append(node)
    return found


def remote_code_modules() -> list[str]:
    """The library modules the model code needs: the config and modeling modules and all they import."""
    seen: list[str] = []
    pending = [CONFIG_MODULE, MODELING_MODULE]
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.append(module)
        tree = ast.parse(_source_file(module).read_text(encoding="utf-8"))
        pending.extend(node.module for node in _library_imports(module, tree))
    return sorted(seen)


def remote_file_name(module: str) -> str:
    """The module's name in the model directory (without `.py`)."""
    return REMOTE_FILE_NAMES.get(module, "moce_" + module.rpartition(".")[2])


def _check_carried(name: str, source: str) -> None:
    allowed = set(REMOTE_CODE_PACKAGES) | set(sys.stdlib_module_names)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            tops = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            tops = [(node.module or "").split(".")[0]]
        else:
            continue
        for top in tops:
            if top not in allowed:
                raise ValueError(f"{name}:{node.lineno}: imports {top!r}; the code a model directory carries may "
                                 f"import only the standard library and {', '.join(REMOTE_CODE_PACKAGES)}")


def remote_code_sources() -> dict[str, str]:
    """{file name: source} of the files a model directory carries: each module with its library imports made
    relative, under a line that says where it came from."""
    modules = remote_code_modules()
    names = {module: remote_file_name(module) for module in modules}
    clashes = sorted({n for n in names.values() if list(names.values()).count(n) > 1})
    if clashes:
        raise ValueError(f"modules {sorted(m for m in modules if names[m] in clashes)} would share the file name(s) "
                         f"{clashes} in a model directory; name them in REMOTE_FILE_NAMES")
    sources = {}
    for module in modules:
        path = _source_file(module)
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        for node in _library_imports(module, ast.parse("".join(lines))):
            index = node.lineno - 1
            match = _FROM_LIBRARY.match(lines[index])
            if match is None or match.group(2) != node.module:
                raise ValueError(f"{path}:{node.lineno}: write `from {node.module} import` on one line to carry "
                                 "this module into a model directory")
            lines[index] = f"{match.group(1)}from .{names[node.module]} import" + lines[index][match.end():]
        header = (f"# {path.relative_to(LIBRARY_DIR.parent).as_posix()} of the moce_model library, copied with its "
                  f"imports made relative when this model was merged: edit that module, not this file.\n")
        source = header + "".join(lines)
        _check_carried(f"{names[module]}.py", source)
        sources[f"{names[module]}.py"] = source
    return sources


def write_remote_code(directory: str | Path) -> list[str]:
    """Write the carried files into a model directory; returns their names."""
    sources = remote_code_sources()
    for name, source in sources.items():
        (Path(directory) / name).write_text(source, encoding="utf-8")
    return sorted(sources)
