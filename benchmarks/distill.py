"""The cascade judge against the teacher alone: requests saved, kept pairs that agree, held-out figures.

    python benchmarks/distill.py [--partition 160] [--runs-dir DIR] [--out FILE] [--skip-loopback]

Embedded default (configs/cascade.yaml; the teacher is the default quality-gated rules judge):
1. iteration 1 of the cascade run: no distilled model yet, so the teacher judges every prompt;
2. `nash distill` on it: held-out accuracy against the teacher, thresholds by agreement;
3. the run is copied into a teacher-only run (configs/default.yaml, the same keys otherwise), and
   iteration 2 runs in both from the same iteration-1 policy. Sampling is seeded, so both sample the
   same candidates (checked by sha256) and differ only in who judged them.
Compared: the share of prompts the student decided (the teacher calls saved), the cascade's kept
pairs against the teacher-only run's (the same pair; and pairs the teacher's own scores would
have kept), and the held-out real pass rate, degenerate share and win rate of both iterations.

Loopback GPT-4 stand-in (--skip-loopback leaves it out): the same candidates through the `openai`
judge with DNO's batched protocol and the real OpenAI client, against a loopback server whose
verdicts follow a fixed stand-in rubric (1..6 from constraints met, a real answer, and length). A
reward model is distilled from its verdicts on iteration 1's candidates; iteration 2's are judged
by the teacher alone and by the cascade, each on an empty cache. Requests and dollars are the
server's count and the client's usage at GPT-4-Turbo's list prices. The stand-in rubric is not
GPT-4: its agreement figures say how well a reward model learns *that* rubric, no more.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import Interval, describe  # noqa: E402
from nash.config import load_config  # noqa: E402
from nash.records import Judgment, Pair, Prompt, Sample, iter_jsonl, read_jsonl, write_json  # noqa: E402
from nash.registry import IterationDir, RunDir, now  # noqa: E402

# Two pairs a prompt, two epochs: the reward model trains in about 8 minutes on 2 cores
# (a step of 8 pairs of the 135M backbone takes about 10 s here).
DISTILL = ["distill.max_pairs_per_prompt=2", "distill.epochs=2", "distill.learning_rate=5e-5"]


def nash(*args: str) -> dict:
    with Interval() as span:
        subprocess.run([sys.executable, "-m", "nash.flows.cli", *args], check=True, cwd=ROOT)
    return span.record()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fork(source: RunDir, name: str, config: Path, sets: list[str], keep_distill: bool) -> RunDir:
    """A copy of `source` (its iteration 1 and π_0's baseline) under another config and run name."""
    target = source.path.parent / name
    shutil.rmtree(target, ignore_errors=True)
    skip = () if keep_distill else ("distill",)
    shutil.copytree(source.path, target, ignore=shutil.ignore_patterns(*skip, "iter_002", "lock"))
    cfg = load_config(config, [*sets, f"run.name={name}"])
    write_json(target / "run.json", {"config_hash": cfg.hash(), "created_at": now(),
                                     "config": cfg.model_dump(mode="json")})
    return RunDir(target)


def headline(it: IterationDir) -> dict:
    m = json.loads(it.metrics.read_text())
    h = m["headline"]
    n = m["degeneration"]["policy"]["n"]

    def se(p):
        return math.sqrt(p * (1 - p) / n) if p is not None and n else None

    return {"real_pass_rate": h.get("substantive_pass_rate"), "real_pass_rate_se": se(h.get("substantive_pass_rate")),
            "initial_real_pass_rate": h.get("initial_substantive_pass_rate"),
            "degenerate": h.get("degenerate"), "degenerate_se": se(h.get("degenerate")),
            "initial_degenerate": h.get("initial_degenerate"),
            "win_rate_vs_initial": h.get("win_rate"), "win_rate_se": h.get("win_rate_se"),
            "mean_tokens": h.get("mean_length"), "eval_n": n, "pairs": m["pairs"].get("pairs"),
            "promoted": h.get("promoted")}


def pair_agreement(cascade_pairs: list[Pair], teacher_pairs: list[Pair], teacher_scores: dict,
                   decided: dict[str, str], min_chosen: float, min_margin: float) -> dict:
    """The cascade's kept pairs against the teacher-only selection, overall and where the student decided."""
    by_prompt = {p.prompt_id: (p.chosen_candidate, p.rejected_candidate) for p in teacher_pairs}

    def endorsed(p: Pair) -> bool:
        c, r = teacher_scores.get((p.prompt_id, p.chosen_candidate)), teacher_scores.get((p.prompt_id, p.rejected_candidate))
        return c is not None and r is not None and c >= min_chosen and c - r >= min_margin

    out = {}
    for part, pairs in (("all", cascade_pairs),
                        ("student_decided", [p for p in cascade_pairs if decided.get(p.prompt_id) == "student"])):
        same = sum(by_prompt.get(p.prompt_id) == (p.chosen_candidate, p.rejected_candidate) for p in pairs)
        ok = sum(endorsed(p) for p in pairs)
        out[part] = {"pairs": len(pairs), "same_pair_as_teacher_only": same,
                     "same_share": round(same / len(pairs), 4) if pairs else None,
                     "teacher_would_keep": ok, "teacher_would_keep_share": round(ok / len(pairs), 4) if pairs else None}
    kept = {p.prompt_id for p in cascade_pairs}
    out["teacher_only_pairs"] = len(teacher_pairs)
    out["teacher_only_prompts_missed"] = sum(pid not in kept for pid in by_prompt)
    return out


def scores_of(path: Path) -> dict:
    return {(j.prompt_id, j.candidate): j.score for j in iter_jsonl(path, Judgment) if j.outcome == "scored"}


def embedded(runs_dir: Path, partition: int) -> dict:
    sets = [f"prompts.partition_size={partition}", "distill.every=0"]
    flags = [f for s in sets for f in ("--set", s)]
    timings = {}
    cascade = RunDir(runs_dir / "cascade")
    if not IterationDir(cascade, 1).complete:  # the script resumes where a previous attempt stopped
        timings["cascade_iter_1"] = nash("run", str(ROOT / "configs" / "cascade.yaml"), "--runs-dir", str(runs_dir),
                                         "--iterations", "1", *flags)
    if not (cascade.path / "distill" / "v001" / "report.json").is_file():
        timings["distill"] = nash("distill", "cascade", "--runs-dir", str(runs_dir),
                                  *[f for s in DISTILL for f in ("--set", s)])
    report = json.loads((cascade.path / "distill" / "v001" / "report.json").read_text())
    # The run's own cascade decides at the threshold for agreement 0.9; where the held-out prompts never
    # reached it the teacher decides every prompt, and iteration 2 would be the teacher's, so the arm
    # compared is a cascade whose threshold is the held-out prompts' median decisive margin: the student
    # decides about half (chosen on the held-out split, with no look at iteration 2).
    table = report["routing"]["table"]
    half = table[len(table) // 2 - 1][0]
    covered = [ok for m, ok in table if m >= half]
    teacher = fork(cascade, "teacher", ROOT / "configs" / "default.yaml", sets, keep_distill=False)
    halved = fork(cascade, "half", ROOT / "configs" / "cascade.yaml", [*sets, f"judge.threshold={half}"],
                  keep_distill=True)
    for run, config in ((halved, "cascade.yaml"), (teacher, "default.yaml")):
        timings[f"{run.name}_iter_2"] = nash("run", str(ROOT / "configs" / config), "--runs-dir", str(runs_dir),
                                             "--iterations", "1", *flags, "--set", f"run.name={run.name}",
                                             *(("--set", f"judge.threshold={half}") if run is halved else ()))
    c2, t2 = IterationDir(halved, 2), IterationDir(teacher, 2)
    same_samples = sha(c2.samples) == sha(t2.samples)
    decided = {j.prompt_id: j.details.get("decided_by") for j in iter_jsonl(c2.judgments, Judgment)}
    cfg = teacher.config()
    agreement = pair_agreement(read_jsonl(c2.pairs, Pair), read_jsonl(t2.pairs, Pair), scores_of(t2.judgments),
                               decided, cfg.pairs.min_chosen_score, cfg.pairs.min_margin)
    routing = {"at_agreement_0.9": report["routing"]["thresholds"]["0.9"], "median_threshold": half,
               "median_heldout_coverage": len(covered) / len(table),
               "median_heldout_agreement": sum(covered) / len(covered)}
    return {"report": {k: report[k] for k in ("train_prompts", "train_pairs", "heldout_prompts", "heldout_pairs",
                                              "accuracy", "accuracy_se", "calibration", "train")}
            | {"thresholds": report["routing"]["thresholds"], "agreement_all": report["routing"]["agreement_all"]},
            "routing": routing, "cascade_record": c2.manifest().get("cascade"), "same_samples": same_samples,
            "kept_pairs": agreement, "cascade": headline(c2), "teacher_only": headline(t2),
            "initial": {"real_pass_rate": headline(c2)["initial_real_pass_rate"],
                        "degenerate": headline(c2)["initial_degenerate"]},
            "timings": timings}


# -- the loopback GPT-4 stand-in -------------------------------------------------------------


class StandIn:
    """Verdicts on DNO's batched rubric from a fixed function of each candidate: 1..6 from the share of
    the prompt's constraints met (half), a real answer (three tenths) and length up to 60 words (a fifth)."""

    def __init__(self, prompts: dict[str, Prompt]):
        from nash.judges.rules import RulesJudge

        self.by_text = {p.text: p for p in prompts.values()}
        self.rules = RulesJudge()

    def score(self, prompt: Prompt, text: str) -> int:
        from nash import quality

        share = self.rules.score(prompt, [text])[0].score or 0.0
        real = quality.degeneration(text, prompt.topic)["substantive"]
        q = 0.5 * share + 0.3 * real + 0.2 * min(len(text.split()), 60) / 60
        return 1 + round(5 * q)

    def __call__(self, request: str) -> str:
        instruction = request.split("[Instruction]\n", 1)[1].split("\n\n[Candidates]", 1)[0]
        body = request.split("[Candidates]\n", 1)[1].rsplit("\n\nReply with a single JSON", 1)[0]
        parts = re.split(r"\[Candidate ([A-Z])\]\n", body)[1:]
        prompt = self.by_text[instruction]
        verdict = {}
        for cid, text in zip(parts[::2], parts[1::2]):
            verdict[f"{cid}_justification"] = "stand-in"
            verdict[f"{cid}_score"] = self.score(prompt, text.strip())
        return json.dumps(verdict)


def loopback(runs_dir: Path, cascade: RunDir) -> dict:
    from nash.distill import distill, resolve_cascade
    from nash.judges import build_judge, close_judge
    from nash.judging import judge_samples
    from nash.pairs import select_pairs
    from tests.openai_server import OpenAIServer

    prompts = {}
    for it in (IterationDir(cascade, 1), IterationDir(RunDir(runs_dir / "teacher"), 2)):
        prompts.update({p.id: p for p in read_jsonl(it.path / "prompts.jsonl", Prompt)})
    stand_in = StandIn(prompts)
    os.environ.setdefault("OPENAI_API_KEY", "sk-loopback")
    out = {}
    with OpenAIServer() as server:
        server.fault = lambda prompt: ("ok", stand_in(prompt)) if "<id>_score" in prompt else None
        sets = ["judge.kind=cascade", "judge.student.kind=reward_model", "judge.student.model=distill:latest",
                "judge.teacher.kind=openai", f"judge.teacher.base_url={server.url}", "judge.teacher.protocol=batched",
                "judge.teacher.max_tokens=1024", "pairs.min_chosen_score=5", "pairs.min_margin=2",
                f"policy.model={cascade.config().policy.model}", "run.name=loopback"]
        cfg = load_config(None, sets)
        shutil.rmtree(runs_dir / "loopback", ignore_errors=True)
        run = RunDir.create(runs_dir, cfg)
        first = IterationDir(run, 1)
        first.path.mkdir()
        shutil.copy(IterationDir(cascade, 1).samples, first.samples)

        def judge_with(jcfg, samples: Path, judgments: Path, cache: str) -> tuple[dict, float]:
            os.environ["NASH_CACHE"] = str(runs_dir / cache)
            before = len(server.requests)
            judge = build_judge(jcfg)
            t0 = time.time()
            try:
                _, info = judge_samples(judge, prompts, samples, judgments, keep=False)
            finally:
                close_judge(judge)
            return {**info["counts"], "server_requests": len(server.requests) - before}, time.time() - t0

        out["teach_iter_1"], _ = judge_with(cfg.judge.teacher, first.samples, first.judgments, "cache-teach-1")
        first.update_manifest(status="complete")
        with Interval() as span:
            version = distill(run, overrides=DISTILL)
        report = json.loads((version / "report.json").read_text())
        out["report"] = {k: report[k] for k in ("train_pairs", "heldout_prompts", "heldout_pairs", "accuracy",
                                                 "accuracy_se", "calibration")} | {
            "thresholds": report["routing"]["thresholds"], "distill": span.record()}
        second = IterationDir(RunDir(runs_dir / "teacher"), 2).samples
        work = runs_dir / "loopback-iter2"
        work.mkdir(exist_ok=True)
        teacher_counts, t_teacher = judge_with(cfg.judge.teacher, second, work / "teacher.jsonl", "cache-teacher-2")
        samples = read_jsonl(second, Sample)
        t_pairs, _ = select_pairs(samples, read_jsonl(work / "teacher.jsonl", Judgment), 5, 2)
        t_scores = scores_of(work / "teacher.jsonl")
        table = report["routing"]["table"]
        half = table[len(table) // 2 - 1][0]
        out["iter_2"] = {"teacher_alone": {**{k: teacher_counts[k] for k in ("requests", "cost_usd", "server_requests")},
                                           "seconds": round(t_teacher, 1), "pairs": len(t_pairs)},
                         "median_threshold": half}
        for arm, threshold in (("cascade_at_0.9", None), ("cascade_at_median", half)):
            jcfg, _ = resolve_cascade(run, cfg.judge.model_copy(update={"threshold": threshold}))
            counts, seconds = judge_with(jcfg, second, work / f"{arm}.jsonl", f"cache-{arm}")
            judged = read_jsonl(work / f"{arm}.jsonl", Judgment)
            c_pairs, _ = select_pairs(samples, judged, 5, 2)
            decided = {j.prompt_id: j.details.get("decided_by") for j in judged}
            out["iter_2"][arm] = {
                **{k: counts[k] for k in ("requests", "cost_usd", "server_requests")}, "seconds": round(seconds, 1),
                "prompts": len(decided), "student_decided": sum(d == "student" for d in decided.values()),
                "kept_pairs": pair_agreement(c_pairs, t_pairs, t_scores, decided, 5, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--partition", type=int, default=160, help="prompts per iteration (336 built-in training prompts)")
    ap.add_argument("--runs-dir", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill.json"))
    ap.add_argument("--skip-loopback", action="store_true")
    args = ap.parse_args()
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="nash-distill-"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    result = {"machine": describe(), "partition": args.partition, "runs_dir": str(runs_dir), "distill": DISTILL}
    result["embedded"] = embedded(runs_dir, args.partition)
    write_json(Path(args.out), result)
    if not args.skip_loopback:
        result["loopback"] = loopback(runs_dir, RunDir(runs_dir / "cascade"))
        write_json(Path(args.out), result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
