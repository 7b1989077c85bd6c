"""One self-improvement iteration as a sequence of stages over files.

    prepare -> sample -> judge -> select_pairs -> train -> evaluate -> finalize

Each stage takes the iteration directory, reads the run's resolved config from
`run.json`, writes its output file atomically, records itself in the manifest and
returns the output path. A stage already recorded as complete is skipped, so a failed
or interrupted iteration resumes where it stopped. Prefect tasks wrap these functions
one to one (flows/); `run_iteration` runs them without Prefect.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from nash import evaluation, tracking
from nash import pairs as pair_rules
from nash import prompts as prompt_sources
from nash.card import write_card
from nash.distill import resolve_cascade
from nash.errors import UserError
from nash.judges import build_judge, close_judge
from nash.judging import OUTCOMES, judge_samples
from nash.policy import resolve_policy
from nash.precision import for_config as precision_for
from nash.preflight import eval_prompts, load_run_prompts
from nash.records import (
    USAGE,
    Judgment,
    Pair,
    Prompt,
    Sample,
    grouped,
    iter_jsonl,
    prompt_blocks,
    read_block,
    read_jsonl,
    replace_durably,
    temporary_name,
    write_json,
    write_jsonl,
)
from nash.registry import IterationDir, RunDir, now, package_versions, sha256_file
from nash.sampling import THROUGHPUT, Progress, SamplingParams, build_sampler, throughput
from nash.training import train_in_subprocess

log = logging.getLogger("nash")
STAGES = ("sample", "judge", "select_pairs", "train", "evaluate")


def give_back_memory() -> None:
    """Return the heap a stage (or the preflight) freed to the system: without it the round process
    keeps the peak of reading 100k prompts while the training worker loads beside it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _run_stage(it: IterationDir, name: str, output: Path, work: Callable[[], dict | None]) -> str:
    if stage_complete(it, name):
        return str(output)
    stages = it.manifest().get("stages", {})
    start, cpu0 = time.time(), _cpu_seconds()
    try:
        info = work() or {}
    except BaseException as e:
        stages[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        it.update_manifest(stages=stages, status="failed", error=f"{name}: {type(e).__name__}: {e}",
                           traceback=traceback.format_exc(limit=5))
        raise
    give_back_memory()
    stages = it.manifest().get("stages", {})
    # CPU of this process and of the children it reaped meanwhile (the training worker, vLLM engines).
    stages[name] = {"status": "complete", "seconds": round(time.time() - start, 2),
                    "cpu_seconds": round(_cpu_seconds() - cpu0, 2), "started_at": start, **info}
    it.update_manifest(stages=stages)
    return str(output)


def stage_output(it: IterationDir, name: str) -> Path:
    return {"sample": it.samples, "judge": it.judgments, "select_pairs": it.pairs, "train": it.policy,
            "evaluate": it.metrics}[name]


def stage_complete(it: IterationDir, name: str) -> bool:
    return it.manifest().get("stages", {}).get(name, {}).get("status") == "complete" and stage_output(it, name).exists()


def record_stage_failure(it: IterationDir, name: str, error: str) -> None:
    """Record a stage that failed elsewhere (failed, its worker died, cancelled) as _run_stage records one here;
    a traceback the stage wrote itself stays."""
    stages = it.manifest().get("stages", {})
    stages[name] = {"status": "failed", "error": error}
    it.update_manifest(stages=stages, status="failed", error=f"{name}: {error}")


def prepare(run_dir: str) -> str:
    """Open the next iteration: fix its parent policy and its fresh prompt partition."""
    run = RunDir(run_dir)
    cfg = run.config()
    tracking.sync(run)  # iterations a tracker missed while it was down
    it = run.next_iteration()
    if it.manifest():
        stages = it.manifest().get("stages", {})
        judged = stages.get("judge", {})
        if "select_pairs" not in stages and (judged.get("failed") or judged.get("status") == "failed"):
            reopen_failed_judgments(it)  # nothing used them yet: ask the failed ones again
        it.update_manifest(status="running", error=None, traceback=None)
        return str(it.path)
    all_prompts = load_run_prompts(cfg)
    if not run.eval_prompts.is_file():
        write_jsonl(run.eval_prompts, eval_prompts(cfg, all_prompts))
    part = prompt_sources.partition(all_prompts, it.index, cfg.prompts.partition_size, cfg.prompts.seed)
    parent = run.parent_of_next(cfg.train.parent)
    parent_policy = str(parent.policy) if parent else resolve_policy(cfg.policy.model)
    last = run.last_complete()
    if last is not None and (parent is None or parent.index != last.index):
        log.info("iter_%03d trains from %s, the promoted policy (train.parent promoted): %s was not promoted",
                 it.index, parent.path.name if parent else "π_0", last.path.name)
    it.path.mkdir(parents=True, exist_ok=True)
    write_jsonl(it.path / "prompts.jsonl", part)
    it.update_manifest(
        iteration=it.index,
        status="running",
        config_hash=cfg.hash(),
        parent_policy={"iteration": parent.index if parent else 0, "path": parent_policy, "rule": cfg.train.parent},
        # The ids are in prompts.jsonl: a manifest rewritten at every stage stays small at any partition size.
        prompt_partition={"index": it.index, "size": len(part), "file": "prompts.jsonl",
                          "sha256": sha256_file(it.path / "prompts.jsonl")},
        packages=package_versions(),
        precision=precision_for(cfg).describe(),
        started_at=now(),
        stages={},
    )
    del all_prompts, part
    give_back_memory()
    return str(it.path)


def shard_paths(it: IterationDir, k: int) -> tuple[Path, Path]:
    """Shard k's samples and its completion marker (which holds the shard's sampling figures)."""
    n = it.run.config().sampling.shards
    out = it.path / "sampling" / f"samples-{k:03d}-of-{n:03d}.jsonl"
    return out, out.with_name(out.name + ".done")


def pending_shards(iter_dir: str) -> list[int]:
    it = IterationDir.from_path(iter_dir)
    return [k for k in range(it.run.config().sampling.shards) if not shard_paths(it, k)[1].is_file()]


def _shard_prompts(it: IterationDir, k: int) -> list[Prompt]:
    parts = read_jsonl(it.path / "prompts.jsonl", Prompt)
    n = it.run.config().sampling.shards
    return parts[round(k * len(parts) / n): round((k + 1) * len(parts) / n)]


def _sample_one_shard(it: IterationDir, k: int, sampler, progress: Progress | None) -> None:
    cfg = it.run.config()
    s = cfg.sampling
    t0 = time.time()
    parts = _shard_prompts(it, k)
    seed = cfg.run.seed * 1000 + it.index + 1_000_000 * k  # shard 0 of 1 keeps the unsharded seed
    params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                            seed=seed)
    completions = sampler.generate([p.text for p in parts], params, progress) if parts else []

    written = 0

    def samples():  # made as they are written: 600k Sample objects would be gigabytes
        nonlocal written
        for p, cs in zip(parts, completions):
            written += len(cs)
            yield from (Sample(prompt_id=p.id, candidate=j, prompt=p.text, response=c.text, num_tokens=c.num_tokens,
                               policy=f"iter_{it.index - 1:03d}") for j, c in enumerate(cs))
            if (s.include_reference or cfg.pairs.rule == "spin") and p.reference:
                written += 1
                yield Sample(prompt_id=p.id, candidate=len(cs), prompt=p.text, response=p.reference,
                             num_tokens=sampler.count_tokens(p.reference), policy="reference")

    out, done = shard_paths(it, k)
    write_jsonl(out, samples())
    write_json(done, {"shard": k, "prompts": len(parts), "samples": written, "host": socket.gethostname(),
                      "pid": os.getpid(), "finished_at": now(), "seconds": round(time.time() - t0, 2), "sampling": dict(getattr(sampler, "info", {}) or {})})


