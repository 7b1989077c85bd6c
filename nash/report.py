"""Across iterations: the evaluation table, the plot, drift and win-rate warnings, promotion.

Each complete iteration's `metrics.json` has a `headline` block; the table, the plot, the
warnings and `eval.promote_if` all read those blocks, so nothing here recomputes a metric.
"""

from __future__ import annotations

import json
import math
import operator
from pathlib import Path

from nash.config import parse_condition
from nash.records import Sample, read_jsonl


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_win_rate(h: dict) -> str:
    """'0.641 ± 0.041' from a headline's win rate and standard error."""
    se = h.get("win_rate_se")
    return fmt(h.get("win_rate")) + (f" ± {se:.3f}" if se is not None else "")


def fmt_promoted(h: dict) -> str:
    return {True: "yes", False: "no"}.get(h.get("promoted"), "-")


def iteration_row(manifest: dict) -> dict:
    """One row of the per-iteration table (Prefect artifact and `nash status`)."""
    m, p, t = manifest.get("metrics", {}), manifest.get("pairs", {}), manifest.get("train", {})
    replayed = sum(r.get("drawn", 0) for r in p.get("replayed", {}).values())
    return {
        "iteration": manifest.get("iteration"),
        "status": manifest.get("status", "missing"),
        "candidates": manifest.get("stages", {}).get("sample", {}).get("candidates", "-"),
        "sampling tok/s": fmt(manifest.get("stages", {}).get("sample", {}).get("tokens_per_second"), 0),
        "pairs kept": p.get("pairs", "-"),
        "prompts dropped": p.get("prompts_dropped", "-"),
        "replayed": replayed if p else "-",
        "tokens chosen/rejected": f"{fmt(p.get('chosen_mean_tokens'), 0)}/{fmt(p.get('rejected_mean_tokens'), 0)}",
        "loss": fmt(t.get("train_loss")),
        "reward acc": fmt(t.get("reward_accuracy_mean"), 2),
        "reward margin": fmt(t.get("reward_margin_mean")),
        "KL to π_t": fmt(t.get("kl_from_parent"), 4),
        "pass rate": fmt(m.get("pass_rate")),
        "real pass": fmt(m.get("substantive_pass_rate")),
        "degenerate": fmt(m.get("degenerate")),
        "win rate": fmt_win_rate(m),
        "vs": m.get("against", "-"),
        "LC win rate": fmt(m.get("lc_win_rate")),
        "KL to π_0": fmt(m.get("kl_from_initial"), 4),
        "rank shift": fmt(m.get("rank_shift")),
        "retention": fmt(m.get("retention")),
        "promoted": fmt_promoted(m),
        "weights": "deleted" if manifest.get("policy_deleted_at") else
                   "on disk" if manifest.get("status") in ("complete", "rolled_back") else "-",
        "judge $": f"{manifest.get('judge_spend', {}).get('iteration', {}).get('cost_usd', 0.0):.2f}",
        "student decided": fmt(manifest["cascade"].get("share_student"), 2) if manifest.get("cascade") else "-",
        "seconds": round(sum(manifest.get("timings", {}).values())),
    }


OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
# For `best`: the direction in which each metric is better.
HIGHER_IS_BETTER = {"win_rate": True, "lc_win_rate": True, "pass_rate": True, "kl_from_initial": False,
                    "perplexity": False, "mean_length": False, "substantive_pass_rate": True, "degenerate": False,
                    "degenerate_rise": False, "length_ratio": False, "retention": True, "retention_drop": False,
                    "rank_shift": False}


def comparison_headline(result: dict) -> dict:
    """The headline fields of one comparison (`evaluation.compare` plus what it was against)."""
    return {"against": result["generator"], "n": result["n"], "win_rate": result["win_rate"],
            "win_rate_se": result["standard_error"], "lc_win_rate": result["lc_win_rate"],
            "failed": result["failed"] + result["unjudged"], "mean_length": result["mean_tokens"]}


def headlines(run, before: int | None = None) -> list[dict]:
    """Headline metrics of the run's complete iterations (those before `before`, if given)."""
    out = []
    for it in run.iterations():
        if (before is None or it.index < before) and it.complete and it.metrics.is_file():
            h = json.loads(it.metrics.read_text()).get("headline")
            if h:
                out.append(h)
    return out


