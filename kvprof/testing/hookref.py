"""The hook reference, rendered as Markdown from the docstrings in `kvprof.hookspecs`.

    python -m kvprof.testing.hookref                          # print it
    python -m kvprof.testing.hookref --write docs/hooks.md  # replace the section between the markers

The docstrings are the single source: edit them, then re-run `--write`; a test fails while the
committed section differs from what this renders.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvprof import hookspecs
from kvprof.events import Kind, kind_fields

START = ("<!-- hookref:start: generated from kvprof/hookspecs.py by "
         "`python -m kvprof.testing.hookref --write docs/hooks.md` -->")
END = "<!-- hookref:end -->"
_BANNER = re.compile(r"^# --- (\w[\w ]*?) -+$")


def render() -> str:
    """The contract's overview, then every hook in source order under its section banner,
    with its signature and docstring."""
    source = inspect.getsource(hookspecs).splitlines()
    banners = {number: match.group(1) for number, line in enumerate(source, 1) if (match := _BANNER.match(line))}
    hooks = sorted(
        (inspect.getsourcelines(function)[1], name, function)
        for name, function in vars(hookspecs).items()
        if name.startswith("kvprof_") and hasattr(function, "kvprof_spec")
    )
    lines = [inspect.getdoc(hookspecs) or "", ""]
    section = None
    for line_number, name, function in hooks:
        current = banners[max(n for n in banners if n < line_number)]
        if current != section:
            section = current
            lines += [f"## {section.capitalize().removesuffix('s')} hooks", ""]
        options = [key for key, value in function.kvprof_spec.items() if value is True]
        suffix = f"  *({', '.join(options)})*" if options else ""
        lines += [f"### `{name}{_signature(function)}`{suffix}", "", inspect.getdoc(function) or "", ""]
        lines += _fields_table(name.removeprefix("kvprof_"))
    return "\n".join(lines).rstrip() + "\n"


def _fields_table(kind_name: str) -> list[str]:
    """The event's fields, from the per-kind table of kvprof.events (none for non-event hooks)."""
    kind = next((kind for kind in Kind if kind.value == kind_name), None)
    rows = kind_fields(kind) if kind is not None else []
    if not rows:
        return []
    lines = ["| field | type | | what it holds |", "| --- | --- | --- | --- |"]
    for row in rows:
        type_name = row.type.replace("|", "\\|")  # a union's bar would end the table cell
        lines.append(f"| `{row.name}` | {type_name} | {'required' if row.required else ''} | {row.meaning} |")
    return lines + [""]


def _signature(function: Callable[..., Any]) -> str:
    signature = inspect.signature(function)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in signature.parameters.values())
    return f"({params}) -> {signature.return_annotation}"


def replace_section(text: str, reference: str) -> str:
    """`text` with the part between START and END replaced by `reference`."""
    if START not in text or END not in text:
        raise ValueError(f"no hook reference markers ({START!r} ... {END!r})")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n\n{reference}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvprof.testing.hookref", description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FILE", help="replace the hook reference section of FILE")
    args = parser.parse_args(argv)
    if args.write is None:
        sys.stdout.write(render())
        return 0
    path = Path(args.write)
    path.write_text(replace_section(path.read_text(), render()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
