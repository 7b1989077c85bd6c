"""What one iteration will cost, before anything is paid: `nash plan` and the start of `nash run`.

Sampling: sequences and output tokens (at most `sampling.max_new_tokens` each; the last
iteration's mean where the run has one), and GPU-hours at a throughput the user gives or the
last iteration measured. Judging: requests by protocol, input tokens from the judge's own
request texts (its template with the prompts of the next partition) plus the candidates'
expected lengths, output tokens from the last iteration's replies (else `judge.max_tokens`, an
upper bound), and dollars at the judge's prices. Disk: the files the iteration writes.

Tokens are counted with the policy's tokenizer: an API judge's own tokenizer differs (for
GPT-4-Turbo by about a tenth on English text), so a plan is an estimate, and says which of its
figures are measured and which are bounds.
"""

from __future__ import annotations

import json
from pathlib import Path

from nash.errors import UserError

SAMPLE_PROMPTS = 200  # prompts of the partition whose request texts are built and counted


def _lm_judges(cfg) -> list:
    """The judge sections that ask a language model, through a composite's components."""
    if cfg.kind == "composite":
        return [j for c in cfg.components for j in _lm_judges(c)]
    if cfg.kind == "cascade":  # planned as if the teacher judged every prompt: an upper bound
        return _lm_judges(cfg.teacher)
    return [cfg] if cfg.kind in ("openai", "self", "hf") else []


def _requests_per_prompt(protocol: str, k: int, repeats: int) -> int:
    return {"pointwise": k * repeats, "batched": 1, "pairwise": k * (k - 1)}[protocol]


def _candidates_per_request(protocol: str, k: int) -> int:
    return {"pointwise": 1, "batched": k, "pairwise": 2}[protocol]


def _last_measured(run) -> dict:
    """Per-candidate and per-request means of the run's last complete iteration."""
    if run is None or not run.path.is_dir():
        return {}
    done = run.lineage()
    if not done:
        return {}
    m = done[-1].manifest()
    sample, outcomes = m.get("stages", {}).get("sample", {}), m.get("judge_outcomes", {})
    out = {"from": done[-1].path.name}
    if sample.get("mean_tokens"):
        out["candidate_tokens"] = sample["mean_tokens"]
    if sample.get("tokens_per_second"):
        out["tokens_per_second"] = sample["tokens_per_second"]
    if outcomes.get("requests"):
        out["tokens_in_per_request"] = outcomes.get("tokens_in", 0) / outcomes["requests"]
        out["tokens_out_per_request"] = outcomes.get("tokens_out", 0) / outcomes["requests"]
    return out


def plan_iteration(cfg, run=None, prompts: int | None = None, tokens_per_second: float | None = None) -> dict:
    """The plan of the run's next iteration (or of one of `prompts` prompts)."""
    from nash import prompts as prompt_sources
    from nash.models import load_tokenizer
    from nash.policy import resolve_policy
    from nash.preflight import load_run_prompts

    s = cfg.sampling
    index = run.next_iteration().index if run is not None and run.path.is_dir() else 1
    all_prompts = load_run_prompts(cfg)
    n = prompts or cfg.prompts.partition_size
    try:
        part = prompt_sources.partition(all_prompts, index, cfg.prompts.partition_size, cfg.prompts.seed)
    except UserError:
        part = [p for p in all_prompts if p.split == "train"]
    sample_prompts = part[:SAMPLE_PROMPTS]
    gold = (s.include_reference or cfg.pairs.rule == "spin") and any(p.reference for p in sample_prompts)
    k = s.n + (1 if gold else 0)
    measured = _last_measured(run)
    tok = load_tokenizer(resolve_policy(cfg.policy.model))

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    sample_tokens = measured.get("candidate_tokens", s.max_new_tokens)
    gold_tokens = (sum(count(p.reference) for p in sample_prompts if p.reference) / max(1, len(sample_prompts))
                   if gold else 0.0)
    sampling = {"sequences": n * s.n, "max_output_tokens": n * s.n * s.max_new_tokens,
                "expected_output_tokens": round(n * s.n * sample_tokens),
                "candidate_tokens": sample_tokens, "candidate_tokens_measured": "candidate_tokens" in measured}
    tps = tokens_per_second or measured.get("tokens_per_second")
    sampling["tokens_per_second"] = tps
    sampling["gpu_hours"] = round(sampling["expected_output_tokens"] / tps / 3600, 3) if tps else None

    judging = {"requests": 0, "tokens_in": 0, "tokens_out": 0, "usd": 0.0, "judges": [],
               "measured": "tokens_in_per_request" in measured}
    if cfg.pairs.rule != "spin":
        for jcfg in _lm_judges(cfg.judge):
            per_prompt = _requests_per_prompt(jcfg.protocol, k, getattr(jcfg, "repeats", 1))
            requests = n * per_prompt
            if "tokens_in_per_request" in measured:
                tin, tout = measured["tokens_in_per_request"], measured["tokens_out_per_request"]
            else:
                tin = _tokens_in(_offline_judge(jcfg), jcfg, sample_prompts, k, sample_tokens, gold_tokens, count)
                tout = jcfg.max_tokens  # an upper bound until a reply has been measured
            usd = (requests * tin * jcfg.price_input_per_mtok + requests * tout * jcfg.price_output_per_mtok) / 1e6
            judging["judges"].append({"kind": jcfg.kind, "protocol": jcfg.protocol, "model": getattr(jcfg, "model", None),
                                      "requests": requests, "tokens_in": round(requests * tin),
                                      "tokens_out": round(requests * tout), "usd": round(usd, 2)})
            judging["requests"] += requests
            judging["tokens_in"] += round(requests * tin)
            judging["tokens_out"] += round(requests * tout)
            judging["usd"] += usd
    judging["usd"] = round(judging["usd"], 2)
    budget = getattr(cfg.judge.teacher if cfg.judge.kind == "cascade" else cfg.judge, "budget_usd", None)
    judging["budget_usd"] = budget

    chars_per_token = 4.0
    prompt_chars = sum(len(p.text) for p in sample_prompts) / max(1, len(sample_prompts))
    candidate_chars = chars_per_token * (s.n * sample_tokens + gold_tokens) / k
    disk = {"samples_bytes": round(n * k * (prompt_chars + candidate_chars + 160)),
            "judgments_bytes": round(n * k * 330 + judging["tokens_out"] * chars_per_token),
            "policy_bytes": _policy_bytes(run, cfg)}
    return {"iteration": index, "prompts": n, "candidates_per_prompt": k, "candidates": n * k,
            "sampling": sampling, "judging": judging, "disk": disk, "measured_from": measured.get("from")}


