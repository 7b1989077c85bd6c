import pytest

from nash.policy import EMBEDDED, PolicyError, resolve_policy


def test_local_directory_and_hub_id(tiny_model_dir, tmp_path):
    assert resolve_policy(tiny_model_dir) == tiny_model_dir
    assert resolve_policy("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(PolicyError, match="has no config.json"):
        resolve_policy(str(tmp_path))
    with pytest.raises(PolicyError, match="directory not found: ./missing"):
        resolve_policy("./missing")


def test_embedded_default_is_converted_once_into_a_plain_hf_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("NASH_CACHE", str(tmp_path))
    path = resolve_policy(EMBEDDED)
    assert path == str(tmp_path / "models" / "smollm2-135m-instruct")
    import json

    config = json.loads((tmp_path / "models" / "smollm2-135m-instruct" / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    mtime = (tmp_path / "models" / "smollm2-135m-instruct" / "model.safetensors").stat().st_mtime
    assert resolve_policy(EMBEDDED) == path  # reused, not converted again
    assert (tmp_path / "models" / "smollm2-135m-instruct" / "model.safetensors").stat().st_mtime == mtime
