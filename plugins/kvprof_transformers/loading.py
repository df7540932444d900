"""Loading a kvprof ModelSpec with transformers, and the tokenizer glue for workloads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from kvprof import ModelSpec, UsageError
from kvprof.workloads import chat_wrapping


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype

    @property
    def config(self) -> Any:
        return self.model.config

    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat_wrapping(self) -> tuple[str, str]:
        """`chat_wrapping` of the model's tokenizer."""
        return chat_wrapping(self.tokenizer)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 is what GPUs serve in; float32 is the fast and exact choice on CPUs.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
              "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if name not in dtypes:
        raise UsageError(f"unknown dtype {name!r}; choose one of: auto, {', '.join(dtypes)}")
    return dtypes[name]


def load_model(spec: ModelSpec, device: str, dtype: str = "auto", attn_implementation: str = "sdpa") -> LoadedModel:
    """The model on `device`, in eval mode, with its tokenizer; random weights when asked."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub that is not there
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # kvprof has its own progress display

    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if spec.weights == "real":
        model = AutoModelForCausalLM.from_pretrained(
            spec.path, dtype=torch_dtype, attn_implementation=attn_implementation
        ).to(torch_device)
    else:
        config_dict = dict(spec.config or {})
        model_type = config_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **config_dict)
        config._attn_implementation = attn_implementation
        with torch.device(torch_device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_path)
    # The parameters' device has its index ("cuda:0"), so tensors compare equal to it.
    return LoadedModel(model, tokenizer, next(model.parameters()).device, torch_dtype)
