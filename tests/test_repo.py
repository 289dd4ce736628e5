"""Repository hygiene: style, layering, file sizes."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff not installed")
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_library_imports_no_application_layer():
    banned = {"train", "indexes", "app"}
    for path in (ROOT / "radapter").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.relative_to(ROOT)} imports {name}"


def test_no_committed_file_over_10mb():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    big = [f for f in files if (ROOT / f).is_file() and (ROOT / f).stat().st_size > 10 * 2**20]
    assert not big


def test_atomic_writes_get_normal_file_modes(tmp_path):
    import os

    from radapter.atomic import atomic_dir, atomic_path

    with atomic_path(tmp_path / "f.txt") as tmp:
        tmp.write_text("x")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "a").write_text("y")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask


def _extra(project: dict, name: str) -> list[str]:
    """An extra's requirements with its self-references (``radapter[a,b]``) expanded, in order."""
    out: list[str] = []
    for req in project["optional-dependencies"][name]:
        if req.startswith(project["name"] + "["):
            for sub in req[len(project["name"]) + 1:-1].split(","):
                out += [r for r in _extra(project, sub.strip()) if r not in out]
        elif req not in out:
            out.append(req)
    return out


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_requirements_txt_is_the_app_install_flattened():
    """Hugging Face Spaces installs requirements.txt alone, before the checkout exists: it must list the
    package's dependencies and its [app] extra, the same pins, and nothing else."""
    project = _pyproject()
    expected = project["dependencies"] + [r for r in _extra(project, "app") if r not in project["dependencies"]]
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = [ln for ln in lines if ln and not ln.startswith("#")]
    assert sorted(listed) == sorted(expected), "requirements.txt should read:\n" + "\n".join(expected)


def test_extras_and_console_scripts():
    project = _pyproject()
    dev = _extra(project, "dev")
    for name in ("offline", "bench", "train", "index", "app"):
        assert set(_extra(project, name)) <= set(dev), name
    assert any(r.startswith("playwright==") for r in dev)  # tests/test_browser.py; no browser download
    assert {"pytest", "ruff"} <= {r.split(">")[0].split("=")[0] for r in dev}
    scripts = project["scripts"]
    assert scripts == {"radapter": "radapter.cli:main", "radapter-train": "train.cli:main",
                       "radapter-index": "indexes.cli:main", "radapter-app": "app.main:main"}
    import importlib

    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_ci_runs_the_readme_test_command_which_installs_the_dev_extra():
    readme = (ROOT / "README.md").read_text()
    command = readme.split("**2. Set up and run the tests**", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1] == command
    assert "apt-get install -y -q chromium" in command and "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1" in command
    assert '-e ".[dev]"' in command
    demo = readme.split("**1. Set up and run the main job**", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert '-e ".[app]"' in demo and demo.endswith("radapter-app")
