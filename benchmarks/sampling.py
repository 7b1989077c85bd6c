"""Sampling throughput and memory: nash's transformers backend against its vLLM backend.

    python benchmarks/sampling.py [--prompts 64] [--n 4] [--max-new-tokens 96] [--precision auto]
                                  [--vllm-python .venv-vllm/bin/python] [--agreement 64]

Both backends sample the same training prompts of the embedded default (or --model) with the
same parameters, each in a fresh process, as the sample stage does. For each: sequences and
tokens per second of generation, engine start (model load for transformers), the peak memory of
the sampling process and everything it started (RSS summed over the process tree; GPU memory in
use, where nvidia-smi answers), and that memory once the stage has returned, against the
process's baseline before it began. Then, with --agreement N, both answer N held-out prompts at
temperature 0: the share of identical answers, and of answers identical in their first 20 words.
Runs unchanged on a GPU machine. Writes results/sampling_<precision>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import Interval, describe  # noqa: E402

MIB = 1024 * 1024


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def gpu_used() -> int | None:
    """Bytes of GPU memory in use on all devices, or None without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True)
    return sum(int(x) for x in out.stdout.split()) * MIB if out.returncode == 0 else None


def child(args) -> None:
    """One backend in this process, as the sample stage runs it; reports on stdout, waits for stdin."""
    from nash.config import load_config
    from nash.policy import resolve_policy
    from nash.precision import resolve
    from nash.prompts import builtin_prompts
    from nash.sampling import SamplingParams, build_sampler

    cfg = load_config(ROOT / "configs" / "default.yaml",
                      [f"sampling.backend={args.child}", f"sampling.vllm.python={args.vllm_python}"])
    model = resolve_policy(args.model)
    dtype = resolve(args.precision).inference_dtype
    prompts = [p for p in builtin_prompts() if p.split == ("eval" if args.greedy else "train")][: args.prompts]
    params = SamplingParams(n=1 if args.greedy else args.n, temperature=0.0 if args.greedy else 1.0,
                            max_new_tokens=args.max_new_tokens, seed=1)
    print(json.dumps({"event": "baseline"}), flush=True)
    sys.stdin.readline()  # the parent has taken the baseline
    t0 = time.perf_counter()
    sampler = build_sampler(cfg.sampling, model, dtype, Path(args.work))
    load = time.perf_counter() - t0
    out = sampler.generate([p.text for p in prompts], params, show_progress=False)
    info = dict(sampler.info)
    if args.child == "transformers":
        info["engine_start_seconds"] = round(load, 2)  # model load: this backend's start
    info["stage_seconds"] = round(time.perf_counter() - t0, 2)
    del sampler
    gc.collect()
    if args.greedy:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        Path(args.work, "answers.json").write_text(json.dumps([cs[0].text for cs in out]))
    print(json.dumps({"event": "done", "info": info}), flush=True)
    sys.stdin.readline()  # the parent has measured what the stage left behind


def run_backend(backend: str, args, greedy: bool, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", backend, "--work", str(work), "--model", args.model,
           "--precision", args.precision, "--vllm-python", args.vllm_python, "--n", str(args.n),
           "--max-new-tokens", str(args.max_new_tokens),
           "--prompts", str(args.agreement if greedy else args.prompts)] + (["--greedy"] if greedy else [])
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    peak, peak_gpu, stop = [0], [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            g = gpu_used()
            if g is not None:
                peak_gpu[0] = max(peak_gpu[0], g)
            stop.wait(0.25)

    def event():
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{backend}: the benchmark's child exited with status {proc.wait()}")
        return json.loads(line)

    try:
        with Interval() as span:
            event()  # baseline: imports done, nothing of the stage yet
            base, base_gpu = tree_rss(proc.pid), gpu_used()
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            proc.stdin.write("\n")
            proc.stdin.flush()
            info = event()["info"]
            stop.set()
            watcher.join()
            time.sleep(1.0)
            after, after_gpu = tree_rss(proc.pid), gpu_used()
            proc.stdin.write("\n")
            proc.stdin.flush()
            proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    figures = {k: info.get(k) for k in ("engine_start_seconds", "generate_seconds", "stage_seconds", "sequences",
                                        "tokens", "sequences_per_second", "tokens_per_second", "vllm_version")}
    figures.update({
        "baseline_rss_mib": round(base / MIB), "peak_rss_mib": round(peak[0] / MIB),
        "rss_after_stage_mib": round(after / MIB), "rss_left_over_mib": round((after - base) / MIB),
        **span.record(),
    })
    if base_gpu is not None:
        figures.update({"gpu_baseline_mib": round(base_gpu / MIB), "gpu_peak_mib": round(peak_gpu[0] / MIB),
                        "gpu_after_stage_mib": round(after_gpu / MIB),
                        "gpu_left_over_mib": round((after_gpu - base_gpu) / MIB)})
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=64, help="training prompts sampled; 0: only the agreement")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--precision", default="auto", help="policy.precision: auto, bf16, fp16 or fp32")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--agreement", type=int, default=64, help="held-out prompts answered at temperature 0; 0: skip")
    ap.add_argument("--backends", default="transformers,vllm")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--greedy", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from nash.precision import resolve

    precision = resolve(args.precision)
    result = {"machine": describe(), "gpu": gpu_used() is not None, "model": args.model,
              "precision": precision.describe(), "prompts": args.prompts, "n": args.n,
              "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "backends": {}}
    backends = args.backends.split(",")
    root = Path(tempfile.mkdtemp(prefix="nash-sampling-bench-"))
    for backend in backends if args.prompts else []:  # --prompts 0: the agreement alone
        print(f"{backend}: sampling {args.prompts} prompts x {args.n}", file=sys.stderr)
        result["backends"][backend] = run_backend(backend, args, False, root / backend)
        print(json.dumps(result["backends"][backend]), file=sys.stderr)
    if args.agreement and len(backends) == 2:
        answers = {}
        for backend in backends:
            print(f"{backend}: {args.agreement} held-out prompts at temperature 0", file=sys.stderr)
            fig = run_backend(backend, args, True, root / f"{backend}-greedy")
            answers[backend] = json.loads((root / f"{backend}-greedy" / "answers.json").read_text())
            result["backends"].setdefault(backend, {})["greedy"] = fig
        a, b = answers[backends[0]], answers[backends[1]]
        same = sum(x == y for x, y in zip(a, b))
        head = sum(x.split()[:20] == y.split()[:20] for x, y in zip(a, b))
        result["greedy_agreement"] = {"prompts": len(a), "identical": same, "identical_share": round(same / len(a), 3),
                                      "first_20_words_identical_share": round(head / len(a), 3),
                                      "examples_that_differ": [{backends[0]: x, backends[1]: y}
                                                               for x, y in zip(a, b) if x != y][:3]}
    shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"sampling_{precision.compute}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
