"""Across iterations: the evaluation table, the plot, drift and win-rate warnings, promotion.

Each complete iteration's `metrics.json` has a `headline` block; the table, the plot, the
warnings and `eval.promote_if` all read those blocks, so nothing here recomputes a metric.
"""

from __future__ import annotations

import json
import operator
from pathlib import Path

from nash.config import parse_condition
from nash.records import Sample, read_jsonl, write_json
from nash.registry import fmt, fmt_promoted, fmt_win_rate

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
# For `best`: the direction in which each metric is better.
HIGHER_IS_BETTER = {"win_rate": True, "lc_win_rate": True, "pass_rate": True, "kl_from_initial": False,
                    "perplexity": False, "mean_length": False}


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


def warnings_for(head: dict, earlier: list[dict], eval_cfg) -> list[str]:
    """A fall in win rate or a jump in drift against the previous iteration."""
    if not earlier:
        return []
    prev, out = earlier[-1], []
    w, pw = head.get("win_rate"), prev.get("win_rate")
    if w is not None and pw is not None and pw - w > eval_cfg.warn_win_rate_drop:
        out.append(f"iter_{head['iteration']:03d}: win rate fell from {pw:.3f} to {w:.3f} "
                   f"(more than eval.warn_win_rate_drop={eval_cfg.warn_win_rate_drop})")
    k, pk = head.get("kl_from_initial"), prev.get("kl_from_initial")
    if k is not None and pk and k > eval_cfg.warn_kl_ratio * pk:
        out.append(f"iter_{head['iteration']:03d}: KL from π_0 jumped from {pk:.4f} to {k:.4f} "
                   f"(more than eval.warn_kl_ratio={eval_cfg.warn_kl_ratio}x)")
    return out


def promotion(head: dict, earlier: list[dict], conditions: list[str]) -> dict:
    """Whether the iteration meets every `eval.promote_if` condition, with the reason for each."""
    checks = []
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
    return {"promoted": all(c["ok"] for c in checks), "checks": checks}


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
        "KL to π_0": fmt(h.get("kl_from_initial"), 4),
        "perplexity": fmt(h.get("perplexity"), 2),
        "promoted": fmt_promoted(h),
    } for h in heads]


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
    return plot(([base] if base else []) + heads, run.plot_path, title)


def plot(heads: list[dict], path: Path, title: str = "") -> Path | None:
    """Win rate (± SE), LC win rate and mean answer length against iteration, as a PNG."""
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
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"win rate vs {heads[-1].get('against', 'reference')}")
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


def record_promotion(run, head: dict, policy: Path) -> None:
    write_json(run.promoted_path, {"iteration": head["iteration"], "policy": str(policy), "headline": head})
