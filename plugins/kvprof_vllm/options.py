"""The `vllm` strategy's options: the engine arguments kvprof passes to vLLM. Its own module so
that the plugin (which registers the strategy) and the engine (which builds vLLM's arguments from
them) both read it without importing each other; importing it never imports vllm."""

from __future__ import annotations

from kvprof import Option, in_range, positive

VLLM_OPTIONS = (
    Option("gpu_memory_utilization", None, "fraction of GPU memory vLLM may use (CPU build: of host memory)",
           kind=float, check=in_range(0.0, 1.0, low_open=True)),
    Option("kv_cache_memory_bytes", None, "KV cache size in bytes (overrides gpu_memory_utilization); "
           "on the CPU build kvprof uses 1 GiB unless this or VLLM_CPU_KVCACHE_SPACE is set",
           kind=int, check=positive),
    Option("max_model_len", None, "longest sequence (prompt + output) in tokens; default: the model's",
           kind=int, check=positive),
    Option("block_size", None, "tokens per KV block (the CPU build needs a multiple of 32)", kind=int, check=positive),
    Option("enable_prefix_caching", None, "prefix caching (vLLM's default: on); prefix-cache evict events need it",
           kind=bool),
    Option("enable_chunked_prefill", None, "chunked prefill (vLLM's default: on)", kind=bool),
    Option("max_num_seqs", None, "requests per engine step; default: the workload's batch size, "
           "or vLLM's default for request-rate runs", kind=int, check=positive),
    Option("max_num_batched_tokens", None, "tokens per engine step", kind=int, check=positive),
    Option("num_gpu_blocks_override", None, "number of KV blocks, whatever the memory (small values force "
           "preemption)", kind=int, check=positive),
    Option("kv_offloading_size", None, "GiB of CPU memory for vLLM's KV offloading connector (GPU only)",
           kind=float, check=positive),
    Option("kv_offloading_backend", "native", "offloading backend: native or lmcache",
           check=lambda v: None if v in ("native", "lmcache") else "must be native or lmcache"),
    Option("attention_backend", None, "vLLM's attention backend by name, e.g. TRITON_ATTN or FLASH_ATTN "
           "(vLLM's AttentionBackendEnum; the CPU build has CPU_ATTN); default: vLLM's choice for the device",
           kind=str),
    Option("enforce_eager", None, "skip torch.compile and CUDA graphs (vLLM's default: off); much faster "
           "start-up on the CPU build", kind=bool),
)
