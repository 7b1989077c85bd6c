"""vLLM as nash starts it: engine arguments, the interpreter and environment of the engine
process, what an engine's death means, and vLLM's OpenAI-compatible server for one policy.

Nothing here imports vLLM: engines run in child processes (nash/vllm_worker.py) under
`sampling.vllm.python`, supervised by nash.supervisor.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from nash.supervisor import Child


class EngineFailed(RuntimeError):
    pass


def vllm_engine_args(cfg, dtype: str, seed: int, gpu: bool) -> dict:
    """LLM()'s keyword arguments (and `vllm serve`'s flags) from a `sampling.vllm` section."""
    args = {"seed": seed, "dtype": dtype if cfg.dtype == "auto" else cfg.dtype,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization or (0.85 if gpu else 0.3),
            "enforce_eager": (not gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
            "generation_config": "vllm"}  # not the model's generation_config.json (vllm#15241)
    if not gpu:
        # Per-prompt seeds: when a chunked prefill discards a seeded request's token, vLLM rewinds
        # its generator, which CPU generators cannot do ("CPU Generator does not use offset").
        args["enable_chunked_prefill"] = False
    if cfg.max_model_len:
        args["max_model_len"] = cfg.max_model_len
    return {**args, **cfg.engine_args}


def visible_gpus() -> list[str] | None:
    """The CUDA devices this process may hand to engines, or None on a machine without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


def vllm_python(cfg) -> str:
    python = cfg.python or sys.executable
    if os.sep in python and not Path(python).exists():
        raise EngineFailed(f"sampling.vllm.python: {python} does not exist (install it with `make vllm`)")
    if os.sep not in python and shutil.which(python) is None:
        raise EngineFailed(f"sampling.vllm.python: {python} is not on PATH (install it with `make vllm`)")
    return python


def engine_devices(cfg, engines: int) -> list[str] | None:
    """The CUDA devices `engines` engines of `cfg.tensor_parallel_size` GPUs each are given; None without CUDA."""
    devices = visible_gpus()
    need = engines * cfg.tensor_parallel_size
    if devices is not None and len(devices) < need:
        raise EngineFailed(f"sampling.data_parallel: {engines} engines x sampling.vllm.tensor_parallel_size "
                           f"{cfg.tensor_parallel_size} need {need} GPUs; {len(devices)} visible")
    return devices


def check_engine(cfg, data_parallel: int) -> None:
    """Before the first stage: the engine's interpreter is there, and so are the GPUs it is given."""
    from nash.errors import UserError

    try:
        vllm_python(cfg)
        engine_devices(cfg, data_parallel)
    except EngineFailed as e:
        raise UserError(str(e)) from None


def vllm_env(cfg, gpu: bool) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **cfg.env}
    if not gpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return env


WORKER = str(Path(__file__).with_name("vllm_worker.py"))


def engine_failure(what: str, log: Path, rc: int | None, tail) -> str:
    """One message for an engine that died: the config key most likely at fault, its status, its log's end."""
    lines = [t for t in tail if t.strip()]
    errors = [t for t in lines if re.search(r"\w(Error|Exception)\b.*:|error: ", t)]
    if errors:  # the engine's own error first: shutdown messages follow it in the log
        lines = [errors[-1]] + [t for t in lines if t != errors[-1]]
    key = "sampling.vllm"
    text = "\n".join(lines) if errors else ""  # a killed engine's log names no culprit
    if "No module named 'vllm'" in text:
        key = "sampling.vllm.python"
    elif any(s in text for s in ("does not appear to have", "not a valid model", "Repo id", "No such file",
                                 "is not a local folder")):
        key = "policy.model"
    elif any(s in text for s in ("unexpected keyword argument", "got an unexpected", "unrecognized arguments")):
        key = "sampling.vllm.engine_args"
    elif "max_model_len" in text:
        key = "sampling.vllm.max_model_len"
    elif re.search(r"out of memory|OutOfMemory|memory for the cache|KV cache|insufficient memory", text, re.I):
        key = "sampling.vllm.gpu_memory_utilization"
    how = f"exited with status {rc}"
    if rc == -signal.SIGKILL and not errors:
        how += " (SIGKILL: the kernel's out-of-memory killer, or a person)"
    return (f"{key}: the vLLM engine of {what} {how}; see {log}:\n  "
            + "\n  ".join(lines[:1] + lines[-11:] if errors else lines[-12:]))


class VLLMServer:
    """vLLM's OpenAI-compatible server for one policy, on loopback, for as long as a stage needs it.

    The self judge sends it many requests at once, so the engine batches them as it batches
    samples. It runs as the worker in `--serve` mode in its own process group, which is killed
    on close, failure or exit; it and its engine core die with this process.
    """

    NAME = "policy"  # the model name the server answers to

    def __init__(self, model_path: str, cfg, dtype: str, work_dir: Path, seed: int = 0):
        self.model_path, self.cfg, self.dtype, self.seed = model_path, cfg, dtype, seed
        self.work_dir = Path(work_dir)
        self.child: Child | None = None
        self.base_url = ""
        self.info: dict = {}

    def start(self) -> VLLMServer:
        import socket
        import urllib.request

        python, devices = vllm_python(self.cfg), visible_gpus()
        env = vllm_env(self.cfg, devices is not None)
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[: self.cfg.tensor_parallel_size])
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        engine = vllm_engine_args(self.cfg, self.dtype, self.seed, devices is not None)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        job_path, log_path = self.work_dir / "server.job.json", self.work_dir / "server.log"
        job_path.write_text(json.dumps({"model": self.model_path, "host": "127.0.0.1", "port": port,
                                        "served_model_name": self.NAME, "engine": engine}))
        t0 = time.monotonic()
        self.child = Child([python, WORKER, "--serve", str(job_path)], log_path, env).pump_in_background()
        try:
            while True:
                if self.child.poll() is not None:
                    self.child.join_output()
                    raise EngineFailed(engine_failure("the judge's server", log_path, self.child.returncode,
                                                      self.child.tail))
                if time.monotonic() - t0 > self.cfg.start_timeout_s:
                    raise EngineFailed(f"sampling.vllm.start_timeout_s: the judge's server did not answer within "
                                       f"{self.cfg.start_timeout_s} s; see {log_path}")
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                time.sleep(0.5)
        except BaseException:
            self.close()
            raise
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.info = {"backend": "vllm-server", "engine_args": engine, "engine_start_seconds": round(time.monotonic() - t0, 2)}
        return self

    def close(self) -> None:
        if self.child is not None:
            self.child.kill()
            self.child = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
