"""A reward model distilled from the run's own judgments, and what the cascade judge needs from it.

`nash distill RUN` (or `distill.every` between iterations) turns the judgments of the run's
complete iterations into preference pairs: within a prompt, a candidate the teacher scored
higher than another (pointwise, batched, composite scores), or the winner of a pairwise
comparison whose two orders agreed. Failed judgments and ties make no pair, and a candidate
that a cascade's student decided is left out (the student must not learn from itself).

Prompts are split (by a hash of the prompt id, so a prompt never sits on both sides): the
training pairs go to TRL's RewardTrainer in a subprocess (nash/distill_worker.py) on a
backbone with a one-output classification head (π_0 by default); the held-out prompts'
candidates are then scored by the trained model through the `reward_model` judge, exactly as
the cascade will score them, and give the report: pair accuracy against the teacher's order
with its standard error (prompts as clusters), agreement by reward margin, and for each
agreement target the decisive-margin threshold and the share of prompts it covers. A
monotone map from the student's scores to the teacher's scale (isotonic, fitted on the same
held-out candidates) lets the cascade's cheap scores meet `pairs.min_chosen_score` and
`pairs.min_margin` in the teacher's units.

Every version lives in RUN/distill/vNNN/ (model/, pairs.jsonl, heldout.jsonl, report.json with
the sha256 of every judgments and samples file it read); it is complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from nash.errors import UserError
from nash.records import Judgment, Sample, fsync_dir, grouped, iter_jsonl, read_lines, write_json
from nash.registry import IterationDir, RunDir, now, sha256_file
from nash.supervisor import Progress

PREFIX = "distill:"
TARGETS = (0.8, 0.85, 0.9, 0.95)  # agreement targets the report gives thresholds for
MIN_ROUTED = 10  # held-out prompts a threshold must cover to count


# -- pairs from judgments ---------------------------------------------------------------


def _teacher_verdicts(path: Path) -> dict[str, dict[int, tuple[float | None, list]]]:
    """prompt id -> candidate -> (teacher score or None, pairwise wins over other candidates)."""
    out: dict[str, dict[int, tuple[float | None, list]]] = defaultdict(dict)
    for j in iter_jsonl(path, Judgment):
        if j.details.get("decided_by") == "student":
            continue  # a cascade's cheap score: the student's own verdict
        score = j.score if j.outcome == "scored" else None
        wins = [c["other"] for c in j.details.get("comparisons", []) if c.get("won") is True]
        out[j.prompt_id][j.candidate] = (score, wins)
    return out


def prompt_pairs(verdicts: dict[int, tuple[float | None, list]], min_margin: float,
                 most: int) -> list[tuple[int, int, float | None]]:
    """(chosen, rejected, teacher margin) of one prompt, the `most` largest margins first.

    Pairwise verdicts give pairs directly (margin None); scores give every ordered pair whose
    difference exceeds 0 and reaches `min_margin`. Unscored candidates take part in none.
    """
    direct = [(c, o, None) for c, (_, wins) in verdicts.items() for o in wins if o in verdicts]
    if direct:
        return sorted(direct)[:most]
    scored = [(c, s) for c, (s, _) in verdicts.items() if s is not None]
    found = [(c, r, cs - rs) for c, cs in scored for r, rs in scored if cs - rs > 0 and cs - rs >= min_margin]
    found.sort(key=lambda f: (-f[2], f[0], f[1]))
    return found[:most]


def held_out(prompt_id: str, share: float, seed: int) -> bool:
    h = int(hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()[:12], 16)
    return h / 16**12 < share


def teacher_data(run: RunDir, iterations: list[IterationDir], d, out_dir: Path) -> dict:
    """Write pairs.jsonl (training prompts) and heldout.jsonl (held-out prompts with every scored
    candidate and the pairs), streaming the samples; return counts and the sources' sha256.
    `d`: the distill section."""
    seed = run.config().run.seed
    counts = dict.fromkeys(("train_prompts", "train_pairs", "heldout_prompts", "heldout_pairs",
                            "prompts_without_pairs", "candidates_failed_or_student"), 0)
    sources = {}
    with open(out_dir / "pairs.jsonl", "w", encoding="utf-8") as train_f, \
            open(out_dir / "heldout.jsonl", "w", encoding="utf-8") as held_f:
        for it in iterations:
            sources[it.path.name] = {"judgments": sha256_file(it.judgments), "samples": sha256_file(it.samples)}
            verdicts = _teacher_verdicts(it.judgments)
            for pid, group in grouped(iter_jsonl(it.samples, Sample), it.samples):
                mine = verdicts.get(pid, {})
                by_candidate = {s.candidate: s for s in group}
                counts["candidates_failed_or_student"] += sum(
                    1 for c in by_candidate if c not in mine or mine[c][0] is None and not mine[c][1])
                pairs = prompt_pairs({c: v for c, v in mine.items() if c in by_candidate},
                                     d.min_margin, d.max_pairs_per_prompt)
                counts["prompts_without_pairs"] += not pairs
                scored = sum(1 for c in by_candidate if c in mine and mine[c][0] is not None)
                prompt = group[0].prompt
                if held_out(pid, d.holdout, seed):
                    if scored < 2:
                        continue
                    # A held-out prompt whose candidates the teacher tied counts for routing: a student sure
                    # of a pair there disagrees with the teacher, who would keep none.
                    counts["heldout_prompts"] += 1
                    counts["heldout_pairs"] += len(pairs)
                    held_f.write(json.dumps({
                        "prompt_id": pid, "prompt": prompt, "iteration": it.index,
                        "candidates": [{"candidate": c, "response": s.response, "teacher": mine[c][0]}
                                       for c, s in sorted(by_candidate.items()) if c in mine],
                        "pairs": [[c, r] for c, r, _ in pairs]}) + "\n")
                    continue
                if not pairs:
                    continue
                counts["train_prompts"] += 1
                counts["train_pairs"] += len(pairs)
                for c, r, m in pairs:
                    train_f.write(json.dumps({"prompt_id": pid, "prompt": prompt, "chosen": by_candidate[c].response,
                                              "rejected": by_candidate[r].response, "margin": m,
                                              "iteration": it.index}) + "\n")
    return {"counts": counts, "sources": sources}


# -- the report: accuracy, calibration, thresholds, score map ----------------------------


def _cluster_se(hits: dict[str, list[float]]) -> tuple[float | None, float | None]:
    """Mean of all values and its standard error with prompts as clusters (pairs of a prompt correlate)."""
    n = sum(len(v) for v in hits.values())
    if not n:
        return None, None
    p = sum(sum(v) for v in hits.values()) / n
    g = len(hits)
    if g < 2:
        return p, None
    var = g / (g - 1) * sum((sum(v) - p * len(v)) ** 2 for v in hits.values()) / n**2
    return p, math.sqrt(var)


def thresholds(routes: list[tuple[float, bool]], targets=TARGETS, min_routed: int = MIN_ROUTED) -> dict:
    """For each agreement target: the smallest decisive margin whose prompts (margin >= it, at least
    `min_routed` of them) agree with the teacher at least that often, and the share it covers."""
    ranked = sorted(routes, key=lambda r: -r[0])
    out = {}
    for target in targets:
        best, agree = None, 0
        for n, (m, ok) in enumerate(ranked, 1):
            agree += ok
            tie_next = n < len(ranked) and ranked[n][0] == m  # a threshold takes all prompts at its margin
            if n >= min_routed and not tie_next and agree / n >= target:
                best = {"threshold": m, "coverage": n / len(ranked), "agreement": agree / n, "prompts": n}
        out[f"{target:g}"] = best
    return out


def isotonic_map(xs: list[float], ys: list[float], knots: int = 64) -> dict | None:
    """A non-decreasing map from student to teacher scores, as at most `knots` points for np.interp."""
    import numpy as np
    from scipy.optimize import isotonic_regression

    if len(xs) < 2:
        return None
    order = np.argsort(xs, kind="stable")
    x, fitted = np.asarray(xs)[order], isotonic_regression(np.asarray(ys, dtype=float)[order]).x
    at = np.unique(np.linspace(0, len(x) - 1, min(knots, len(x))).round().astype(int))
    return {"x": [float(v) for v in x[at]], "y": [float(v) for v in fitted[at]]}


def apply_map(score_map: dict | None, value: float) -> float:
    import numpy as np

    return value if score_map is None else float(np.interp(value, score_map["x"], score_map["y"]))


def student_report(heldout: list[dict], student: dict[tuple[str, int], float]) -> dict:
    """Held-out accuracy against the teacher's order, agreement by margin, thresholds and score map."""
    hits: dict[str, list[float]] = defaultdict(list)
    margins: list[tuple[float, bool]] = []
    routes: list[tuple[float, bool]] = []
    xs, ys = [], []
    for g in heldout:
        pid = g["prompt_id"]
        s = {c["candidate"]: student.get((pid, c["candidate"])) for c in g["candidates"]}
        for c, r in g["pairs"]:
            if s.get(c) is None or s.get(r) is None:
                continue
            ok = s[c] > s[r]
            hits[pid].append(float(ok))
            margins.append((abs(s[c] - s[r]), ok))
        teacher = {c["candidate"]: c["teacher"] for c in g["candidates"]}
        scored = [c for c in s if s[c] is not None]
        if len(scored) == len(s) >= 2 and all(teacher[c] is not None for c in s):
            top, bottom = max(scored, key=lambda c: (s[c], -c)), min(scored, key=lambda c: (s[c], c))
            routes.append((s[top] - s[bottom], teacher[top] > teacher[bottom]))
            xs += [s[c] for c in scored]
            ys += [teacher[c] for c in scored]
    accuracy, se = _cluster_se(hits)
    bins = []
    if margins:
        margins.sort()
        for b in range(5):
            part = margins[b * len(margins) // 5 : (b + 1) * len(margins) // 5]
            if part:
                bins.append({"margin_from": round(part[0][0], 4), "margin_to": round(part[-1][0], 4),
                             "pairs": len(part), "agreement": round(sum(ok for _, ok in part) / len(part), 4)})
    return {
        "heldout_pairs": sum(len(v) for v in hits.values()),
        "accuracy": accuracy, "accuracy_se": se,
        "calibration": bins,
        "routing": {"prompts": len(routes),
                    "agreement_all": sum(ok for _, ok in routes) / len(routes) if routes else None,
                    "thresholds": thresholds(routes),
                    "table": [[round(m, 6), ok] for m, ok in sorted(routes, key=lambda r: -r[0])]},
        "score_map": isotonic_map(xs, ys),
    }


# -- versions --------------------------------------------------------------------------


def versions(run: RunDir) -> list[Path]:
    root = run.path / "distill"
    return sorted(p for p in root.glob("v[0-9][0-9][0-9]") if (p / "report.json").is_file()) if root.is_dir() else []


def student_path(run: RunDir, name: str) -> Path | None:
    """The model directory of `distill:latest` or `distill:vNNN`; None when the run has no version yet."""
    tag = name.removeprefix(PREFIX)
    found = versions(run)
    if tag == "latest":
        return found[-1] / "model" if found else None
    for v in found:
        if v.name == tag:
            return v / "model"
    raise UserError(f"judge.student.model: {name}: {run.path / 'distill'} holds "
                    f"{', '.join(v.name for v in found) or 'no distilled model'}")


def read_report(model_path: str | Path) -> dict | None:
    path = Path(model_path).parent / "report.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def resolve_cascade(run: RunDir, jcfg):
    """The cascade section with its student's `distill:` name made a path, and what the manifest
    records about it. A run with no distilled model yet has the teacher judge everything."""
    if jcfg.kind != "cascade":
        return jcfg, None
    model = jcfg.student.model
    path = student_path(run, model) if model.startswith(PREFIX) else Path(model)
    if path is None:
        return jcfg, {"student": None, "note": f"{model}: no distilled model yet; the teacher judged every prompt"}
    jcfg = jcfg.model_copy(update={"student": jcfg.student.model_copy(update={"model": str(path)})})
    info = {"student": str(path.parent.relative_to(run.path)) if path.is_relative_to(run.path) else str(path)}
    return jcfg, info


def check_student(run: RunDir, jcfg) -> None:
    """Before the first stage: a named version exists, and a student that nash did not distill comes with
    `judge.threshold`."""
    model = jcfg.student.model
    if model.startswith(PREFIX):
        student_path(run, model)
    elif jcfg.threshold is None and read_report(model) is None:
        raise _needs_threshold(model)


def _needs_threshold(model: str) -> UserError:
    return UserError(f"judge.threshold: {model} has no distillation report (report.json beside it); set "
                     "judge.threshold, the decisive margin in its units at which it decides alone")


def routing_threshold(jcfg, report: dict | None) -> tuple[float | None, str]:
    """The decisive margin the cascade routes by (None: the teacher decides every prompt), and why."""
    if jcfg.threshold is not None:
        return jcfg.threshold, "judge.threshold"
    if report is None:
        raise _needs_threshold(jcfg.student.model)
    row = thresholds([tuple(r) for r in report["routing"]["table"]], [jcfg.agreement])[f"{jcfg.agreement:g}"]
    if row is None:
        return None, (f"{report['version']}: no decisive margin reached agreement {jcfg.agreement:g} on "
                      f"{MIN_ROUTED} or more held-out prompts; the teacher decides every prompt")
    return row["threshold"], (f"{report['version']}: agreement {row['agreement']:.3f} on the {row['prompts']} "
                              f"held-out prompts ({row['coverage']:.0%}) at this margin or above")


# -- training --------------------------------------------------------------------------


def settings(cfg, overrides: list[str] = ()):
    """The run's distill section with `distill.KEY=VALUE` overrides for one version (they shape no iteration),
    checked by the config's own validation."""
    from nash.config import parse_override, validate_config

    data, lines = cfg.model_dump(mode="json"), {}
    for item in overrides:
        keys, value = parse_override(item)
        if len(keys) != 2 or keys[0] != "distill":
            raise UserError(f"--set {item}: nash distill takes distill.KEY=VALUE only")
        data["distill"][keys[1]] = value
        lines[".".join(keys)] = "--set"
    return validate_config(data, lines).distill


def distill(run: RunDir, iterations: list[int] | None = None, progress: Progress | None = None,
            overrides: list[str] = ()) -> Path:
    """Train a new version on the judgments of `iterations` (default: every complete one), with the run's
    distill section and `overrides` (distill.KEY=VALUE); return its directory."""
    cfg = run.config()
    d = settings(cfg, overrides)
    done = run.lineage() if iterations is None else [IterationDir(run, i) for i in iterations]
    for it in done:
        if not it.complete:
            raise UserError(f"nash distill: {it.path.name} is not complete; its judgments may still change")
    if not done:
        raise UserError(f"nash distill: {run.path} has no complete iteration to learn from")
    root = run.path / "distill"
    root.mkdir(exist_ok=True)
    index = max([int(p.name[1:]) for p in root.glob("v[0-9][0-9][0-9]")] + [0]) + 1
    out = root / f"v{index:03d}.partial"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    data = teacher_data(run, done, d, out)
    counts = data["counts"]
    if counts["train_pairs"] < 2 or counts["heldout_prompts"] < 1:
        shutil.rmtree(out)
        raise UserError(f"nash distill: {counts['train_pairs']} training pairs and {counts['heldout_prompts']} "
                        f"held-out prompts in {', '.join(it.path.name for it in done)}: too few to train and "
                        "check a reward model (distill.min_margin, distill.holdout)")
    from nash.policy import resolve_policy

    backbone = resolve_policy(d.backbone or cfg.policy.model)
    write_json(out / "spec.json", {"backbone": backbone, "distill": d.model_dump(mode="json"), "seed": cfg.run.seed})
    trained = _train_in_subprocess(out, progress)
    heldout = [json.loads(line) for _, line in read_lines(out / "heldout.jsonl") if line.strip()]
    scores = {(r["prompt_id"], r["candidate"]): r["score"]
              for _, line in read_lines(out / "student_scores.jsonl") if line.strip() for r in [json.loads(line)]}
    report = {"version": out.name.removesuffix(".partial"), "created": now(), "backbone": backbone,
              "settings": d.model_dump(mode="json"),
              "iterations": [it.index for it in done], "sources": data["sources"], **counts,
              "train": trained, **student_report(heldout, scores)}
    write_json(out / "report.json", report)
    final = root / report["version"]
    out.rename(final)
    fsync_dir(root)
    return final


def _train_in_subprocess(out: Path, progress: Progress | None) -> dict:
    from nash.training import run_worker

    command = [sys.executable, "-m", "nash.lifeline", sys.executable, "-m", "nash.distill_worker", str(out)]
    return run_worker(command, {}, out / "train.log", out / "train.json", "distilling", progress)


def due(run: RunDir) -> bool:
    """`distill.every`: the last complete iteration is a multiple of it and no version has learned from it yet."""
    every = run.config().distill.every
    last = run.last_complete()
    if not every or last is None or last.index % every:
        return False
    found = versions(run)
    return not found or last.index not in json.loads((found[-1] / "report.json").read_text())["iterations"]


def summary_lines(report: dict) -> list[str]:
    """What `nash distill` prints."""
    acc, se = report["accuracy"], report["accuracy_se"]
    lines = [f"{report['version']}: {report['train_pairs']} training pairs from {report['train_prompts']} prompts "
             f"(iterations {', '.join(map(str, report['iterations']))}); held out: {report['heldout_prompts']} "
             f"prompts, {report['heldout_pairs']} pairs",
             f"held-out accuracy against the teacher's order: {acc:.3f} ± {se or 0:.3f}" if acc is not None
             else "held-out accuracy: no held-out pair"]
    lines.append("agreement by reward margin: " + ", ".join(
        f"{b['margin_from']:.2f}-{b['margin_to']:.2f}: {b['agreement']:.2f} ({b['pairs']})" for b in report["calibration"]))
    for target, row in report["routing"]["thresholds"].items():
        lines.append(f"agreement {target}: " + ("not reached on the held-out prompts" if row is None else
                     f"decisive margin >= {row['threshold']:.3f} covers {row['coverage']:.0%} of prompts "
                     f"(agreement {row['agreement']:.3f} on {row['prompts']})"))
    return lines

