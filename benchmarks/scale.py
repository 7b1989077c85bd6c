"""One DNO-shaped iteration at 1k, 10k and 100k prompts x (5 samples + gold), through `nash run`.

    python benchmarks/scale.py [--prompts 1000 10000 100000] [--resume-at 10000] [--out FILE]

Sampling (`sampling.backend: openai`, n=5, plus each prompt's gold answer) and batched judging
(`judge.kind: openai`, DNO's 6-point rubric, one request per prompt) go to an OpenAI-compatible
server on loopback that answers at once, in this process; so what is measured is nash's own
cost. The judge's replies carry a 40-word justification per candidate, about GPT-4-Turbo's.
It scores every candidate 3 but for one prompt in 200 (the first candidate 6, the second 1), so
the iteration keeps about N/200 pairs and trains the tiny random policy on them. Evaluation:
32 held-out prompts.

Per stage: wall seconds and nash's CPU seconds (from the manifest: the run process and the
children it reaped), CPU milliseconds per candidate, and the peak resident memory of nash's
process tree (`nash run`, Prefect's temporary server, the training worker) sampled every 0.2 s
while the stage ran. File sizes at the end. With --resume-at N: the same iteration at N prompts
is killed (SIGKILL, whole process group) when judgments.jsonl holds half the candidates, then
started again: seconds until judging asks its next request, and the judge requests paid twice.
Writes results/scale.json.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import Interval, describe  # noqa: E402
from tests.openai_server import OpenAIServer, default_reply  # noqa: E402

K = 5
EVAL_PROMPTS = 32
JUSTIFICATION = " ".join(["The answer addresses the instruction and is mostly accurate"] * 4)  # ~40 words


class Counting(OpenAIServer):
    """The loopback server, counting requests instead of keeping them (100k bodies would be gigabytes)."""

    def __init__(self):
        self.counts = {"sample_choices": 0, "judge": 0, "annotate": 0}
        self.judged: dict[str, int] = {}
        self._n = itertools.count()
        super().__init__(responder=self.reply)
        self.requests = _Discard()

    def reply(self, prompt: str) -> str:
        if "<id>_score" in prompt:
            ids = re.findall(r"\[Candidate ([A-Z])\]", prompt)
            key = "q" + re.search(r"Question (\d+):", prompt).group(1)
            with self.lock:
                self.counts["judge"] += 1
                self.judged[key] = self.judged.get(key, 0) + 1
            lucky = is_lucky(key)
            scores = {cid: 3 for cid in ids}
            if lucky:
                scores[ids[0]], scores[ids[1]] = 6, 1
            return json.dumps({k: v for cid in ids for k, v in ((f"{cid}_justification", JUSTIFICATION),
                                                                 (f"{cid}_score", scores[cid]))})
        if "Better:" in prompt:
            with self.lock:
                self.counts["annotate"] += 1
            return default_reply(prompt)
        with self.lock:
            self.counts["sample_choices"] += 1
        k = next(self._n)
        return f"Answer {k % 97}: " + " ".join(["a plain sentence about the request"] * (1 + k % 5)) + "."


def is_lucky(prompt_id: str) -> bool:
    """The prompts whose first candidate the server scores 6 and second 1: one in 200."""
    return int(hashlib.sha256(prompt_id.encode()).hexdigest(), 16) % 200 == 0


class _Discard(list):
    def append(self, item):  # the base server records every request here
        pass


def write_prompts(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n + EVAL_PROMPTS):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"Question {i}: explain item {i} in two sentences.",
                                "reference": f"Item {i} is a thing. It is used every day.",
                                "split": "train" if i < n else "eval"}) + "\n")


def overrides(n: int, url: str, prompts: Path, policy: str) -> list[str]:
    return [
        f"run.name=scale-{n}", "run.iterations=1", f"policy.model={policy}", "policy.precision=fp32",
        f"prompts.source={prompts}", f"prompts.partition_size={n}",
        "sampling.backend=openai", f"sampling.server.base_url={url}", "sampling.server.concurrency=16",
        f"sampling.n={K}", "sampling.include_reference=true", "sampling.max_new_tokens=64",
        "judge={kind: openai, protocol: batched, model: gpt-4-turbo, concurrency: 16}", f"judge.base_url={url}",
        "pairs.rule=dno", "pairs.min_chosen_score=5", "pairs.min_margin=2", "pairs.per_prompt=best",
        "train.batch_size=8", "train.epochs=1", "train.max_length=96", "train.kl_prompts=4", "eval.retention=null",
        f"eval.num_prompts={EVAL_PROMPTS}", "eval.max_new_tokens=32", "eval.drift_prompts=4", "eval.gate=null",
    ]


class Tree:
    """Memory of a process and its descendants, sampled every `period` seconds.

    PSS (proportional set size) counts a page shared by several processes (torch's libraries,
    mapped by the run and its training worker alike) once, split between them, so the sum over
    the tree is the memory the tree really holds; RSS summed over processes counts shared pages
    once per process. Both are kept, with each process's share by role.
    """

    def __init__(self, pid: int, period: float = 0.2):
        import psutil

        self.root, self.period, self.samples = psutil.Process(pid), period, []
        self.roles: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss = pss = 0
            by_role: dict[str, int] = {}
            for p in procs:
                try:
                    m = p.memory_full_info()
                    role = _role(p)
                except psutil.NoSuchProcess:
                    continue
                rss, pss = rss + m.rss, pss + m.pss
                by_role[role] = by_role.get(role, 0) + m.pss
                peak = self.roles.setdefault(role, {"rss": 0, "pss": 0})
                peak["rss"], peak["pss"] = max(peak["rss"], m.rss), max(peak["pss"], m.pss)
            self.samples.append((time.time(), rss, pss, by_role))
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def peak(self, t0: float | None = None, t1: float | None = None, kind: str = "pss") -> int:
        i = 2 if kind == "pss" else 1
        inside = [s[i] for s in self.samples if (t0 is None or s[0] >= t0) and (t1 is None or s[0] <= t1)]
        return max(inside, default=0)

    def at_peak(self, t0: float | None = None, t1: float | None = None) -> dict[str, int]:
        """Each process's PSS at the moment the tree's PSS peaked."""
        inside = [s for s in self.samples if (t0 is None or s[0] >= t0) and (t1 is None or s[0] <= t1)]
        return max(inside, key=lambda s: s[2])[3] if inside else {}


def _role(p) -> str:
    cmd = " ".join(p.cmdline())
    for key, role in (("nash.train_worker", "training worker"), ("nash.lifeline", "lifeline"),
                      ("prefect", "prefect server"), ("nash.flows.cli", "nash run")):
        if key in cmd:
            return role
    return p.name()


class _reaped:
    """The run's process group is killed if the benchmark stops first (it runs in a session of its own)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def __enter__(self):
        return self.proc

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def nash_run(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nash.flows.cli", "run", str(ROOT / "configs" / "default.yaml"),
                             *args], cwd=ROOT, env=env, start_new_session=True, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT)


