"""The judge stage's wall and CPU time, prompt by prompt ("before") against chunks of prompts ("after").

    python benchmarks/judge_stage.py [--work DIR] [--before-tree DIR] [--repeats N] [--judges composite,self]

Samples once, as `nash run configs/default.yaml` does (the embedded SmolLM2-135M-Instruct,
64 prompts x 4 candidates; kept in --work and reused by the next invocation), then judges
those candidates in a child process per measurement, with

- composite: the default's judge (quality gate x rules; MiniLM embeds 64 texts a pass);
- self: `judge.kind: self`, the policy judging itself, weighted pointwise, batch_size 16.

"before" judges prompt by prompt, as nash did before `score_batch`: with --before-tree, the
code of that tree (e.g. `git worktree add /tmp/before <commit>`; its `judges/` is linked as
`nash/judges` so that it shadows the installed one); without it, this tree with the chunking
of `judge_samples` switched off. "after" is this tree. Measurements alternate before / after
`--repeats` times; the table shows the fastest of each. Judging time is judge_samples alone
(the model load is timed apart); CPU is the child's process time. Judgments are compared
candidate by candidate. The steal share of each interval (benchmarks/machine.py) says how
much of the shared machine the hypervisor took away.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JUDGES = {
    "composite": [],
    "self": ["judge={kind: self, protocol: pointwise, weighted: true, repeats: 1, batch_size: 16, cache: false}"],
}


def child(args) -> None:
    """Judge the iteration's samples with one judge in the code of `args.tree`; write timings and judgments."""
    sys.path.insert(0, args.tree)
    import nash.judging as judging
    from nash.config import load_config
    from nash.judges import build_judge, close_judge
    from nash.records import Prompt, Sample, read_jsonl
    from nash.registry import IterationDir

    if args.per_prompt:  # this tree with chunking switched off: every prompt on its own, as before
        judging.batch_limits = lambda judge: []
    it = IterationDir.from_path(args.child)
    cfg = load_config(str(ROOT / "configs" / "default.yaml"), JUDGES[args.judge])
    prompts = {p.id: p for p in read_jsonl(it.path / "prompts.jsonl", Prompt)}
    samples = read_jsonl(it.samples, Sample)
    t0, c0 = time.perf_counter(), time.process_time()
    judge = build_judge(cfg.judge, it.manifest()["parent_policy"]["path"], it.precision(), cfg.sampling,
                        it.path / "judge_server")
    t1, c1 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        judgments, info = judging.judge_samples(judge, prompts, samples, Path(tmp) / "judgments.jsonl")
    t2, c2 = time.perf_counter(), time.process_time()
    chunked = bool(getattr(judging, "batch_limits", lambda j: [])(judge))
    close_judge(judge)
    import nash.judges.lm

    Path(args.out).write_text(json.dumps({
        "code": str(Path(nash.judges.lm.__file__).resolve().parent), "chunked": chunked,
        "precision": it.precision().describe(),
        "build_seconds": t1 - t0, "build_cpu_seconds": c1 - c0,
        "judge_seconds": t2 - t1, "judge_cpu_seconds": c2 - c1, "info": info,
        "judgments": [j.model_dump(mode="json", include={"prompt_id", "candidate", "outcome", "score", "other",
                                                         "winner", "requests", "tokens_in", "tokens_out"})
                      for j in judgments],
    }))


def sampled_iteration(work: Path) -> Path:
    """iter_001 of a run of configs/default.yaml in `work`, sampled (once: a later call reuses it)."""
    sys.path.insert(0, str(ROOT))
    from nash.config import load_config
    from nash.iteration import prepare, sample
    from nash.registry import RunDir

    cfg = load_config(str(ROOT / "configs" / "default.yaml"), [])
    run = RunDir.create(work / "runs", cfg)
    iter_dir = prepare(str(run.path))
    t0 = time.perf_counter()
    sample(iter_dir)
    print(f"samples: {iter_dir}/samples.jsonl ({time.perf_counter() - t0:.0f} s)", flush=True)
    return Path(iter_dir)


