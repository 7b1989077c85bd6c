"""Numeric precision: which dtype each heavy stage computes in, chosen from the device.

`policy.precision` names the compute precision (`auto`, `bf16`, `fp16`, `fp32`); `policy.dtype`
names the weights that training updates and saves (float32 by default: master weights and
optimizer state in float32, so an update smaller than bf16's resolution is not lost).

- training: weights in `policy.dtype`, forward and backward under autocast in the compute
  precision (TRL's `bf16`/`fp16` arguments); the reference log-probabilities likewise.
- sampling, evaluation answers, local judges: the weights are loaded in the compute dtype
  (inference needs no master copy, and on CPUs with avx512_bf16 bf16 weights generate about
  1.8x faster than float32 ones, where autocast over float32 weights gains nothing).
- drift (KL, perplexity): `policy.drift_precision`, float32 by default, because bf16 rounds
  away the small weight updates whose size KL measures (see README: Precision).

`auto` takes bf16 on CUDA devices that have it and on CPUs with avx512_bf16 or AMX, fp16 on
older CUDA GPUs, float32 elsewhere.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields

from nash.errors import UserError

log = logging.getLogger("nash")

SETTINGS = ("auto", "bf16", "fp16", "fp32")
TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
COMPUTE_OF = {v: k for k, v in TORCH_DTYPE.items()}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_support(device: str) -> dict:
    """What the device computes natively: {'bf16': bool, 'fp16': bool, 'detail': str}."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
        return {"bf16": torch.cuda.is_bf16_supported(including_emulation=False), "fp16": True, "detail": name}
    caps = torch.backends.cpu.get_cpu_capability()
    flags = [f for f, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx", "_is_amx_tile_supported"))
             if getattr(torch.cpu, probe, lambda: False)()]
    return {"bf16": bool(flags), "fp16": False, "detail": f"cpu {caps}" + (f" ({', '.join(flags)})" if flags else "")}


@dataclass(frozen=True)
class Precision:
    setting: str      # what the config asked for
    compute: str      # bf16 | fp16 | fp32: the dtype matrix multiplies run in
    weights: str      # float32 | bfloat16 | float16: trained and saved weights
    drift: str        # bf16 | fp16 | fp32: KL and perplexity
    device: str
    reason: str

    @classmethod
    def from_record(cls, rec: dict) -> Precision:
        """The precision a manifest's `precision` record (see `describe`) was made from."""
        return cls(**{f.name: rec[f.name] for f in fields(cls)})

    @property
    def inference_dtype(self) -> str:
        """Weights dtype for stages that only run the model forward."""
        return TORCH_DTYPE[self.compute]

    @property
    def drift_dtype(self) -> str:
        return TORCH_DTYPE[self.drift]

    def trainer_args(self) -> dict:
        """TrainingArguments for the compute precision over `weights` (HF needs use_cpu for bf16 on CPU)."""
        args = {"bf16": self.compute == "bf16", "fp16": self.compute == "fp16" and self.weights == "float32"}
        if self.device == "cpu" and (args["bf16"] or args["fp16"]):
            args["use_cpu"] = True
        return args

    def describe(self) -> dict:
        """What each stage ran in, for the manifest."""
        mixed = self.weights == "float32" and self.compute != "fp32"
        train = (f"{self.compute} autocast, float32 master weights and optimizer state" if mixed
                 else f"{self.weights} weights")
        return {**asdict(self), "train": train, "reference_logps": f"{self.compute} autocast" if mixed else self.weights,
                "sampling": f"{self.inference_dtype} weights", "eval_answers": f"{self.inference_dtype} weights",
                "local_judges": f"{self.inference_dtype} weights", "kl": self.drift_dtype,
                "perplexity": self.drift_dtype, "saved_policy": self.weights}


class PrecisionError(UserError, ValueError):
    pass


def misfit(setting: str, weights: str, prefix: str = "") -> str | None:
    """Why a compute precision cannot run `weights` (half weights compute in their own dtype), or None."""
    half = COMPUTE_OF.get(weights)
    if half in (None, "fp32") or setting in ("auto", half):
        return None
    return (f"{prefix}precision {setting} does not fit {prefix}dtype {weights}: {weights} weights compute in "
            f"{half} (set {prefix}precision: {half} or auto)")


def resolve(setting: str = "auto", weights: str = "float32", drift: str = "fp32", device: str | None = None,
            support: dict | None = None) -> Precision:
    """The precision for `setting` on `device` (support: what device_support reports, for tests)."""
    if setting not in SETTINGS:
        raise PrecisionError(f"policy.precision: {setting!r} is not one of {', '.join(SETTINGS)}")
    device = device or default_device()
    support = support if support is not None else device_support(device)
    half = COMPUTE_OF.get(weights)
    if half is None:
        raise PrecisionError(f"policy.dtype: {weights!r} is not one of float32, bfloat16, float16")
    if setting == "auto":
        if half != "fp32":
            compute, reason = half, f"policy.dtype {weights}: weights are {half} already"
        elif support.get("bf16"):
            compute, reason = "bf16", f"{support.get('detail', device)} computes bf16 natively"
        elif support.get("fp16"):
            compute, reason = "fp16", f"{support.get('detail', device)} has fp16 but no bf16"
        else:
            compute, reason = "fp32", f"{support.get('detail', device)} has no native bf16 or fp16"
    else:
        compute, reason = setting, "forced by policy.precision"
        if error := misfit(setting, weights, "policy."):
            raise PrecisionError(error)
        if compute != "fp32" and not support.get(compute):
            log.warning("policy.precision %s: %s has no native %s; it is emulated and may be slower than fp32",
                        compute, support.get("detail", device), compute)
    drift_compute = compute if drift == "policy" else drift
    if drift_compute not in TORCH_DTYPE:
        raise PrecisionError(f"policy.drift_precision: {drift!r} is not one of fp32, policy")
    return Precision(setting, compute, weights, drift_compute, device, reason)


def for_config(cfg, device: str | None = None) -> Precision:
    p = cfg.policy
    return resolve(p.precision, p.dtype, p.drift_precision, device)
