"""H2O (Zhang et al., NeurIPS 2023) on the kvprof transformers runner: heavy-hitter KV eviction.

* `heavy_hitters` — the paper's selection rule on tensors (which cache slots to keep).
* `attention` — an attention function for transformers that also returns each key's
  attention mass, computed in query chunks so long prompts never hold a full score matrix.
* `policy` — the CachePolicy: budgets, per-layer bookkeeping, eviction, events.
* `plugin` — the `h2o` strategy and its options.
"""
