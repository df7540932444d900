"""Registers the `h2o` strategy: H2O heavy-hitter eviction on the transformers runner.

Importing this module never imports torch: `make_policy` imports the policy and attention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvprof import Option, UsageError, hookimpl, in_range, non_negative
from kvprof_transformers.plugin import TransformersStrategy

if TYPE_CHECKING:  # torch: imported when the strategy runs, not when kvprof loads its plugins
    from kvprof_h2o.policy import H2OPolicy
    from kvprof_transformers.loading import LoadedModel


def _layer_list(value: str) -> str | None:
    try:
        parse_layers(value)
    except ValueError:
        return "expected comma-separated layer indices, e.g. 0,1"
    return None


def parse_layers(value: str) -> frozenset[int]:
    """"0, 1" -> {0, 1}; "" -> {}. Raises ValueError for anything else."""
    layers = frozenset(int(part) for part in value.split(",") if part.strip())
    if any(layer < 0 for layer in layers):
        raise ValueError(value)
    return layers


class H2OStrategy(TransformersStrategy):
    name = "h2o"
    description = ("H2O (Zhang et al., NeurIPS'23): per layer and KV head, keep the most-attended "
                   "(heavy hitter) and the most recent tokens; evict the rest")
    options = (
        Option("heavy_ratio", 0.1, "heavy-hitter budget, a fraction of each prompt (paper: 0.1)",
               check=in_range(0.0, 1.0)),
        Option("recent_ratio", 0.1, "recent-window budget, a fraction of each prompt (paper: 0.1)",
               check=in_range(0.0, 1.0)),
        Option("heavy_tokens", None, "heavy-hitter budget in tokens; replaces heavy_ratio (heavy + recent may "
               "exceed the prompt, up to prompt + output - 1: eviction then starts during decoding)", kind=int,
               check=non_negative),
        Option("recent_tokens", None, "recent-window budget in tokens; replaces recent_ratio", kind=int,
               check=non_negative),
        Option("exempt_layers", "", "comma-separated layers that keep their whole cache "
               "(InfiniGen's H2O baseline exempts 0,1; the authors' HF code none)", check=_layer_list),
        Option("engine", "static", "static: in-place eviction in a budget + 1 slot cache, graph-captured decode; "
               "eager: the reference implementation on transformers' cache",
               check=lambda v: None if v in ("static", "eager") else "must be static or eager"),
        Option("graphs", True, "capture the decode step in a CUDA graph (engine=static, CUDA only)"),
    )

    def check_options(self, options: dict[str, Any]) -> None:
        """The budget as a whole (not zero, ratios within the prompt), before the model loads."""
        from kvprof_h2o.policy import Budget

        Budget(options["heavy_ratio"], options["recent_ratio"], options["heavy_tokens"],
               options["recent_tokens"]).check()

    def make_policy(self, loaded: LoadedModel, options: dict[str, Any]) -> H2OPolicy:
        from kvprof_h2o import attention
        from kvprof_h2o.policy import Budget, H2OPolicy

        budget = Budget(options["heavy_ratio"], options["recent_ratio"], options["heavy_tokens"],
                        options["recent_tokens"])
        num_layers = loaded.config.get_text_config().num_hidden_layers
        exempt = parse_layers(options["exempt_layers"])
        if any(layer >= num_layers for layer in exempt):
            raise UsageError(f"h2o: exempt_layers={options['exempt_layers']!r}: "
                             f"the model has layers 0..{num_layers - 1}")
        self.options_used = options
        if options.get("engine", "static") == "static":
            from kvprof_h2o.fast import FastH2OPolicy, check_supported

            check_supported(loaded.model)
            self.attn_implementation = "kvprof"
            return FastH2OPolicy(budget, exempt, graphs=options.get("graphs", True))
        previous = attention.install(loaded.model)
        # Recorded in the trace's run metadata: the attention that actually ran.
        self.attn_implementation = attention.ATTENTION_NAME
        return H2OPolicy(budget, exempt, previous)

    def policy_metadata(self, policy: Any) -> dict[str, Any]:
        """The engine, and the KV budget in the form the analyses read (`kv_budget`)."""
        options = self.options_used
        parts = [("heavy_tokens", "heavy_ratio"), ("recent_tokens", "recent_ratio")]
        ratios = [options[r] for t, r in parts if options[t] is None]
        counts = [options[t] for t, _ in parts if options[t] is not None]
        ratio = sum(ratios) if ratios else None    # a fraction of each prompt ...
        tokens = sum(counts) if counts else None   # ... plus a count of tokens
        return {"engine": options.get("engine", "static"), "kv_budget": {"fraction": ratio, "tokens": tokens}}

    def describe_deviations(self) -> list[str]:
        return [
            "scores are kept per sequence; the authors' code sums them over the batch (it assumes batch size 1)",
            ("grouped-query attention: a KV head's score is the sum of its query heads' scores, and each KV head "
             "chooses its own tokens (the authors' code handles multi-head attention only)"),
            ("batches mix prompt lengths: each sequence has its own budget from its own prompt; the cache tensor "
             "is as long as the largest budget and the shorter sequences' extra slots are empty and masked "
             "(counted in the measured KV bytes)"),
            ("attention is computed by kvprof's own function (model-dtype logits, float32 softmax, as in eager "
             "attention, in blocks of queries) instead of sdpa, because H2O needs the attention weights"),
            ("exempt layers (option exempt_layers, default none) keep their whole cache, as InfiniGen's H2O "
             "baseline does for layers 0 and 1"),
        ]


@hookimpl
def kvprof_register_strategies(register: Callable[[type], None]) -> None:
    register(H2OStrategy)
