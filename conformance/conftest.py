"""Harness for the libraries' own common test suites (run.sh puts them on the path as transformers_tests and
diffusers_tests)."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# diffusers' tests/conftest.py: its markers and shared pytest options (--make-reports)
pytest_plugins = ["diffusers_tests.conftest"]


def pytest_configure(config):
    # markers that transformers registers in its pyproject.toml (not shipped in the sdist's tests/)
    for name in (
        "all_flash_attn_test", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "bitsandbytes",
        "generate", "is_training_test", "is_tensor_parallel_test", "is_expert_parallel_test", "is_fsdp_test",
        "torch_compile_test", "torch_export_test",
    ):
        config.addinivalue_line("markers", f"{name}: transformers test marker")