def _shard_work(it: IterationDir, k: int) -> Path:
    """Shard k's journals and engine files (one shard: the unsharded layout)."""
    work = it.path / "sampling" if it.run.config().sampling.shards == 1 else it.path / "sampling" / f"shard-{k:03d}"
    work.mkdir(parents=True, exist_ok=True)
    return work


def _shard_sampler(it: IterationDir, k: int):
    cfg = it.run.config()
    return build_sampler(cfg.sampling, it.manifest()["parent_policy"]["path"], it.precision().inference_dtype,
                         _shard_work(it, k))


def sample_shard(iter_dir: str, k: int, progress: Progress | None = None) -> str:
    """Sample shard k of the iteration's prompts (a child run on the sampling pool, or the stage itself).

    Writes only the shard's own files, never the manifest, so shards on several machines never
    write the same file. A finished shard (its marker exists) is not sampled again.
    """
    it = IterationDir.from_path(iter_dir)
    out, done = shard_paths(it, k)
    if not done.is_file():
        _sample_one_shard(it, k, _shard_sampler(it, k), progress)
    return str(out)


def sample(iter_dir: str, progress: Progress | None = None) -> str:
    """Sample the shards not yet finished (in this process), then join them into samples.jsonl."""
    it = IterationDir.from_path(iter_dir)
    cfg = it.run.config()

    def work():
        sampler = None
        for k in pending_shards(iter_dir):
            if sampler is None or cfg.sampling.backend != "transformers":
                sampler = _shard_sampler(it, k)
            else:  # one model load for every shard this process samples
                sampler.journal = _shard_work(it, k) / "batches.jsonl"
            _sample_one_shard(it, k, sampler, progress)
        markers = []
        tmp = temporary_name(it.samples)
        with open(tmp, "wb") as joined:  # shard files in order, copied, not parsed
            for k in range(cfg.sampling.shards):
                out, done = shard_paths(it, k)
                markers.append(json.loads(done.read_text(encoding="utf-8")))
                with open(out, "rb") as f:
                    shutil.copyfileobj(f, joined)
        replace_durably(tmp, it.samples)
        total = tokens = 0
        for x in iter_jsonl(it.samples, Sample):  # a stream: the file may hold 600k candidates
            total, tokens = total + 1, tokens + x.num_tokens
        info = summarize_shards(markers)
        if info:
            it.update_manifest(sampling=info)
        return {"candidates": total, "mean_tokens": round(tokens / max(1, total), 1),
                "backend": cfg.sampling.backend, "shards": cfg.sampling.shards,
                "hosts": sorted({m["host"] for m in markers}),
                **{k: info[k] for k in (*THROUGHPUT, "reused_batches") if k in info}}

    return _run_stage(it, "sample", it.samples, work)


