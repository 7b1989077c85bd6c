"""The model card beside every policy: `policy/README.md` in the Hugging Face Hub's format.

Written when an iteration completes (before its files are hashed), from the run's config and
the iteration's manifest and metrics.json, so its figures are the ones nash measured: the
metadata holds them exactly (`nash.metrics`), the body shows them rounded. The lineage runs
from π_0 through every parent to this policy. No secret reaches it: a judge's key is named by
its environment variable or Secret block only, as in run.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from nash.errors import UserError
from nash.policy import EMBEDDED
from nash.registry import IterationDir

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ROWS = [  # (headline key, label, digits)
    ("win_rate", "win rate vs {against}", 3), ("lc_win_rate", "LC win rate", 3),
    ("substantive_pass_rate", "real pass rate", 3), ("pass_rate", "pass rate", 3), ("degenerate", "degenerate share", 3),
    ("mean_length", "mean answer tokens", 1), ("kl_from_initial", "KL to π_0", 4), ("perplexity", "perplexity", 2),
    ("retention", "retention (multiple choice)", 3),
]


def _base_model(model: str) -> str | None:
    """A hub id for the card's metadata; a local directory has none."""
    if model == EMBEDDED:
        return EMBEDDED_HUB_ID
    return None if Path(model).exists() else model


def lineage(it: IterationDir) -> list[str]:
    """π_0, then every parent, oldest first, ending with this iteration."""
    chain, at = [it.path.name], it
    while (parent := at.manifest().get("parent_policy", {}).get("iteration")):
        at = IterationDir(it.run, parent)
        chain.append(at.path.name)
    return ["π_0", *reversed(chain)]


def _section(data: dict) -> str:
    return "\n".join(f"- `{k}`: `{json.dumps(v)}`" for k, v in data.items())


def card_text(it: IterationDir) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    cfg = it.run.config()
    m = it.manifest()
    metrics = json.loads(it.metrics.read_text(encoding="utf-8"))
    head = metrics["headline"]
    source = cfg.prompts.source
    datasets = [source.removeprefix("hf:").split(":")[0]] if source.startswith("hf:") else None
    exact = {k: head.get(k) for k, _, _ in ROWS if head.get(k) is not None}
    exact.update({k: head.get(k) for k in ("win_rate_se", "initial_substantive_pass_rate", "initial_degenerate",
                                            "promoted") if head.get(k) is not None})
    data = ModelCardData(
        base_model=_base_model(cfg.policy.model), library_name="transformers",
        tags=["nash", "trl", cfg.train.loss, f"pairs-{cfg.pairs.rule}", f"judge-{cfg.judge.kind}"],
        datasets=datasets, model_name=f"{it.run.name} {it.path.name}",
        nash={"run": it.run.name, "iteration": it.index, "config_hash": m.get("config_hash"),
              "against": head.get("against"), "eval_n": metrics.get("degeneration", {}).get("policy", {}).get("n"),
              "metrics": exact},
    )
    rows = "\n".join(f"| {label.format(against=head.get('against', 'reference'))} | {head[k]:.{d}f} |"
                     for k, label, d in ROWS if head.get(k) is not None)
    pairs = m.get("pairs", {})
    train = m.get("train", {})
    body = f"""
# {it.run.name} {it.path.name}

A policy trained by nash in iterations of self-improvement: sample, judge, keep
the pairs with a large margin, update with {cfg.train.loss.upper()} against the previous iteration.

## Lineage

{" → ".join(lineage(it))} (π_0: `{cfg.policy.model}`; this iteration trained from
{"π_0" if not m.get("parent_policy", {}).get("iteration") else f"iter_{m['parent_policy']['iteration']:03d}"})

## Data

- Prompts: `{source}`, {cfg.prompts.partition_size} fresh training prompts per iteration (this one:
  {pairs.get("prompts", "-")} prompts, {pairs.get("pairs", "-")} pairs kept, {pairs.get("training_pairs", "-")} trained on).
- Candidates: {cfg.sampling.n} samples per prompt{" plus the gold answer" if cfg.sampling.include_reference else ""}
  on `{cfg.sampling.backend}`, temperature {cfg.sampling.temperature}.
- Judge: `{cfg.judge.kind}`.

## Pair rule

{_section(cfg.pairs.model_dump(mode="json", exclude={"length_guard"}))}

## Training

{_section(cfg.train.model_dump(mode="json", include={"loss", "beta", "learning_rate", "epochs", "batch_size",
                                                      "max_length", "reference", "lora", "nll_alpha"}))}
- steps: {train.get("steps", "-")}, final loss: {train.get("train_loss", "-")}

## Evaluation

{metrics.get("degeneration", {}).get("policy", {}).get("n", "-")} held-out prompts, answered greedily; the
annotator: `{cfg.annotator.kind}`. Promoted: {"yes" if head.get("promoted") else "no"}
({head.get("promotion_reason", "-")}).

| figure | value |
|---|---|
{rows}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def write_card(it: IterationDir) -> Path | None:
    """policy/README.md, where the policy's weights are; None where they are not."""
    if not (it.policy / "config.json").is_file():
        return None
    path = it.policy / "README.md"
    path.write_text(card_text(it), encoding="utf-8")
    return path


def push(it: IterationDir, repo_id: str, private: bool = True, revision: str | None = None,
         dry_run: bool = False) -> dict:
    """Upload `it`'s policy with its card to the Hub repo `repo_id`, on the branch `iter_NNN` (or
    `revision`); a private repo unless told otherwise. The token is huggingface_hub's own (HF_TOKEN, or
    `hf auth login`), never nash's to print or store. `dry_run`: what would be uploaded, no network."""
    if not (it.policy / "config.json").is_file():
        raise UserError(f"{it.path.name}: its weights are not on disk (run.keep_policies deleted them); "
                        "nothing to push")
    if not (it.policy / "README.md").is_file():
        write_card(it)  # an iteration completed before nash wrote cards
    branch = revision or it.path.name
    files = sorted(p for p in it.policy.iterdir() if p.is_file())
    plan = {"repo_id": repo_id, "revision": branch, "private": private,
            "files": {p.name: p.stat().st_size for p in files}}
    if dry_run:
        return plan
    import os

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)  # a mirror, or the Hub
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        commit = api.upload_folder(folder_path=str(it.policy), repo_id=repo_id, revision=branch,
                                   commit_message=f"nash: {it.run.name} {it.path.name}")
    except HfHubHTTPError as e:
        raise UserError(f"nash push: the Hub refused {repo_id}@{branch}: {e}") from None
    return {**plan, "commit": getattr(commit, "oid", None), "url": getattr(commit, "commit_url", str(commit))}
