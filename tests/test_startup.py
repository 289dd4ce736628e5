"""Start-up stays light: importing the packages and every command line's --help load no heavy library."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.startup import HELP_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "faiss", "gradio", "transformers", "timm", "matplotlib", "sklearn")
LAZY_PACKAGES = ("radapter", "radapter.models", "radapter.data", "radapter.evaluation", "indexes")

_PROBE = """
import json, runpy, sys
heavy, argv = json.loads(sys.argv[1]), json.loads(sys.argv[2])
if argv:
    sys.argv = argv
    try:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        assert e.code in (0, None), e.code
else:
    import radapter, indexes, train, app, radapter.data, radapter.models, radapter.evaluation  # noqa: F401
# A module lazy_loader.load() has registered but nothing has used yet is not loaded.
print(json.dumps(sorted(m for m, v in sys.modules.items()
                        if m.split(".")[0] in heavy and type(v).__name__ != "_LazyModule")))
"""


def _heavy_modules(argv: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(HEAVY), json.dumps(argv)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_packages_loads_no_heavy_library():
    assert _heavy_modules([]) == []


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_help_loads_no_heavy_library(command):
    module, *sub = command.split()
    assert _heavy_modules([module, *sub, "--help"]) == []


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_public_name_resolves(package):
    mod = importlib.import_module(package)
    assert mod.__all__ == sorted(mod.__all__)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
    with pytest.raises(AttributeError):
        mod.no_such_name  # noqa: B018 (the access is the test)


def test_submodules_load_on_attribute_access():
    """As when the packages imported every module: ``radapter.adapters.merge`` works after ``import radapter``."""
    code = ("import radapter, indexes; print(radapter.adapters.merge.merge_adapters.__name__, "
            "radapter.evaluation.harness.alpha_sweep.__name__, indexes.store.build_index.__name__, "
            "'adapters' in dir(radapter), 'adapters' in radapter.__all__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["merge_adapters", "alpha_sweep", "build_index", "True", "False"]