def summarize_shards(markers: list[dict]) -> dict:
    """The stage's sampling figures: one shard's as they are; several summed (tokens, sequences, seconds)."""
    infos = [m["sampling"] for m in markers if m.get("sampling")]
    if len(infos) <= 1:
        return infos[0] if infos else {}
    summed = {k: sum(i.get(k) or 0 for i in infos) for k in ("sequences", "tokens", "generate_seconds",
                                                             "reused_batches") if any(k in i for i in infos)}
    # Shards on separate machines overlap in time; the figure is per shard-second, not wall clock.
    secs = summed.get("generate_seconds")
    out = {**{k: v for k, v in infos[0].items() if k not in THROUGHPUT}, **summed, "shards": len(infos)}
    if secs:
        out.update(throughput(summed.get("sequences", 0), summed.get("tokens", 0), secs))
    return out


def judge(iter_dir: str, progress: Progress | None = None) -> str:
    it = IterationDir.from_path(iter_dir)
    cfg = it.run.config()

    def work():
        if cfg.pairs.rule == "spin":
            write_jsonl(it.judgments, [])
            return {"skipped": "pairs.rule spin needs no judge"}
        parts = {p.id: p for p in read_jsonl(it.path / "prompts.jsonl", Prompt)}
        jcfg, student = resolve_cascade(it.run, cfg.judge)
        judge_ = build_judge(jcfg, it.manifest()["parent_policy"]["path"], it.precision(), cfg.sampling,
                             it.path / "judge_server")
        try:  # samples.jsonl is read as a stream, prompt by prompt; judgments are counted, not kept
            _, info = judge_samples(judge_, parts, it.samples, it.judgments, progress, keep=False)
        finally:
            close_judge(judge_)
        counts, stop = info["counts"], {k: info[k] for k in ("unjudged_prompts", "budget_stop")}
        it.update_manifest(judge_outcomes=counts, judge_stop=stop)
        if student is not None:
            it.update_manifest(cascade={**student, "threshold": judge_.threshold, "routing": judge_.routing,
                                        **cascade_summary(it.judgments, judge_.teacher)})
        if info["records"] and counts["failed"] == info["records"]:
            raise RuntimeError(f"every one of {info['records']} judgments failed (kept in {it.judgments}; the same "
                               f"command asks them again); the first: {info['first_error']}")
        return {**counts, **stop}

    return _run_stage(it, "judge", it.judgments, work)


