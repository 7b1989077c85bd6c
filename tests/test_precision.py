import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, TrainerCallback

from nash.config import ConfigError, TrainSection, load_config
from nash.precision import PrecisionError, device_support, resolve
from nash.training import train_policy
from tests.test_training import changed_params, pairs

ROOT = Path(__file__).resolve().parent.parent
BF16_CPU = {"bf16": True, "fp16": False, "detail": "cpu AVX512 (avx512_bf16)"}
PLAIN_CPU = {"bf16": False, "fp16": False, "detail": "cpu AVX2"}
OLD_GPU = {"bf16": False, "fp16": True, "detail": "Tesla V100"}
NEW_GPU = {"bf16": True, "fp16": True, "detail": "NVIDIA H100"}


@pytest.mark.parametrize("device,support,expected", [
    ("cpu", BF16_CPU, "bf16"), ("cpu", PLAIN_CPU, "fp32"), ("cuda", OLD_GPU, "fp16"), ("cuda", NEW_GPU, "bf16"),
])
def test_auto_picks_what_the_device_computes_natively(device, support, expected):
    p = resolve("auto", device=device, support=support)
    assert p.compute == expected and p.weights == "float32" and p.drift == "fp32"
    assert p.inference_dtype == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[expected]
    assert support["detail"] in p.reason


def test_forced_values_win_and_an_emulated_one_is_warned_about(caplog):
    assert resolve("fp32", device="cpu", support=BF16_CPU).compute == "fp32"
    with caplog.at_level(logging.WARNING, logger="nash"):
        p = resolve("bf16", device="cpu", support=PLAIN_CPU)
    assert p.compute == "bf16" and "no native bf16" in caplog.text
    assert resolve("fp16", device="cuda", support=NEW_GPU).trainer_args() == {"bf16": False, "fp16": True}
    # bf16 autocast on a CPU needs HF's use_cpu; on CUDA it must not be set.
    assert resolve("bf16", device="cpu", support=BF16_CPU).trainer_args()["use_cpu"] is True
    assert "use_cpu" not in resolve("bf16", device="cuda", support=NEW_GPU).trainer_args()
    assert resolve("auto", drift="policy", device="cpu", support=BF16_CPU).drift_dtype == "bfloat16"


def test_half_weights_compute_in_their_own_dtype():
    assert resolve("auto", "bfloat16", device="cpu", support=PLAIN_CPU).compute == "bf16"
    assert resolve("auto", "float16", device="cuda", support=NEW_GPU).compute == "fp16"
    with pytest.raises(PrecisionError, match="policy.precision fp16 does not fit policy.dtype bfloat16"):
        resolve("fp16", "bfloat16", device="cuda", support=NEW_GPU)


def test_config_rejects_a_precision_that_does_not_fit_the_weights():
    with pytest.raises(ConfigError, match=r"policy.*precision fp32 does not fit dtype bfloat16"):
        load_config(ROOT / "configs" / "default.yaml", ["policy.precision=fp32", "policy.dtype=bfloat16"])
    with pytest.raises(ConfigError, match=r"policy\.precision"):
        load_config(ROOT / "configs" / "default.yaml", ["policy.precision=int8"])


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs /proc/cpuinfo")
def test_cpu_support_matches_the_cpu_flags():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert device_support("cpu")["bf16"] == bool(flags & {"avx512_bf16", "amx_tile"})


class _LinearDtypes(TrainerCallback):
    """Records the dtype a Linear layer computes in during training steps."""

    def __init__(self):
        self.seen = set()
        self.hooked = False

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if not self.hooked:
            layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
            layer.register_forward_hook(lambda mod, inp, out: self.seen.add(out.dtype))
            self.hooked = True


def _train(monkeypatch, tiny_model_dir, out, precision, callback):
    from nash import training

    cfg = TrainSection(learning_rate=1e-2, epochs=1, batch_size=2, max_length=64, warmup_ratio=0.0)
    build = training.build_trainer

    def with_callback(*a, **k):
        trainer = build(*a, **k)
        trainer.add_callback(callback)
        return trainer

    monkeypatch.setattr(training, "build_trainer", with_callback)
    return train_policy(tiny_model_dir, pairs(), out, cfg, precision=precision)


def test_bf16_mixed_training_step_keeps_float32_master_weights(monkeypatch, tiny_model_dir, tmp_path):
    rec = _LinearDtypes()
    out = tmp_path / "policy"
    metrics = _train(monkeypatch, tiny_model_dir, out, resolve("bf16", device="cpu"), rec)
    assert rec.seen == {torch.bfloat16}, f"the forward pass ran in {rec.seen}, not under bf16 autocast"
    assert metrics["precision"] == "bf16" and metrics["weights_dtype"] == "float32"
    assert math.isclose(metrics["first_step_loss"], math.log(2), rel_tol=1e-3)
    assert changed_params(tiny_model_dir, out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.float32 and torch.isfinite(reloaded(torch.tensor([[1, 2, 3]])).logits).all()


def test_fp32_training_step_computes_in_float32(monkeypatch, tiny_model_dir, tmp_path):
    rec = _LinearDtypes()
    _train(monkeypatch, tiny_model_dir, tmp_path / "policy", resolve("fp32", device="cpu"), rec)
    assert rec.seen == {torch.float32}


def test_bf16_weights_train_and_save_in_bf16(monkeypatch, tiny_model_dir, tmp_path):
    rec = _LinearDtypes()
    out = tmp_path / "policy"
    metrics = _train(monkeypatch, tiny_model_dir, out, resolve("auto", "bfloat16", device="cpu"), rec)
    assert rec.seen == {torch.bfloat16} and metrics["weights_dtype"] == "bfloat16"
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
