"""kill -9 inside every stage of an iteration of the embedded default, then the same command.

    python benchmarks/crash_resume.py [--prompts 16] [--latency 0.5]

SmolLM2-135M with an `openai` judge on a loopback OpenAI-compatible server that answers each
request after `--latency` seconds (judge.concurrency 4). One iteration runs straight; a
second, same config and seeds, is killed with SIGKILL (the whole process group) once in
sampling, judging, training and the evaluation's annotation, and resumed after each kill.
Reports the wall time of both, the requests each paid, duplicate records, and which files
are byte-identical to the straight run's. Writes results/crash_resume.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import Interval, describe  # noqa: E402
from nash.records import Judgment, read_jsonl  # noqa: E402
from nash.registry import IterationDir, sha256_file  # noqa: E402
from tests.crash import kill_when, lines, make_run, start, verdicts  # noqa: E402
from tests.openai_server import OpenAIServer, default_reply  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--latency", type=float, default=0.5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "crash_resume.json"))
    args = ap.parse_args()
    overrides = [f"prompts.partition_size={args.prompts}", f"eval.num_prompts={args.prompts}",
                 "sampling.batch_size=16", "eval.drift_prompts=8"]

    def reply(prompt):
        time.sleep(args.latency)
        return default_reply(prompt)

    tmp = Path(tempfile.mkdtemp(prefix="nash-crash-"))
    result = {"machine": describe(), "prompts": args.prompts, "latency_s": args.latency, "kills": []}
    with OpenAIServer(responder=reply) as server:
        ref = make_run(tmp / "runs", "straight", overrides, server.url)
        with Interval() as t:
            assert start(ref, tmp / "cache-straight").wait() == 0
        result["straight"] = {**t.record(), "requests": len(server.requests)}
        server.requests.clear()

        run = make_run(tmp / "runs", "killed", overrides, server.url)
        it, cache = IterationDir(run, 1), tmp / "cache-killed"
        annotations = it.eval_dir / "vs_reference" / "judgments.jsonl"
        train_log = it.path / "train.log"
        points = [
            ("sampling", lambda: lines(it.path / "sampling" / "batches.jsonl") >= 2),
            ("judging", lambda: lines(it.judgments) >= args.prompts // 2),
            ("training", lambda: train_log.is_file() and "'loss'" in train_log.read_text()),
            ("annotation", lambda: lines(annotations) >= args.prompts),
        ]
        with Interval() as t:
            for name, ready in points:
                before = len(server.requests)
                p = start(run, cache)
                kill_when(p, ready, name, timeout=3600)
                result["kills"].append({"stage": name, "requests_before_kill": len(server.requests) - before})
            assert start(run, cache).wait() == 0
        result["killed"] = {**t.record(), "requests": len(server.requests)}

    straight = IterationDir(ref, 1)
    files = ["samples.jsonl", "pairs.jsonl", "eval/samples.jsonl", "policy/model.safetensors"]
    result["identical_files"] = {f: sha256_file(it.path / f) == sha256_file(straight.path / f) for f in files}
    result["same_verdicts"] = {
        "judgments": verdicts(it.judgments) == verdicts(straight.judgments),
        "annotations": verdicts(annotations) == verdicts(straight.eval_dir / "vs_reference" / "judgments.jsonl")}
    result["duplicate_records"] = {}
    for name, path in (("judgments", it.judgments), ("annotations", annotations)):
        recs = read_jsonl(path, Judgment)
        result["duplicate_records"][name] = len(recs) - len({(j.prompt_id, j.candidate, j.other) for j in recs})
    result["requests_repaid"] = result["killed"]["requests"] - result["straight"]["requests"]
    result["complete"] = it.complete
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