def cascade_summary(path: Path, teacher) -> dict:
    """Prompts each judge decided, the teacher's requests and dollars, and what judging every prompt with
    the teacher would have cost: its requests per prompt where it has a fixed count, otherwise the
    mean of the prompts it judged."""
    by: dict[str, str] = {}
    k: dict[str, int] = {}
    requests = cost = 0.0
    for j in iter_jsonl(path, Judgment):
        by[j.prompt_id] = j.details.get("decided_by", "teacher")
        k[j.prompt_id] = k.get(j.prompt_id, 0) + 1
        requests += j.requests
        cost += j.cost_usd
    student = [pid for pid, d in by.items() if d == "student"]
    taught = len(by) - len(student)
    per_prompt = getattr(teacher, "prompt_requests", None)
    if per_prompt is not None:
        saved_requests = sum(per_prompt(k[pid]) for pid in student)
    else:
        saved_requests = requests / taught * len(student) if taught else None
    saved_usd = cost / requests * saved_requests if requests and saved_requests is not None else 0.0
    return {"prompts_student": len(student), "prompts_teacher": taught,
            "share_student": round(len(student) / len(by), 4) if by else None,
            "teacher_requests": int(requests), "teacher_usd": round(cost, 6),
            "requests_saved": None if saved_requests is None else round(saved_requests),
            "usd_saved": round(saved_usd, 6),
            "share_saved": round(saved_requests / (saved_requests + requests), 4)
            if saved_requests is not None and saved_requests + requests else None}


def reopen_failed_judgments(it: IterationDir) -> int:
    """Drop the judge stage's failed records so the stage asks those prompts again; return how many.

    Replies that parsed are in the judge's cache, so a prompt with one failed candidate costs
    only that candidate's requests. The stages after judging are redone on the new judgments.
    Refused on a complete iteration: its policy was trained on the old ones.
    """
    if it.complete:
        raise UserError(f"{it.path.name} is complete: its pairs and policy were made from these judgments; "
                           f"roll back to {it.index - 1} and run again instead")
    if not it.judgments.is_file():
        return 0
    failed, records = set(), 0  # two streamed passes: the file may hold 600k judgments
    for j in iter_jsonl(it.judgments, Judgment):
        if j.outcome == "failed":
            failed.add(j.prompt_id)
            records += 1
    if not failed:
        return 0
    write_jsonl(it.judgments, (j for j in iter_jsonl(it.judgments, Judgment) if j.prompt_id not in failed))
    stages = {k: v for k, v in it.manifest().get("stages", {}).items() if k not in STAGES[1:]}
    it.update_manifest(stages=stages)
    log.info("%s: asking the judge again for %d prompt(s) with failed judgments", it.path.name, len(failed))
    return records


def select(iter_dir: str) -> str:
    it = IterationDir.from_path(iter_dir)
    cfg = it.run.config()

    def work():
        p = cfg.pairs
        # Prompt by prompt from both files: samples in their order, each prompt's judgments by offset.
        samples = grouped(iter_jsonl(it.samples, Sample), it.samples)
        if p.rule == "spin":
            fresh, stats = pair_rules.spin_grouped(samples, p.per_prompt, it.index)
        else:
            blocks = prompt_blocks(it.judgments)
            groups = ((pid, group, read_block(it.judgments, blocks[pid], Judgment) if pid in blocks else [])
                      for pid, group in samples)
            fresh, stats = pair_rules.select_grouped(groups, p.min_chosen_score, p.min_margin, p.per_prompt,
                                                     p.rule, p.teacher_margin, it.index)
        if p.length_guard.action == "drop":
            fresh = pair_rules.length_guard(fresh, p.length_guard.max_ratio, stats)
        earlier = []  # lag 1, 2, ...: the iterations this one descends from, never rolled-back ones
        for prev in it.run.lineage(before=it.index)[::-1][: len(p.replay)]:
            earlier.append((prev.index, [x for x in read_jsonl(prev.pairs, Pair) if x.iteration in (None, prev.index)]))
        training = fresh + pair_rules.replay(len(fresh), earlier, p.replay, cfg.run.seed, stats)
        pair_rules.finish_stats(stats, training)
        write_jsonl(it.pairs, training)
        it.update_manifest(pairs=vars(stats))
        return {"pairs": stats.pairs, "training_pairs": stats.training_pairs, "prompts_dropped": stats.prompts_dropped}

    return _run_stage(it, "select_pairs", it.pairs, work)