def sets(n, url, prompts, policy, runs, extra=()) -> list[str]:
    return ["--runs-dir", str(runs), *[x for o in [*overrides(n, url, prompts, policy), *extra] for x in ("--set", o)]]


def one_size(n: int, server: Counting, tmp: Path, policy: str, extra=()) -> dict:
    prompts = tmp / f"prompts-{n}.jsonl"
    write_prompts(prompts, n)
    runs, cache = tmp / "runs", tmp / f"cache-{n}"
    env = {**os.environ, "OPENAI_API_KEY": "sk-loopback", "NASH_CACHE": str(cache), "TQDM_DISABLE": "1"}
    before = dict(server.counts)
    with Interval() as whole:
        proc = nash_run(sets(n, server.url, prompts, policy, runs, extra), env, tmp / f"run-{n}.log")
        with Tree(proc.pid) as tree, _reaped(proc):
            rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"nash run at {n} prompts exited {rc}; see {tmp / f'run-{n}.log'}")
    it = runs / f"scale-{n}" / "iter_001"
    manifest = json.loads((it / "manifest.json").read_text())
    candidates = n * (K + 1)
    stages = {}
    for name, s in manifest["stages"].items():
        t0 = s.get("started_at")
        stages[name] = {"wall_s": s["seconds"], "cpu_s": s.get("cpu_seconds"),
                        "cpu_ms_per_candidate": round(1000 * s["cpu_seconds"] / candidates, 3)
                        if s.get("cpu_seconds") is not None else None,
                        **({"peak_pss_mib": round(tree.peak(t0, t0 + s["seconds"] + tree.period) / 2**20),
                            "peak_rss_sum_mib": round(tree.peak(t0, t0 + s["seconds"] + tree.period, "rss") / 2**20),
                            "at_peak_pss_mib": {r: round(v / 2**20) for r, v in
                                                tree.at_peak(t0, t0 + s["seconds"] + tree.period).items()}}
                           if t0 else {})}
    sizes = {f: (it / f).stat().st_size for f in ("samples.jsonl", "judgments.jsonl", "pairs.jsonl", "manifest.json")}
    sizes["judgment_cache"] = sum(p.stat().st_size for p in (cache / "judgments").glob("*.sqlite*"))
    return {"prompts": n, "candidates": candidates, **whole.record(),
            "cpu_ms_per_candidate": round(1000 * whole.cpu / candidates, 3),
            "peak_pss_mib": round(tree.peak() / 2**20), "peak_rss_sum_mib": round(tree.peak(kind="rss") / 2**20),
            "peak_by_process_mib": {r: {k: round(v / 2**20) for k, v in m.items()} for r, m in tree.roles.items()},
            "stages": stages, "bytes": sizes,
            "pairs": manifest.get("pairs", {}).get("pairs"),
            "requests": {k: server.counts[k] - before[k] for k in server.counts}}


