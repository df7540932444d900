"""`kvprof new-plugin NAME`: the example plugin, renamed, installs, registers and conforms."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvprof.cli import main
from kvprof.plugins import load_plugins
from kvprof.testing import conformance

NAME = "snapkv"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parent = tmp_path_factory.mktemp("new-plugin")
    assert main(["new-plugin", NAME, "--dir", str(parent)]) == 0
    return parent / f"kvprof-{NAME}"


def test_every_name_is_renamed(project: Path) -> None:
    files = sorted(p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file())
    assert files == ["README.md", "kvprof_snapkv/__init__.py", "kvprof_snapkv/plugin.py", "kvprof_snapkv/policy.py",
                     "pyproject.toml", "tests/test_snapkv_plugin.py"]
    for path in project.rglob("*.*"):
        assert "streamingllm" not in path.read_text(), path  # only the paper's name "StreamingLLM" stays in prose
    plugin = (project / "kvprof_snapkv" / "plugin.py").read_text()
    assert 'name = "snapkv"' in plugin and "class SnapkvStrategy(TransformersStrategy)" in plugin
    assert 'snapkv = "kvprof_snapkv.plugin"' in (project / "pyproject.toml").read_text()
    assert 'reason="snapkv"' in (project / "kvprof_snapkv" / "policy.py").read_text()


def test_the_new_strategy_imports_registers_and_passes_the_kit(project: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(project))
    module = importlib.import_module("kvprof_snapkv.plugin")
    plugins = load_plugins(extra={NAME: module})
    assert plugins.registry.strategy_plugins[NAME] == NAME
    report = conformance.check_strategy(plugins.strategy(NAME), {"sink_tokens": 4, "recent_tokens": 32},
                                        trace_dir=tmp_path)
    assert report.ok, report.format()
    assert report.counts["evict"] > 0


def test_the_new_project_installs_with_its_entry_point(project: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(project)], check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *sys.path]))
    listed = subprocess.run([sys.executable, "-m", "kvprof.cli", "plugins", "--json"], env=env, check=True,
                            capture_output=True, text=True, cwd=tmp_path).stdout
    (plugin,) = [p for p in json.loads(listed) if p["name"] == NAME]
    assert (plugin["distribution"], plugin["strategies"]) == (f"kvprof-{NAME}", [NAME])


def test_names_that_cannot_be_a_package_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new-plugin", "My-Strategy", "--dir", str(tmp_path)]) == 2
    assert "a strategy name is lower case letters, digits and _" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
