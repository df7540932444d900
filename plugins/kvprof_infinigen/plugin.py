"""Registers the `infinigen` strategy. Importing this module never imports torch: `make_policy`
imports the policy and its parts."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvprof import Option, hookimpl, in_range, non_negative, positive
from kvprof_transformers.plugin import TransformersStrategy

if TYPE_CHECKING:
    from kvprof_transformers.loading import LoadedModel
    from kvprof_transformers.runner import CachePolicy

COLUMN_SOURCES = ("prefill", "calibration")


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda value: None if value in choices else f"choose one of: {', '.join(choices)}"


class InfiniGenStrategy(TransformersStrategy):
    name = "infinigen"
    description = ("InfiniGen (OSDI'24): full KV in host memory; each layer's important tokens are "
                   "speculated one layer ahead from skewed partial queries/keys and prefetched")
    options = (
        Option("alpha", 5.0, "fetch tokens whose speculative score is above (max - alpha); "
               "the authors use 5 for Llama, 4 for OPT", check=non_negative),
        Option("partial_weight_ratio", 0.2, "fraction of each head's skewed columns used to speculate "
               "(authors' code: 0.2)", check=in_range(0.0, 1.0, low_open=True)),
        Option("budget", 0.2, "max_num_kv as a fraction of the sequence (prompt + output tokens); "
               "the authors' speed runs use (prompt+128)/5", check=in_range(0.0, 1.0, low_open=True)),
        Option("max_num_kv", 0, "absolute cap on the tokens fetched per head and layer; 0: use budget",
               check=non_negative),
        Option("calibration_tokens", 2048, "tokens of the calibration text for the skew SVD "
               "(authors: 2048 of PG-19)", check=positive),
        Option("partial_columns", "prefill", "prefill: partial columns chosen from each prompt's queries "
               "(authors' runtime); calibration: offline union of the top |QA| and |KA| columns "
               "(authors' accuracy code)", check=_one_of(COLUMN_SOURCES)),
        Option("engine", "static", "static: the fast engine (graph-captured step, speculation on a side stream, "
               "no host wait); eager: transformers' cache and hooks, one synchronised step at a time (the "
               "reference)", check=_one_of(("static", "eager"))),
        Option("graphs", True, "static engine: capture the decode step in a CUDA graph (CUDA only)"),
    )

    def make_policy(self, loaded: LoadedModel, options: dict) -> CachePolicy:
        from kvprof_infinigen.attention import AttentionAccess
        from kvprof_infinigen.policy import InfiniGenPolicy, InfiniGenSettings
        from kvprof_infinigen.skewing import load_or_compute

        access = AttentionAccess(loaded.model)
        skew = load_or_compute(loaded, access, options["calibration_tokens"])
        settings = InfiniGenSettings(options["alpha"], options["partial_weight_ratio"], options["budget"],
                                     options["max_num_kv"], options["partial_columns"])
        if options.get("engine", "static") == "eager":
            return InfiniGenPolicy(access, skew, settings)
        from kvprof_infinigen.fast import StaticInfiniGenPolicy

        return StaticInfiniGenPolicy(access, skew, settings, graphs=options.get("graphs", True))

    def policy_metadata(self, policy: CachePolicy) -> dict:
        """Calibration, engine, and the KV budget in the form the analyses read (`kv_budget`):
        the fetch cap, a fraction of each sequence or a count of tokens."""
        settings = policy.settings
        budget = ({"fraction": None, "tokens": settings.max_num_kv} if settings.max_num_kv
                  else {"fraction": settings.budget, "tokens": None})
        return {"kv_budget": budget, "infinigen_calibration": policy.skew_data.meta,
                "engine": "eager" if type(policy).__name__ == "InfiniGenPolicy" else "static",
                "cuda_graphs": bool(getattr(policy, "graphs", False))}

    def describe_deviations(self) -> list[str]:
        return [
            ("rotary models: the skew is applied at run time to post-RoPE queries and keys (authors' Llama "
             "code), so the speculative query uses the next layer's full W_q projection and RoPE; only the "
             "scoring against the keys uses the partial columns"),
            ("grouped-query attention (authors' code is MHA-only): one skew matrix and one token set per KV "
             "head; each query head's scores are taken relative to its own maximum and aggregated over the "
             "group by the maximum, so a KV head keeps a token when any of its query heads would"),
            ("skew matrices are calibrated on calibration.txt (public-domain prose shipped with kvprof), not "
             "PG-19; partial columns are chosen from the prompt's queries summed over all batch rows (authors: "
             "batch row 0)"),
            ("selected positions are in ascending order (attention does not depend on order); each head's "
             "top-count set is found by a threshold (the count-th largest score) and a prefix-sum compaction "
             "(authors: top-k); ties at the threshold keep the earliest slots"),
            ("static engine (default): speculation of layer t+1 starts with layer t on a high-priority side "
             "stream (authors: a separate stream), the count never reaches the host during a step (authors: "
             ".item()), and the GPU gathers only the selected rows straight from mapped pinned host memory on "
             "the copy stream (authors: a CPU gather into a pinned buffer, then a copy); layers 0-1 fetch all "
             "slots of their block (fixed-size copies, unwritten slots masked). engine=eager: speculation on the "
             "compute stream, one host wait per layer for the count"),
            ("max_num_kv = budget x (prompt + output tokens) unless given; no host-memory pool limit or "
             "eviction (the authors have it only in their accuracy simulation)"),
            "batches must have equal-length prompts (no padding)",
        ]


@hookimpl
def kvprof_register_strategies(register: Callable[[type], None]) -> None:
    register(InfiniGenStrategy)