def warnings_for(head: dict, earlier: list[dict], eval_cfg, train: dict | None = None) -> list[str]:
    """What a reader must not miss: degeneration or a length shift against π_0, no usable annotation,
    an update that did not move the policy, a fall in win rate or a jump in drift against the previous
    iteration."""
    name, out = f"iter_{head['iteration']:03d}", []
    if not head.get("n"):
        out.append(f"{name}: no usable annotation ({head.get('failed', 0)} failed or unjudged): the win rate is "
                   "unknown and the iteration is not promoted")
    d, d0 = head.get("degenerate"), head.get("initial_degenerate")
    if d is not None and d0 is not None and d - d0 > eval_cfg.warn_degenerate_rise:
        out.append(f"{name}: degenerate answers (empty, short, repetitive or off topic) rose from {d0:.3f} for π_0 "
                   f"to {d:.3f} (more than eval.warn_degenerate_rise={eval_cfg.warn_degenerate_rise}); read them "
                   "with `nash samples`")
    r = head.get("length_ratio")
    if r is not None and r > 0 and max(r, 1 / r) > eval_cfg.warn_length_ratio:
        out.append(f"{name}: mean answer length is {r:.2f}x π_0's (beyond eval.warn_length_ratio="
                   f"{eval_cfg.warn_length_ratio})")
    drop, r = head.get("retention_drop"), eval_cfg.retention
    if drop is not None and r is not None and r.max_drop is not None and drop > r.max_drop:
        out.append(f"{name}: retention of general knowledge fell from {head['initial_retention']:.3f} for π_0 to "
                   f"{head['retention']:.3f} (a drop of {drop:.3f} ± {head.get('retention_drop_se') or 0:.3f}, more "
                   f"than eval.retention.max_drop={r.max_drop}): the update made it forget; see retention in "
                   "metrics.json for the items and subjects")
    train = train or {}
    loss, kl = train.get("last_step_loss"), train.get("kl_from_parent")
    if kl is not None and kl < 1e-4 and (loss is None or abs(loss - math.log(2)) < 1e-3):
        out.append(f"{name}: the update did not move the policy (KL to π_t {kl:.2e}, last loss {fmt(loss, 4)}, "
                   f"{train.get('steps', '?')} step(s)): too few pairs or steps, or a learning rate still warming up")
    if not earlier:
        return out
    prev = earlier[-1]
    w, pw = head.get("win_rate"), prev.get("win_rate")
    if w is not None and pw is not None and pw - w > eval_cfg.warn_win_rate_drop:
        out.append(f"{name}: win rate fell from {pw:.3f} to {w:.3f} "
                   f"(more than eval.warn_win_rate_drop={eval_cfg.warn_win_rate_drop})")
    k, pk = head.get("kl_from_initial"), prev.get("kl_from_initial")
    if k is not None and pk and k > eval_cfg.warn_kl_ratio * pk:
        out.append(f"{name}: KL from π_0 jumped from {pk:.4f} to {k:.4f} "
                   f"(more than eval.warn_kl_ratio={eval_cfg.warn_kl_ratio}x)")
    return out


def promotion_conditions(eval_cfg) -> list[str]:
    """`eval.promote_if`, and the forgetting gate where the retention probe is on."""
    r = eval_cfg.retention
    gate = [f"retention_drop <= {r.max_drop:g}"] if r is not None and r.max_drop is not None else []
    return list(eval_cfg.promote_if) + [c for c in gate if c not in eval_cfg.promote_if]


def promotion(head: dict, earlier: list[dict], conditions: list[str], versus: dict | None = None) -> dict:
    """Whether the iteration is promoted: every condition (`eval.promote_if`, the forgetting gate) and, where `eval.gate` is on,
    the head-to-head decision against the promoted policy (nash/gate.py); with one reason to read.

    An iteration whose evaluation has no usable annotation is never promoted, whatever the conditions.
    """
    checks = [{"condition": "n > 0 (usable annotations)", "value": head.get("n"), "target": 0,
               "ok": bool(head.get("n"))}]
    for text in conditions:
        metric, op, ref = parse_condition(text)
        value = head.get(metric)
        if ref == "best":
            seen = [e[metric] for e in earlier if e.get(metric) is not None]
            target = (max if HIGHER_IS_BETTER[metric] else min)(seen) if seen else None
        elif ref == "previous":
            target = earlier[-1].get(metric) if earlier else None
        else:
            target = float(ref)
        # Nothing to compare with yet (the first iteration against `best`) passes.
        ok = True if target is None else (value is not None and OPS[op](value, target))
        checks.append({"condition": text, "value": value, "target": target, "ok": ok})
    failed = [f"{c['condition']} ({fmt(c['value'])})" for c in checks if not c["ok"]]
    if versus is not None:
        checks += versus["checks"]
    if failed:
        unmet = "not met: " + "; ".join(failed)
        if versus is not None and not versus["promoted"]:
            return {"promoted": False, "checks": checks, "reason": f"{versus['reason']}; {unmet}"}
        return {"promoted": False, "checks": checks, "reason": f"refused: {unmet}"}
    if versus is not None:
        return {"promoted": versus["promoted"], "checks": checks, "reason": versus["reason"]}
    return {"promoted": True, "checks": checks, "reason": "promoted: every promotion condition holds"}