def train(iter_dir: str, progress: Progress | None = None) -> str:
    it = IterationDir.from_path(iter_dir)
    cfg = it.run.config()

    def work():
        if not read_jsonl(it.pairs, Pair):
            m = it.manifest()
            reasons = m.get("pairs", {}).get("drop_reasons", {})
            judged = {k: m.get("judge_outcomes", {}).get(k, 0) for k in OUTCOMES}
            raise RuntimeError(
                f"no pairs kept in {it.pairs} (dropped: {reasons}; judgments: {judged}); lower pairs.min_margin "
                "or pairs.min_chosen_score, or raise sampling.n"
            )
        metrics = train_in_subprocess(it.path, cfg.train, progress)
        it.update_manifest(train=metrics)
        return {"steps": metrics["steps"]}

    return _run_stage(it, "train", it.policy, work)


def evaluate(iter_dir: str, progress: Progress | None = None) -> str:
    it = IterationDir.from_path(iter_dir)

    def work():
        return evaluation.evaluate_iteration(it, progress)

    return _run_stage(it, "evaluate", it.metrics, work)


def finalize(iter_dir: str) -> str:
    """Hash every file and mark the iteration complete: from here on readers trust it."""
    it = IterationDir.from_path(iter_dir)
    m = it.manifest()
    missing = [s for s in STAGES if m.get("stages", {}).get(s, {}).get("status") != "complete"]
    if missing:
        raise RuntimeError(f"{it.path}: stages not complete: {', '.join(missing)}")
    metrics = json.loads(it.metrics.read_text())
    # Judging spend of this iteration (training judgments and evaluation), and of the run so far.
    spend = {k: m.get("judge_outcomes", {}).get(k, 0) + metrics.get("eval_judge_usage", {}).get(k, 0) for k in USAGE}
    # Rolled-back iterations were paid for too.
    earlier = [p.manifest().get("judge_spend", {}).get("iteration", {}) for p in it.run.iterations()
               if p.index < it.index and (p.complete or p.rolled_back)]
    run_total = {k: sum(e.get(k, 0) for e in earlier) + spend[k] for k in USAGE}
    write_card(it)  # policy/README.md, hashed with the weights
    it.update_manifest(
        judge_spend={"iteration": spend, "run": run_total},
        files=it.file_hashes(),
        metrics={
            **metrics["headline"],
            "constraint_pass_rate": metrics["win_rate"]["constraint_pass_rate"],
            "reference_pass_rate": metrics["win_rate"]["reference_pass_rate"],
        },
        timings={s: m["stages"][s]["seconds"] for s in STAGES},
        finished_at=now(),
        status="complete",
        error=None,       # an earlier attempt's failure, resumed since
        traceback=None,
    )
    if metrics["headline"]["promoted"]:
        it.run.record_promotion(metrics["headline"], it.policy)
    tracking.sync(it.run)
    for gone in it.run.prune_policies(it.run.config().run.keep_policies):
        log.info("run.keep_policies=%s: deleted the weights of %s", it.run.config().run.keep_policies, gone.path.name)
    return str(it.manifest_path)


def run_iteration(run_dir: str) -> str:
    """All stages of the next iteration, without Prefect."""
    path = prepare(run_dir)
    for stage in (sample, judge, select, train, evaluate):
        stage(path)
    return finalize(path)
