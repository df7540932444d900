"""`kvprof new-plugin NAME`: a new plugin project, copied from the example plugin and renamed.

The example (`plugins/kvprof-streamingllm` in kvprof's source tree: StreamingLLM on the
transformers runner, tested with the conformance kit) is copied with every name an author would
otherwise rename by hand (RENAMES): the distribution and its folder, the package and its imports,
the entry point, `Strategy.name` and the policy's `name`, the evict `reason`, the class names, and
the strategy name in the tests. Prose that cites the StreamingLLM paper stays as it is: the
project starts as a working copy of StreamingLLM under the new name, to be changed from there.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from kvprof.errors import UsageError

EXAMPLE = "kvprof-streamingllm"
SKIPPED = {"__pycache__", ".pytest_cache"}
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")


def example_dir() -> Path:
    """The example plugin beside the kvprof package (a source checkout or an editable install)."""
    return Path(__file__).resolve().parent.parent / "plugins" / EXAMPLE


def renames(name: str) -> list[tuple[str, str]]:
    """(old, new) pairs, longest first, for a strategy called `name`. The last one renames the
    strategy name where it stands alone (not inside the package name, already renamed)."""
    camel = "".join(part.capitalize() for part in name.split("_"))
    return [
        ("the example third-party plugin", "started from kvprof's StreamingLLM example"),  # its description
        ("test_streamingllm_plugin", f"test_{name}_plugin"),
        ("kvprof-streamingllm", f"kvprof-{name.replace('_', '-')}"),   # distribution, folder
        ("kvprof_streamingllm", f"kvprof_{name}"),                    # package, imports, entry point
        ("StreamingLLMStrategy", f"{camel}Strategy"),
        ("StreamingLLMPolicy", f"{camel}Policy"),
        ("streamingllm", name),                                       # Strategy.name, reason, entry point
    ]


def rename_text(text: str, name: str) -> str:
    for old, new in renames(name)[:-1]:
        text = text.replace(old, new)
    return re.sub(r"(?<![A-Za-z0-9_-])streamingllm(?![A-Za-z0-9_])", name, text)


def new_plugin(name: str, parent: Path, source: Path | None = None) -> Path:
    """Write the project for strategy `name` under `parent`; returns its folder."""
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"new-plugin {name!r}: a strategy name is lower case letters, digits and _, "
                         "starting with a letter (it becomes the package kvprof_NAME)")
    source = source or example_dir()
    if not (source / "pyproject.toml").is_file():
        raise UsageError(f"new-plugin: the example plugin is not at {source}; kvprof new-plugin copies it from "
                         "kvprof's source tree (git clone, then pip install -e .)")
    target = parent / rename_text(EXAMPLE, name)
    if target.exists():
        raise UsageError(f"new-plugin: {target} exists already")
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if SKIPPED & set(relative.parts) or any(part.endswith(".egg-info") for part in relative.parts):
            continue
        destination = target / rename_text(str(relative), name)
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
        elif path.suffix in (".py", ".toml", ".md", ".txt", ".cfg"):
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_text(rename_text(path.read_text(), name))
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
    return target