def _offline_judge(jcfg):
    """The judge's request texts without its server or key: the template is all a plan needs."""
    from nash.judges.lm import LMJudge

    class Offline:
        identity: dict = {}

    return LMJudge(jcfg.kind, Offline(), jcfg)


def _tokens_in(judge, jcfg, prompts, k: int, sample_tokens: float, gold_tokens: float, count) -> float:
    """Mean input tokens of one request: the judge's own request text around empty candidates, plus
    the expected candidate lengths it carries."""
    if judge is None or not prompts:
        return 0.0
    per_candidate = (sample_tokens * (k - (1 if gold_tokens else 0)) + gold_tokens) / k
    total = 0.0
    for p in prompts:
        texts = judge.request_texts(p, [""] * k)
        total += sum(count(t) for t in texts) / len(texts)
    return total / len(prompts) + _candidates_per_request(jcfg.protocol, k) * per_candidate


def _policy_bytes(run, cfg) -> int | None:
    from nash.policy import resolve_policy

    path = Path(resolve_policy(cfg.policy.model))
    if run is not None and run.path.is_dir() and run.last_complete() is not None:
        path = run.last_complete().policy
    files = list(path.glob("*.safetensors")) + list(path.glob("*.bin")) if path.is_dir() else []
    return sum(f.stat().st_size for f in files) or None


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def summary(plan: dict) -> str:
    """One line: what `nash run` prints before the iteration starts."""
    j, s = plan["judging"], plan["sampling"]
    measured = f"as measured in {plan['measured_from']}" if plan["measured_from"] else "upper bounds"
    gpu = f", {s['gpu_hours']:.2f} GPU-h" if s["gpu_hours"] is not None else ""
    judging = (f"judging {j['requests']:,} requests, {j['tokens_in']:,} tokens in, {j['tokens_out']:,} out, "
               f"${j['usd']:.2f} ({measured})" if j["requests"] else "judging on this machine, no model requests")
    return (f"plan for iter_{plan['iteration']:03d}: {plan['prompts']} prompts x {plan['candidates_per_prompt']} "
            f"candidates; sampling {s['sequences']} sequences, ~{s['expected_output_tokens']:,} tokens{gpu}; "
            f"{judging}; disk ~{_size(sum(v or 0 for v in plan['disk'].values()))}")


def markdown(plan: dict) -> str:
    j, s, d = plan["judging"], plan["sampling"], plan["disk"]
    rows = [f"# Plan for iter_{plan['iteration']:03d}", "", summary(plan), "",
            "| | figure |", "|---|---|",
            f"| prompts x candidates | {plan['prompts']} x {plan['candidates_per_prompt']} |",
            f"| sampling: sequences | {s['sequences']:,} |",
            f"| sampling: output tokens (expected / at most) | {s['expected_output_tokens']:,} / {s['max_output_tokens']:,} |",
            f"| sampling: GPU-hours at {s['tokens_per_second'] or '-'} tokens/s | {s['gpu_hours'] if s['gpu_hours'] is not None else '-'} |"]
    for x in j["judges"]:
        rows.append(f"| judge {x['kind']} {x['model'] or ''} ({x['protocol']}) | {x['requests']:,} requests, "
                    f"{x['tokens_in']:,} in, {x['tokens_out']:,} out, ${x['usd']:.2f} |")
    budget = f"${j['budget_usd']:.2f}" if j["budget_usd"] else "none"
    rows += [f"| judging budget (judge.budget_usd) | {budget} |",
             f"| disk: samples, judgments, policy | {_size(d['samples_bytes'])}, {_size(d['judgments_bytes'])}, "
             f"{_size(d['policy_bytes'])} |"]
    return "\n".join(rows) + "\n"


def check_budget(plan: dict, over_budget: bool) -> str | None:
    """Refuse an iteration whose planned judging cost exceeds `judge.budget_usd`; the message, or None."""
    j = plan["judging"]
    if j["budget_usd"] is None or j["usd"] <= j["budget_usd"]:
        return None
    text = (f"the plan for iter_{plan['iteration']:03d} puts judging at ${j['usd']:.2f}, over judge.budget_usd "
            f"${j['budget_usd']:.2f} ({j['requests']:,} requests, {j['tokens_in']:,} tokens in, {j['tokens_out']:,} "
            "out)")
    if over_budget:
        return text + "; going on (--over-budget): judging stops when the budget is spent"
    raise UserError(text + "; raise judge.budget_usd, lower prompts.partition_size, or pass --over-budget to start "
                    "anyway (judging then stops when the budget is spent)")


def to_json(plan: dict) -> str:
    return json.dumps(plan, indent=1)
