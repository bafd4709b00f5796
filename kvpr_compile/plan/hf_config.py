"""A model shape (`arch_presets.Arch`) from a local Hugging Face ``config.json``, for
`kvpr plan --hf-config`: nothing is downloaded, the file is read as JSON.

Field names differ by family (``n_embd`` for GPT-2, ``ffn_dim`` for OPT); where transformers
knows the ``model_type`` its config class maps them (``AutoConfig.for_model``), else the plain
names and a few aliases are read. The MLP is taken as gated (gate/up/down, Llama, Mistral,
Qwen2) unless the family is one with two MLP matrices (``TWO_MATRIX_MLP``).
"""
from __future__ import annotations

import json
from pathlib import Path

from .arch_presets import Arch

TWO_MATRIX_MLP = frozenset({"opt", "gpt2", "gpt_neox", "gptj", "gpt_bigcode", "bloom", "falcon",
                            "phi", "mpt", "codegen"})
DTYPES = ("float16", "bfloat16", "float32")
_ALIASES = {   # the name a plan needs -> the names configs use for it, first found wins
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "multi_query_group_num"),
    "intermediate_size": ("intermediate_size", "ffn_dim", "n_inner"),
    "head_dim": ("head_dim",),
}


def config_path(path: str | Path) -> Path:
    """``path`` itself, or ``path/config.json`` for a model directory."""
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def load_config(path: str | Path) -> dict:
    """The config's fields as a dict (a multimodal config's ``text_config``); ValueError with
    the path when there is no file or it is not a JSON object."""
    file = config_path(path)
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"--hf-config: no config file at {str(file)!r}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--hf-config: {str(file)!r} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--hf-config: {str(file)!r} is not a JSON object")
    return data.get("text_config") if isinstance(data.get("text_config"), dict) else data


def _normalised(data: dict):
    """transformers' config object for the dict where it knows the model type (its
    attribute_map turns family names into the common ones), else None."""
    model_type = data.get("model_type")
    if not model_type:
        return None
    try:
        from transformers import AutoConfig
        fields = {k: v for k, v in data.items() if k != "model_type"}
        return AutoConfig.for_model(model_type, **fields)
    except (ImportError, ValueError, KeyError, TypeError):
        return None


def _field(data: dict, config, name: str):
    for key in _ALIASES[name]:
        value = getattr(config, key, None) if config is not None else None
        if value is None:
            value = data.get(key)
        if value is not None:
            return value
    return None


def arch_from_config(path: str | Path) -> tuple[Arch, str | None]:
    """(the shape, the config's dtype if it names one of DTYPES, else None)."""
    data = load_config(path)
    config = _normalised(data)
    got = {name: _field(data, config, name) for name in _ALIASES}
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(got[name], int) or got[name] < 1:
            raise ValueError(f"--hf-config: {str(config_path(path))!r} has no positive integer "
                             f"{' / '.join(_ALIASES[name])}")
    hidden, heads = got["hidden_size"], got["num_attention_heads"]
    kv_heads = got["num_key_value_heads"] or heads
    head_dim = got["head_dim"] or hidden // heads
    model_type = str(data.get("model_type") or "unknown")
    intermediate = got["intermediate_size"] or 4 * hidden
    name = str(data.get("_name_or_path") or f"{model_type} ({config_path(path)})")
    arch = Arch(name, hidden, heads, kv_heads, head_dim, got["num_hidden_layers"], intermediate,
                model_type not in TWO_MATRIX_MLP)
    dtype = data.get("dtype") or data.get("torch_dtype")
    return arch, dtype if dtype in DTYPES else None
