"""Plugin loading: `kvprof plugins`, KVPROF_PLUGINS, broken plugins, and the hook reference.

Third-party plugins are installed for real: each test writes a distribution's metadata
(`*.dist-info` with its `entry_points.txt`) and its modules into a folder put on sys.path, which
is all importlib.metadata needs to find an installed package.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from kvprof.cli import main
from kvprof.plugins import LoadedPlugins, load_plugins
from kvprof.testing import conformance, hookref
from kvprof.trace import partial_path, read_trace

DOCS = Path(__file__).parents[1] / "docs"
HOOK_REFERENCE = DOCS / "hooks.md"
PLUGIN_GUIDE = DOCS / "plugin-guide.md"

GOOD = '''
from kvprof import hookimpl
from kvprof import Strategy


class Noop(Strategy):
    name = "noop"


@hookimpl
def kvprof_register_strategies(register):
    register(Noop)
'''
IMPORT_ERROR = "import a_module_nobody_installed\n"
BAD_SIGNATURE = '''
from kvprof import hookimpl


@hookimpl
def kvprof_register_strategies(register, budget):
    pass
'''
UNKNOWN_HOOK = '''
from kvprof import hookimpl


@hookimpl
def kvprof_on_step(event):
    pass
'''
RAISES_AT_REGISTRATION = '''
from kvprof import hookimpl


@hookimpl
def kvprof_register_models(register):
    raise FileNotFoundError("configs/model.json")
'''
PLUGINS = {"good": GOOD, "import_error": IMPORT_ERROR, "bad_signature": BAD_SIGNATURE,
           "unknown_hook": UNKNOWN_HOOK, "raises": RAISES_AT_REGISTRATION}


def install(site: Path, distribution: str, version: str, modules: dict[str, str],
            entry_points: dict[str, str]) -> None:
    """Installs a distribution into `site` (a folder on sys.path): its modules, its metadata
    and its `kvprof` entry points (plugin name -> module)."""
    info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    lines = [f"{name} = {module}" for name, module in entry_points.items()]
    (info / "entry_points.txt").write_text("[kvprof]\n" + "\n".join(lines) + "\n")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder on sys.path to install distributions into; their modules are forgotten after."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    installed_here = [name for name, module in sys.modules.items()
                      if str(getattr(module, "__file__", "")).startswith(str(folder))]
    for name in installed_here:
        del sys.modules[name]


@pytest.fixture
def installed(site: Path) -> Path:
    """`kvprof-fakes` 0.3, one plugin per entry of PLUGINS."""
    install(site, "kvprof-fakes", "0.3", {f"kvprof_fake_{name}": source for name, source in PLUGINS.items()},
            {name: f"kvprof_fake_{name}" for name in PLUGINS})
    return site


def failures(plugins: LoadedPlugins) -> dict[str, str]:
    return {failure.name: failure.error for failure in plugins.failures}


def test_broken_plugins_are_reported_by_name_and_the_others_load(installed: Path) -> None:
    plugins = load_plugins()
    pm, registry = plugins.manager, plugins.registry
    errors = failures(plugins)
    assert errors["import_error"] == "ModuleNotFoundError: No module named 'a_module_nobody_installed'"
    assert "Argument(s) {'budget'} are declared in the hookimpl but can not be found in the hookspec" \
        in errors["bad_signature"]
    assert "unknown hook 'kvprof_on_step'" in errors["unknown_hook"]
    assert errors["raises"] == "kvprof_register_models raised FileNotFoundError: configs/model.json"
    assert {failure.distribution for failure in plugins.failures} == {"kvprof-fakes"}
    loaded = {name for name, _ in pm.list_name_plugin()}
    assert "good" in loaded and not loaded & set(errors)
    assert plugins.versions["good"] == ("kvprof-fakes", "0.3")
    assert registry.strategy_plugins["noop"] == "good"
    assert {"full", "streamingllm"} <= set(registry.strategies)  # built-in and third-party alike
    assert "tiny-llama" in registry.models  # the broken models plugin did not stop the built-in one


def test_kvprof_plugins_lists_name_version_hooks_and_strategies(installed: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    assert main(["plugins", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    details = rows["streamingllm"].pop("strategy_details")
    assert rows["streamingllm"] == {
        "name": "streamingllm", "distribution": "kvprof-streamingllm", "version": "0.1.0",
        "hooks": ["kvprof_register_strategies"], "strategies": ["streamingllm"],
    }
    assert [detail["name"] for detail in details] == ["streamingllm"]
    assert {option["name"] for option in details[0]["options"]} >= {"sink_tokens"}
    assert rows["good"]["version"] == "0.3" and rows["good"]["strategies"] == ["noop"]
    assert rows["import_error"] == {
        "name": "import_error", "distribution": "kvprof-fakes",
        "error": "ModuleNotFoundError: No module named 'a_module_nobody_installed'",
    }
    assert main(["plugins"]) == 0
    table = capsys.readouterr().out
    assert "streamingllm" in table and "register_strategies" in table
    assert "failed import_error (kvprof-fakes): ModuleNotFoundError: No module named" in table


def test_kvprof_plugins_env_restricts_what_loads(installed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPROF_PLUGINS", "sinks, streamingllm,good,typo")
    plugins = load_plugins()
    assert {name for name, _ in plugins.manager.list_name_plugin()} == {"sinks", "streamingllm", "good"}
    assert failures(plugins) == {"typo": "KVPROF_PLUGINS names it, but no installed plugin has it"}
    monkeypatch.setenv("KVPROF_PLUGINS", "")
    plugins = load_plugins()
    assert plugins.manager.list_name_plugin() == [] and plugins.failures == []


def test_a_plugin_name_taken_twice_is_reported(site: Path) -> None:
    install(site, "kvprof-rival", "1.0", {}, {"sinks": "kvprof.sinks"})
    assert failures(load_plugins())["sinks"] == \
        "another installed plugin is already named 'sinks'; this one is not loaded"


def test_the_hook_reference_page_is_current() -> None:
    text = HOOK_REFERENCE.read_text()
    assert hookref.replace_section(text, hookref.render()) == text, (
        "docs/hooks.md is stale: run `python -m kvprof.testing.hookref --write docs/hooks.md`")


def test_the_hook_reference_covers_every_hook() -> None:
    from kvprof import hookspecs

    reference = hookref.render()
    hooks = [name for name in vars(hookspecs) if name.startswith("kvprof_")]
    assert hooks and all(f"### `{name}(" in reference for name in hooks)
    assert reference.index("## Registration hooks") < reference.index("## Event hooks")


def test_the_sink_and_analysis_examples_of_the_plugin_guide_work(site: Path, tmp_path: Path) -> None:
    text = PLUGIN_GUIDE.read_text()
    examples = dict(re.findall(r"```python\n# file: (\w+)\.py\n(.*?)```", text, re.S))
    assert set(examples) == {"kvprof_evictionlog", "kvprof_overbudget"}
    install(site, "kvprof-examples", "1.0", examples,
            {"evictionlog": "kvprof_evictionlog", "overbudget": "kvprof_overbudget"})

    report = conformance.check_strategy("streamingllm", {"recent_tokens": 32}, trace_dir=tmp_path)
    assert report.ok, report.format()
    assert report.analyses["over_budget"] == "ok"
    log = report.trace_path.with_name(report.trace_path.name + ".evictions.jsonl").read_text().splitlines()
    assert len(log) == report.counts["evict"]
    assert json.loads(log[0])["reason"] == "streamingllm"
    over_budget = load_plugins().registry.analyses["over_budget"].function
    result = over_budget(read_trace(report.trace_path), budget_bytes=0)
    assert result["steps_over_budget"] == result["steps"] == report.counts["decode_step"]


def test_loading_the_built_in_plugins_imports_no_framework() -> None:
    # `kvprof plugins` and `kvprof analyze` load every plugin: the registering modules must stay
    # cheap, the example third-party plugin (streamingllm) included.
    import os
    import subprocess

    code = ("from kvprof.plugins import load_plugins; plugins = load_plugins(); "
            "assert not plugins.failures and 'streamingllm' in plugins.registry.strategies, plugins.failures; "
            "import sys; loaded = [m for m in ('torch', 'transformers', 'vllm') if m in sys.modules]; "
            "assert not loaded, loaded")
    env = os.environ | {"KVPROF_PLUGINS": "sinks,models,analyses,transformers,h2o,infinigen,vllm,streamingllm"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


EXITS_AT_IMPORT = "import sys\nsys.exit(3)\n"
EXITS_AT_REGISTRATION = '''
from kvprof import hookimpl


@hookimpl
def kvprof_register_analyses(register):
    raise SystemExit("no analyses today")
'''
SECOND_FULL = '''
from kvprof import Strategy, hookimpl


class AnotherFull(Strategy):
    name = "full"


class Mine(Strategy):
    name = "mine"


@hookimpl
def kvprof_register_strategies(register):
    register(Mine)
    register(AnotherFull)


@hookimpl
def kvprof_register_models(register):
    register("mine-model", config={"model_type": "llama"})
'''
ISOLATED = {"exits": EXITS_AT_IMPORT, "exits_registering": EXITS_AT_REGISTRATION, "second_full": SECOND_FULL}


@pytest.fixture
def rude(site: Path) -> Path:
    """`kvprof-rude` 1.0: a plugin calling sys.exit at import, one raising SystemExit in a
    registration hook, and one registering a second `full` strategy beside its own `mine`."""
    install(site, "kvprof-rude", "1.0", {f"kvprof_rude_{name}": source for name, source in ISOLATED.items()},
            {name: f"kvprof_rude_{name}" for name in ISOLATED})
    return site


def test_sys_exit_and_a_taken_strategy_name_are_failures_of_that_plugin(rude: Path) -> None:
    from kvprof_transformers.plugin import FullStrategy

    plugins = load_plugins()
    errors = failures(plugins)
    assert errors["exits"] == "SystemExit(3) (the plugin called sys.exit)"
    assert errors["exits_registering"] == \
        "kvprof_register_analyses raised SystemExit('no analyses today') (the plugin called sys.exit)"
    assert errors["second_full"] == \
        "strategy 'full' is already registered by plugin 'transformers'; this plugin is not loaded"
    assert {failure.distribution for failure in plugins.failures} == {"kvprof-rude"}
    # The first owner keeps the name, and nothing of the later plugin is used.
    assert plugins.registry.strategies["full"] is FullStrategy
    assert "mine" not in plugins.registry.strategies and "mine-model" not in plugins.registry.models
    loaded = {name for name, _ in plugins.manager.list_name_plugin()}
    assert {"transformers", "sinks", "analyses", "streamingllm"} <= loaded and not loaded & set(ISOLATED)
    assert set(plugins.versions).isdisjoint(ISOLATED)


def test_plugins_analyze_and_trace_work_beside_rude_plugins(rude: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    assert main(["plugins", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["exits"]["error"].startswith("SystemExit(3)")
    assert rows["transformers"]["strategies"] == ["full", "offload"]
    assert "strategy 'full' is already registered" in rows["second_full"]["error"]
    assert main(["plugins"]) == 0
    assert "failed second_full (kvprof-rude)" in capsys.readouterr().out
    example = Path(__file__).parents[1] / "traces" / "examples" / "full-passkey.arrow"
    assert main(["analyze", str(example), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)
    trace_path = tmp_path / "full.arrow"
    assert main(["trace", "--plugin", "full", "--model", "tiny-llama", "--weights", "random", "--prompt-len", "16",
                 "--output-len", "2", "-o", str(trace_path)]) == 0
    assert read_trace(trace_path).run["strategy"] == "full"


@pytest.mark.parametrize("strategy, message", [
    ("exits", "kvprof: error: plugin 'exits' failed to load: SystemExit(3) (the plugin called sys.exit)"),
    ("mine", "kvprof: error: strategy 'mine' comes from plugin 'second_full', which failed to load: "
             "strategy 'full' is already registered by plugin 'transformers'; this plugin is not loaded"),
    ("nothing_by_this_name", "kvprof: error: unknown plugin 'nothing_by_this_name'; installed: "),
])
def test_trace_says_why_the_plugin_asked_for_failed(rude: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    strategy: str, message: str) -> None:
    trace_path = tmp_path / "run.arrow"
    status = main(["trace", "--plugin", strategy, "--model", "tiny-llama", "--weights", "random",
                   "-o", str(trace_path)])
    assert status == 2
    assert capsys.readouterr().err.startswith(message)
    assert not trace_path.exists() and not partial_path(trace_path).exists()


def test_keyboard_interrupt_at_import_is_not_swallowed(site: Path) -> None:
    install(site, "kvprof-interrupted", "1.0", {"kvprof_interrupted": "raise KeyboardInterrupt\n"},
            {"interrupted": "kvprof_interrupted"})
    with pytest.raises(KeyboardInterrupt):
        load_plugins()
