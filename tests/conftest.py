import importlib.util
import os
import sys
from pathlib import Path

# Tests never reach the network: every model and dataset is local or built in a fixture.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The demo preset trains in bf16 where the CPU computes it natively; the suite's numbers must not depend on the
# machine it runs on (the tests of that choice set the probe themselves).
os.environ.setdefault("MOCE_NATIVE_BF16", "0")


def _sandbox_problem() -> str | None:
    # Loaded from its file (it uses the standard library only): importing the package would load torch.
    path = Path(__file__).resolve().parents[1] / "moce_model" / "evaluation" / "sandbox.py"
    spec = importlib.util.spec_from_file_location("_moce_sandbox_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.sandbox_problem()


# Without bubblewrap, evaluation refuses to run generated code. The programs the tests evaluate are
# fixtures and the output of tiny local models, so here the suite opts in to the in-process safeguards
# instead, says so in its header, and skips the tests of the OS sandbox itself. An explicit
# MOCE_ALLOW_UNSANDBOXED_CODE=0 is left alone (the evaluation tests then fail with the refusal).
SANDBOX_PROBLEM = _sandbox_problem()
if SANDBOX_PROBLEM is not None:
    os.environ.setdefault("MOCE_ALLOW_UNSANDBOXED_CODE", "1")


def pytest_report_header(config):
    if SANDBOX_PROBLEM is None:
        return "sandbox: bubblewrap"
    return (f"sandbox: NONE ({SANDBOX_PROBLEM}); generated code in these tests runs with in-process "
            f"safeguards only (MOCE_ALLOW_UNSANDBOXED_CODE={os.environ.get('MOCE_ALLOW_UNSANDBOXED_CODE')})")


import pytest  # noqa: E402


@pytest.fixture
def one_token_path(request, monkeypatch) -> str:
    """Force rows of one token (decoding steps) onto the parametrised path of `AdapterExperts`: "gathered" (each
    row's group weights copied) or "all_groups" (every group's experts, others masked); the batch size picks one
    otherwise, so a test of a few rows would see only the first."""
    import moce_model.model.experts

    threshold = {"gathered": 10**6, "all_groups": 0}[request.param]
    monkeypatch.setattr(moce_model.model.experts, "ALL_GROUPS_MIN_ROWS_PER_GROUP", threshold)
    return request.param
