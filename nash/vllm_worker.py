"""One vLLM sampling shard, in its own process: `python vllm_worker.py JOB.json`; or, with
`--serve JOB.json`, vLLM's OpenAI-compatible server for the policy (the self judge's backend).

Standalone on purpose: it imports only the standard library and vLLM, so it runs under the
interpreter of a separate environment (`sampling.vllm.python`) where nash is not installed.

The job names the model, the prompts as chat messages, the sampling parameters, the engine
arguments and the output path. The worker writes one JSON line per prompt to OUT.partial,
renames it to OUT when every prompt is done, then writes OUT.done with the shard's figures
(vLLM version, engine arguments, sampling parameters, engine start seconds, throughput).
Progress goes to stdout as `nash-progress DONE TOTAL` lines. The process dies with its
parent (PR_SET_PDEATHSIG), and so does the engine core it starts, so an engine never outlives
the stage that started it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

PROGRESS_TAG = "nash-progress"  # nash.supervisor reads it
CHUNK = 256  # prompts per LLM.chat call: the engine batches within it; progress is reported between


def die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


# At import, not in main(): vLLM's engine core is a child process, and a spawned child imports
# this file again (as __mp_main__) while a forked one runs the fork hook, so it dies with the
# worker too instead of living on as an orphan holding the model's memory.
die_with_parent()
os.register_at_fork(after_in_child=die_with_parent)


def main(job_path: str) -> int:
    job = json.loads(open(job_path, encoding="utf-8").read())
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], **job["engine"])
    engine_seconds = time.perf_counter() - t0
    # A seed per prompt, from the prompt's index in the whole stage: its K samples do not depend
    # on the shard it falls in, on the batch around it, or on a resumed shard starting later.
    def params(p):
        return SamplingParams(**job["sampling"], seed=job["seed"] + p["index"])

    prompts = job["prompts"]
    out, partial = job["out"], job["out"] + ".partial"
    t1, n_seq, n_tok = time.perf_counter(), 0, 0
    with open(partial, "w", encoding="utf-8") as f:
        for start in range(0, len(prompts), CHUNK):
            chunk = prompts[start : start + CHUNK]
            results = llm.chat([p["messages"] for p in chunk], [params(p) for p in chunk], use_tqdm=False)
            for p, r in zip(chunk, results):
                outs = [{"text": o.text, "num_tokens": len(o.token_ids), "finish_reason": o.finish_reason}
                        for o in r.outputs]
                n_seq += len(outs)
                n_tok += sum(o["num_tokens"] for o in outs)
                f.write(json.dumps({"index": p["index"], "prompt_tokens": len(r.prompt_token_ids or []),
                                    "completions": outs}) + "\n")
            f.flush()
            print(f"{PROGRESS_TAG} {start + len(chunk)} {len(prompts)}", flush=True)
        os.fsync(f.fileno())
    gen_seconds = time.perf_counter() - t1
    os.replace(partial, out)
    figures = {
        "vllm_version": vllm.__version__,
        "engine_args": job["engine"],
        "sampling_params": {**job["sampling"], "seed": f"{job['seed']} + prompt index"},
        "prompts": len(prompts),
        "sequences": n_seq,
        "tokens": n_tok,
        "engine_start_seconds": round(engine_seconds, 2),
        "generate_seconds": round(gen_seconds, 2),
        "sequences_per_second": round(n_seq / gen_seconds, 3) if gen_seconds else None,
        "tokens_per_second": round(n_tok / gen_seconds, 1) if gen_seconds else None,
    }
    with open(out + ".done", "w", encoding="utf-8") as f:
        f.write(json.dumps(figures, indent=1))
        f.flush()
        os.fsync(f.fileno())
    return 0


def cli_args(engine: dict) -> list[str]:
    """Engine arguments as `vllm serve` flags (the same names as LLM()'s keywords)."""
    out = []
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + key.replace("_", "-"))
        elif value is not None:
            out += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return out


def serve(job_path: str) -> int:
    """vLLM's OpenAI-compatible server for the policy, on loopback, until the parent kills it.

    Run from this file so that the engine core it starts imports this module, and dies with it.
    """
    job = json.loads(open(job_path, encoding="utf-8").read())
    sys.argv = ["vllm-serve", "--model", job["model"], "--host", job["host"], "--port", str(job["port"]),
                "--served-model-name", job["served_model_name"], *cli_args(job["engine"])]
    try:
        from vllm.entrypoints.launchers.api_server.entry import main as serve_main
    except ImportError:  # vLLM before its launchers package
        import runpy

        runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__")
        return 0
    serve_main()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        sys.exit(serve(sys.argv[2]))
    sys.exit(main(sys.argv[1]))
