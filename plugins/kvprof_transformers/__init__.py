"""kvprof's transformers runner and its baseline strategies, `full` and `offload`."""