def decisions_text(heads: list[dict]) -> str:
    """One line per iteration: promoted or refused, and why."""
    return "\n".join(f"  iter_{h['iteration']:03d} {h['promotion_reason']}" for h in heads if h.get("promotion_reason"))


def table_rows(heads: list[dict]) -> list[dict]:
    return [{
        "iteration": h["iteration"],
        "against": h.get("against", "-"),
        "n": h.get("n", "-"),
        "win rate": fmt_win_rate(h),
        "LC win rate": fmt(h.get("lc_win_rate")),
        "failed": h.get("failed", 0),
        "mean tokens": fmt(h.get("mean_length"), 1),
        "pass rate": fmt(h.get("pass_rate")),
        "real pass (π_0)": f"{fmt(h.get('substantive_pass_rate'))} ({fmt(h.get('initial_substantive_pass_rate'))})",
        "degenerate (π_0)": f"{fmt(h.get('degenerate'))} ({fmt(h.get('initial_degenerate'))})",
        "length x π_0": fmt(h.get("length_ratio"), 2),
        "KL to π_0": fmt(h.get("kl_from_initial"), 4),
        "rank shift": fmt(h.get("rank_shift")),
        "retention (π_0)": f"{fmt(h.get('retention'))} ({fmt(h.get('initial_retention'))})",
        "perplexity": fmt(h.get("perplexity"), 2),
        "head to head": fmt_versus(h),
        "promoted": fmt_promoted(h),
    } for h in heads]


def fmt_versus(h: dict) -> str:
    """'iter_003: 0.430, real pass -0.094': win rate against the policy it had to beat, and the
    change in the real pass rate, prompt by prompt."""
    v = h.get("versus")
    if not v:
        return "-"
    win = v.get("win_rate", {}).get("mean")
    real = v.get("substantive_pass_rate", {}).get("mean")
    parts = [fmt(win + 0.5) if win is not None else "-"]
    if real is not None:
        parts.append(f"real pass {real:+.3f}")
    return f"{v['against']}: " + ", ".join(parts)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "  no evaluated iterations yet"
    head = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in head]
    lines = ["  " + "  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  " + "  ".join(str(r[h]).ljust(w) for h, w in zip(head, widths)) for r in rows]
    return "\n".join(lines)


def baseline_head(run) -> dict | None:
    """π_0 as iteration 0 of the plot, where the reference outputs are π_0's own (win rate 0.5)."""
    samples = run.baseline_dir / "eval" / "samples.jsonl"
    if run.config().eval.reference != "initial" or not samples.is_file():
        return None
    rows = read_jsonl(samples, Sample)
    drift = run.baseline_dir / "drift.json"
    return {"iteration": 0, "against": "iter_000", "n": len(rows), "win_rate": 0.5, "win_rate_se": None,
            "lc_win_rate": 0.5, "mean_length": sum(r.num_tokens for r in rows) / max(1, len(rows)),
            "kl_from_initial": 0.0,
            "perplexity": json.loads(drift.read_text())["perplexity"] if drift.is_file() else None}


def plot_run(run, heads: list[dict], title: str = "") -> Path | None:
    base = baseline_head(run) if heads and heads[0]["iteration"] == 1 else None
    if base:  # π_0's own degeneration figures, as every evaluation measured them
        base.update(substantive_pass_rate=heads[0].get("initial_substantive_pass_rate"),
                    degenerate=heads[0].get("initial_degenerate"), retention=heads[0].get("initial_retention"))
    return plot(([base] if base else []) + heads, run.plot_path, title)


