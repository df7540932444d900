"""One loaded model kept across the runs of a process (`kvprof sweep` runs dozens of points on one
model; building Llama-3-8B takes 11 s on an H200, more than many points' runs).

The cache holds one entry, keyed by everything that decides what `load_model` returns: the
ModelSpec (name, source, path, config, weights, tokenizer), the device, the dtype, the attention
implementation, and for random weights the seed they are drawn with. A run with another key drops
the held model (and empties the CUDA cache) before loading its own.

A reused model must be the model a fresh load gives. Strategies change it while they run (their
attention function, forward hooks, attributes on the attention modules) and undo that in their
`close`; a run that fails early may not get there. So `ModelCache.release`, called after every run,
puts the model back into the state it was loaded in: the attention implementation, no forward hooks
or module attributes that were not there at load time. A model whose parameters or buffers were
replaced or changed in place cannot be put back: it is dropped, and the next run loads it again.
What was undone is said in the next run's metadata (`model_restored`), and warned about.
"""

from __future__ import annotations

import gc
import json
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from kvprof import ModelSpec
from kvprof_transformers.loading import LoadedModel, load_model

# The hook dicts of torch.nn.Module, and the dicts that share their keys (flags per hook).
HOOK_DICTS = {"_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
              "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",)}


@dataclass
class ModelState:
    """What a run may change in a loaded model, as it was at load time."""

    attn_implementation: str
    attributes: list[frozenset[str]]          # per module (model.modules() order): its __dict__ keys
    hooks: list[dict[str, frozenset[int]]]    # per module: the hook ids in each of HOOK_DICTS
    tensors: dict[str, tuple[int, int]]       # parameter/buffer name -> (id, in-place version)

    @classmethod
    def of(cls, model: Any) -> ModelState:
        modules = list(model.modules())
        return cls(model.config._attn_implementation, [frozenset(vars(m)) for m in modules],
                   [{name: frozenset(getattr(m, name)) for name in HOOK_DICTS} for m in modules],
                   _tensor_versions(model))


def _tensor_versions(model: Any) -> dict[str, tuple[int, int]]:
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: (id(tensor), tensor._version) for name, tensor in named}


def restore(model: Any, state: ModelState) -> list[str] | None:
    """Undo what a run left in `model`: returns what was undone ([] when it was untouched), or None
    when its weights changed and it cannot be restored."""
    if _tensor_versions(model) != state.tensors:
        return None
    undone = []
    modules = list(model.modules())
    if len(modules) != len(state.attributes):
        return None  # modules added or removed: not the loaded model any more
    for index, module in enumerate(modules):
        for name, flags in HOOK_DICTS.items():
            hooks = getattr(module, name)
            for key in set(hooks) - state.hooks[index][name]:
                del hooks[key]
                for flag in flags:
                    getattr(module, flag).pop(key, None)
                undone.append(f"{type(module).__name__}.{name}[{key}]")
        for extra in set(vars(module)) - state.attributes[index]:
            delattr(module, extra)
            undone.append(f"{type(module).__name__}.{extra}")
    if model.config._attn_implementation != state.attn_implementation:
        undone.append(f"attn_implementation {model.config._attn_implementation}")
        model.set_attn_implementation(state.attn_implementation)
    return undone


@dataclass
class Entry:
    key: str
    loaded: LoadedModel
    state: ModelState
    load_s: float
    runs: int = 0                          # runs that used it so far
    restored: list[str] | None = None      # what the last run left in it and `release` undid


def cache_key(spec: ModelSpec, device: str, dtype: str, attn_implementation: str, seed: int) -> str:
    # Random weights are drawn from the seed; real weights do not depend on it.
    return json.dumps({"model": spec.to_dict(), "device": device, "dtype": dtype, "attn": attn_implementation,
                       "seed": seed if spec.weights == "random" else None}, sort_keys=True, default=str)


class ModelCache:
    """A one-entry cache of loaded models (see the module docstring)."""

    def __init__(self) -> None:
        self.entry: Entry | None = None

    def get(self, spec: ModelSpec, device: str, dtype: str = "auto", attn_implementation: str = "sdpa",
            seed: int = 0) -> tuple[LoadedModel, dict[str, Any]]:
        """The model, and what the run's metadata should say: `model_reused`, and `model_load_s`
        when it was loaded now."""
        key = cache_key(spec, device, dtype, attn_implementation, seed)
        if self.entry is not None and self.entry.key == key:
            entry = self.entry
            entry.runs += 1
            how: dict[str, Any] = {"model_reused": True}
            if entry.restored:
                how["model_restored"] = entry.restored
            entry.restored = None
            return entry.loaded, how
        self.clear()
        started = time.perf_counter()
        if spec.weights == "random":
            torch.manual_seed(seed)  # what run_trace's seed_everything does: the weights follow the seed alone
        loaded = load_model(spec, device, dtype, attn_implementation)
        load_s = time.perf_counter() - started
        self.entry = Entry(key, loaded, ModelState.of(loaded.model), load_s, runs=1)
        return loaded, {"model_reused": False, "model_load_s": round(load_s, 3)}

    def release(self, loaded: LoadedModel) -> list[str] | None:
        """After a run on `loaded`: put it back as loaded (see `restore`); a model that cannot be is
        dropped. Returns what was undone, or None when it was dropped (or is not the cached one)."""
        if self.entry is None or self.entry.loaded is not loaded:
            return None
        undone = restore(loaded.model, self.entry.state)
        if undone is None:
            warnings.warn("kvprof: the last run changed the model's weights; the next run loads it again",
                          stacklevel=2)
            self.clear()
        elif undone:
            warnings.warn(f"kvprof: the last run left {', '.join(undone)} in the model; undone", stacklevel=2)
            self.entry.restored = undone
        return undone

    def clear(self) -> None:
        """Drop the held model and give its device memory back."""
        if self.entry is None:
            return
        self.entry = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


MODELS = ModelCache()  # the process's cache, used by TransformersStrategy.run