def measure(iter_dir: Path, judge: str, side: str, before_tree: str | None, out: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from benchmarks.machine import Interval

    tree = before_tree if side == "before" and before_tree else str(ROOT)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(iter_dir), "--judge", judge,
           "--tree", tree, "--out", str(out)] + (["--per-prompt"] if side == "before" and not before_tree else [])
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": tree}
    with Interval() as span:
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    result["process"] = span.record()
    return result


def compare(a: list[dict], b: list[dict]) -> dict:
    key = lambda j: (j["prompt_id"], j["candidate"], j["other"])  # noqa: E731
    a, b = {key(j): j for j in a}, {key(j): j for j in b}
    same_keys = a.keys() == b.keys()
    diffs = [abs((a[k]["score"] or 0) - (b[k]["score"] or 0)) for k in a.keys() & b.keys()]
    fields = ("outcome", "score", "winner", "requests", "tokens_in", "tokens_out")
    differing = sum(any(a[k][f] != b[k][f] for f in fields) for k in a.keys() & b.keys())
    return {"records": len(a), "identical": same_keys and differing == 0, "differing_records": differing,
            "max_abs_score_diff": max(diffs, default=0.0),
            "differing_outcomes": sum(a[k]["outcome"] != b[k]["outcome"] for k in a.keys() & b.keys())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "nash-judge-stage"))
    ap.add_argument("--before-tree", default=None, help="a checkout of the code before (default: this tree, "
                    "chunking off)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--judges", default="composite,self")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "judge_stage.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--judge", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--per-prompt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    sys.path.insert(0, str(ROOT))
    from benchmarks.machine import describe

    if args.before_tree and not (Path(args.before_tree) / "nash" / "judges").exists():
        (Path(args.before_tree) / "nash" / "judges").symlink_to(Path(args.before_tree).resolve() / "judges")
    work = Path(args.work)
    iter_dir = sampled_iteration(work)
    result = {"machine": describe(), "iteration": str(iter_dir), "before": args.before_tree or "this tree, chunking off",
              "judges": {}}
    for judge in args.judges.split(","):
        runs = {"before": [], "after": []}
        for r in range(args.repeats):
            for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                m = measure(iter_dir, judge, side, args.before_tree, work / f"{judge}-{side}-{r}.json")
                print(f"{judge} {side} #{r}: judging {m['judge_seconds']:.1f} s wall, {m['judge_cpu_seconds']:.1f} s "
                      f"CPU (load {m['build_seconds']:.1f} s); steal {m['process']['steal_share']}; code {m['code']}; "
                      f"chunked {m['chunked']}", flush=True)
                runs[side].append(m)
        best = {side: min(ms, key=lambda m: m["judge_seconds"]) for side, ms in runs.items()}
        result["judges"][judge] = {
            "precision": best["after"]["precision"],
            "comparison": compare(best["before"]["judgments"], best["after"]["judgments"]),
            **{side: [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in m.items() if k != "judgments"}
                      for m in ms] for side, ms in runs.items()},
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{result['machine']}; before: {result['before']}\n")
    print("| judge | before s (CPU s) | after s (CPU s) | speed-up (wall / CPU) | judgments identical | steal |")
    print("|---|---|---|---|---|---|")
    for judge, r in result["judges"].items():
        b = min(r["before"], key=lambda m: m["judge_seconds"])
        a = min(r["after"], key=lambda m: m["judge_seconds"])
        c = r["comparison"]
        same = "yes" if c["identical"] else (f"no: {c['differing_records']}/{c['records']} records differ, "
                                             f"{c['differing_outcomes']} outcomes, max |score diff| "
                                             f"{c['max_abs_score_diff']:.2g}")
        steal = ", ".join(f"{m['process']['steal_share']}" for m in r["before"] + r["after"])
        print(f"| {judge} | {b['judge_seconds']:.1f} ({b['judge_cpu_seconds']:.1f}) | {a['judge_seconds']:.1f} "
              f"({a['judge_cpu_seconds']:.1f}) | {b['judge_seconds'] / a['judge_seconds']:.2f}x / "
              f"{b['judge_cpu_seconds'] / a['judge_cpu_seconds']:.2f}x | {same} | {steal} |")


if __name__ == "__main__":
    main()
