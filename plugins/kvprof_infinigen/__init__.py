"""InfiniGen (Lee et al., OSDI 2024) on kvprof's transformers runner: speculative KV prefetch from
host memory. See policy.py for the decode loop, selection.py for the rule, skewing.py for the
offline SVD skew."""
