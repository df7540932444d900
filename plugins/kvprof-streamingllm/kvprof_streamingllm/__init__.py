"""StreamingLLM for kvprof: attention sinks plus a recent window (Xiao et al., 2023).

The strategy and its cache policy are in `kvprof_streamingllm.plugin`, which is also the module
the `kvprof` entry point names.
"""