def resume(n: int, server: Counting, tmp: Path, policy: str) -> dict:
    """Kill the iteration when judgments.jsonl holds half the candidates; start it again."""
    prompts = tmp / f"prompts-resume-{n}.jsonl"
    write_prompts(prompts, n)
    runs, cache = tmp / "runs-resume", tmp / f"cache-resume-{n}"
    env = {**os.environ, "OPENAI_API_KEY": "sk-loopback", "NASH_CACHE": str(cache), "TQDM_DISABLE": "1"}
    args = sets(n, server.url, prompts, policy, runs)
    judgments = runs / f"scale-{n}" / "iter_001" / "judgments.jsonl"
    server.judged.clear()
    proc = nash_run(args, env, tmp / f"resume-{n}.log")
    half = n * (K + 1) // 2
    with _reaped(proc):
        while not (judgments.is_file() and _lines(judgments) >= half):
            if proc.poll() is not None:
                raise SystemExit(f"finished before judging was half done; see {tmp / f'resume-{n}.log'}")
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    kept = _lines(judgments)
    asked = server.counts["judge"]
    t0 = time.time()
    proc = nash_run(args, env, tmp / f"resume-{n}.log")
    with _reaped(proc):
        while server.counts["judge"] == asked:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        first_request_s = time.time() - t0
        rc = proc.wait()
    repaid = sum(c - 1 for c in server.judged.values() if c > 1)
    return {"prompts": n, "killed_with_judgment_lines": kept, "restart_to_first_judge_request_s": round(first_request_s, 1),
            "judge_requests_repaid": repaid, "rc": rc, "total_seconds_after_restart": round(time.time() - t0, 1)}


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def tiny_policy(path: Path) -> str:
    """A 2-layer randomly initialised Llama with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from nash.policy import embedded_gguf_path

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--resume-at", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nash-scale-"))
    policy = tiny_policy(tmp / "policy")
    result = {"machine": describe(), "k": K, "sizes": [], "resume": None, "work_dir": str(tmp)}
    with Counting() as server:
        for n in args.prompts:
            row = one_size(n, server, tmp, policy)
            result["sizes"].append(row)
            print(json.dumps(row), flush=True)
        if args.resume_at:
            result["resume"] = resume(args.resume_at, server, tmp, policy)
            print(json.dumps(result["resume"]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
