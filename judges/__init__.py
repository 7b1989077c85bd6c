"""Judges: one protocol (`judges.base.Judge`), one module per judge family, chosen by `judge.kind`."""

from __future__ import annotations

from judges.base import Budget, BudgetExhausted, Judge


def build_judge(cfg, policy_path: str | None = None, precision=None, sampling=None, work_dir=None) -> Judge:
    """Build the judge that `cfg` (a `judge` config section) names.

    `policy_path` is the policy the `self` judge uses: the one that sampled the candidates;
    `precision` (nash.precision.Precision) is the policy's, which the `self` judge runs in;
    `sampling` (the run's sampling section) puts the `self` judge on the policy's backend: with
    `vllm` a server is started in `work_dir` and lives until `close_judge`.
    """
    kind = cfg.kind
    if kind == "rules":
        from judges.rules import RulesJudge

        return RulesJudge()
    if kind == "quality":
        from judges.quality import QualityJudge

        return QualityJudge(cfg)
    if kind == "reward_model":
        from judges.reward_model import RewardModelJudge

        return RewardModelJudge(cfg)
    if kind == "composite":
        from judges.composite import CompositeJudge

        return CompositeJudge([build_judge(c, policy_path, precision, sampling, work_dir) for c in cfg.components],
                              cfg.weights,
                              cfg.combine)
    from judges.cache import judgment_cache
    from judges.lm import LMJudge

    budget = Budget(max_tokens=cfg.budget_tokens, max_usd=cfg.budget_usd)
    if kind == "openai":
        from judges.openai_judge import OpenAIBackend, read_api_key

        backend, concurrency = OpenAIBackend(cfg, read_api_key(cfg)), cfg.concurrency
    elif kind in ("self", "hf"):
        from judges.local import LocalBackend
        from nash.policy import resolve_policy
        from nash.precision import resolve

        if kind == "self" and policy_path is None:
            raise ValueError("judge.kind=self needs the policy that sampled the candidates")
        model = policy_path if kind == "self" else resolve_policy(cfg.model)
        if kind == "hf" or precision is None:
            precision = resolve(getattr(cfg, "precision", "auto"))
        if kind == "self" and sampling is not None and sampling.backend != "transformers":
            from judges.served import served_policy_backend

            backend = served_policy_backend(sampling, model, precision.inference_dtype, cfg.concurrency, work_dir)
            concurrency = cfg.concurrency
        else:
            backend, concurrency = LocalBackend(model, precision.inference_dtype, cfg.batch_size), 1
    else:
        raise ValueError(f"judge.kind: unknown judge {kind!r}")
    cache = judgment_cache(backend.identity) if cfg.cache else None
    return LMJudge(kind, backend, cfg, cache=cache, budget=budget, concurrency=concurrency)


def build_alpaca_eval_judge(cfg, annotator: str, model: str | None = None):
    """AlpacaEval 2.0's annotator `annotator` over the openai judge section `cfg` (judges.alpaca_eval)."""
    from judges.alpaca_eval import AlpacaEvalJudge
    from judges.cache import judgment_cache

    judge = AlpacaEvalJudge(cfg, annotator, model, budget=Budget(max_tokens=cfg.budget_tokens, max_usd=cfg.budget_usd))
    if cfg.cache:  # keyed by the judge's identity, which includes the package's template and request
        judge.cache = judgment_cache(judge.identity)
    return judge


def close_judge(judge) -> None:
    """Stop what a judge started (the `self` judge's vLLM server); judges without any are left as they are."""
    for part in getattr(judge, "components", [judge]):
        backend = getattr(getattr(part, "judge", part), "backend", None)
        if hasattr(backend, "close"):
            backend.close()


__all__ = ["Budget", "BudgetExhausted", "Judge", "build_alpaca_eval_judge", "build_judge", "close_judge"]
