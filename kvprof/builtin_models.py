"""The built-in model aliases (kvprof/model_configs/*.json), registered like any plugin's."""

from __future__ import annotations

from collections.abc import Callable

from kvprof.hookspecs import hookimpl
from kvprof.models import builtin_aliases


@hookimpl
def kvprof_register_models(register: Callable[..., None]) -> None:
    for alias in builtin_aliases().values():
        register(alias.alias, config=alias.config, hf_id=alias.hf_id, description=alias.description)