def plot(heads: list[dict], path: Path, title: str = "") -> Path | None:
    """Win rate (± SE), LC win rate, real pass rate, degenerate share, retention and mean answer length against
    iteration, the win rate against the policy each iteration had to beat, and which were promoted
    (star) or refused (x), as a PNG."""
    if not heads:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [h["iteration"] for h in heads]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    wr = [h.get("win_rate") for h in heads]
    se = [h.get("win_rate_se") or 0.0 for h in heads]
    ax.errorbar(xs, [w if w is not None else float("nan") for w in wr], yerr=se, marker="o", capsize=3,
                label="win rate (± SE)")
    ax.plot(xs, [h.get("lc_win_rate") if h.get("lc_win_rate") is not None else float("nan") for h in heads],
            marker="s", label="LC win rate")
    for key, label, style, color in (("substantive_pass_rate", "real pass rate", "D-.", "tab:purple"),
                                     ("degenerate", "degenerate share", "x:", "tab:red"),
                                     ("retention", "retention (knowledge)", "P-", "tab:olive")):
        ys = [h.get(key) for h in heads]
        if any(y is not None for y in ys):
            ax.plot(xs, [y if y is not None else float("nan") for y in ys], style, color=color, label=label)
    versus = [(h["iteration"], h["versus"]["win_rate"]) for h in heads
              if (h.get("versus") or {}).get("win_rate", {}).get("mean") is not None]
    if versus:  # against the policy each iteration had to beat, with the gate's interval
        vx = [x for x, _ in versus]
        vy = [v["mean"] + 0.5 for _, v in versus]
        err = [[v["mean"] - v["low"] for _, v in versus], [v["high"] - v["mean"] for _, v in versus]]
        ax.errorbar(vx, vy, yerr=err, fmt="v", color="tab:brown", capsize=3, label="win rate vs promoted (CI)")
    labelled = set()
    for h in heads:  # the promoted lineage along the top
        if h.get("promoted") is not None:
            kind = "promoted" if h["promoted"] else "refused"
            ax.plot(h["iteration"], 0.97, "*" if h["promoted"] else "x", ms=10 if h["promoted"] else 7,
                    color="gold" if h["promoted"] else "grey", markeredgecolor="black" if h["promoted"] else None,
                    ls="none", label=None if kind in labelled else kind)
            labelled.add(kind)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"rate (win rate vs {heads[-1].get('against', 'reference')})")
    ax.set_ylim(0, 1)
    ax.set_xticks(xs)
    ax2 = ax.twinx()
    ax2.plot(xs, [h.get("mean_length") or float("nan") for h in heads], color="tab:green", marker="^", ls="--",
             label="mean answer tokens")
    ax2.set_ylabel("mean answer tokens")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower left", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


FLAG_NAMES = ("empty", "short", "repetitive", "off_topic")


def _flags(answer: dict) -> str:
    flags = [f.replace("_", " ") for f in FLAG_NAMES if answer.get(f)]
    if "empty" in flags:
        flags.remove("short")
    return f"  [{', '.join(flags)}]" if flags else ""


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def samples_text(rows: list[dict], limit: int = 300) -> str:
    """Side-by-side answers for the terminal: each prompt, then each policy's answer and its flags."""
    out = []
    for i, r in enumerate(rows, 1):
        out.append(f"[{i}] {r['prompt']}")
        width = max(len(name) for name in r["answers"])
        for name, a in r["answers"].items():
            out.append(f"    {name.ljust(width)}  {_clip(a['text'], limit) or '(empty)'}{_flags(a)}")
        out.append("")
    return "\n".join(out)


def samples_markdown(rows: list[dict], title: str, limit: int = 400) -> str:
    """The same answers as a markdown artifact: one table per prompt."""
    out = [f"# {title}", "", "Greedy answers to the same held-out prompts. Flags: empty, short, repetitive, "
           "off topic (the answer never names its topic).", ""]
    for i, r in enumerate(rows, 1):
        out += [f"**{i}. {r['prompt']}**", "", "| policy | answer | flags |", "|---|---|---|"]
        for name, a in r["answers"].items():
            text = _clip(a["text"], limit).replace("|", "\\|") or "*(empty)*"
            out.append(f"| {name} | {text} | {_flags(a).strip(' []')} |")
        out.append("")
    return "\n".join(out)
