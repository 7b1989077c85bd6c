"""Judges: one protocol (`nash.judges.base.Judge`), one module per judge family, chosen by `judge.kind`."""

from __future__ import annotations

from nash.errors import UserError
from nash.judges.base import Budget, BudgetExhausted, Judge


def build_judge(cfg, policy_path: str | None = None, precision=None, sampling=None, work_dir=None) -> Judge:
    """Build the judge that `cfg` (a `judge` config section) names.

    `policy_path` is the policy the `self` judge uses: the one that sampled the candidates;
    `precision` (nash.precision.Precision) is the policy's, which the `self` judge runs in;
    `sampling` (the run's sampling section) puts the `self` judge on the policy's backend: with
    `vllm` a server is started in `work_dir` and lives until `close_judge`.
    """
    kind = cfg.kind
    if kind == "rules":
        from nash.judges.rules import RulesJudge

        return RulesJudge()
    if kind == "quality":
        from nash.judges.quality import QualityJudge

        return QualityJudge(cfg)
    if kind == "reward_model":
        from nash.judges.reward_model import RewardModelJudge

        return RewardModelJudge(cfg)
    if kind == "cascade":
        from nash.judges.cascade import build_cascade

        return build_cascade(cfg, lambda c: build_judge(c, policy_path, precision, sampling, work_dir))
    if kind == "composite":
        from nash.judges.composite import CompositeJudge

        return CompositeJudge([build_judge(c, policy_path, precision, sampling, work_dir) for c in cfg.components],
                              cfg.weights,
                              cfg.combine)
    from nash.judges.cache import judgment_cache
    from nash.judges.lm import LMJudge

    budget = Budget(max_tokens=cfg.budget_tokens, max_usd=cfg.budget_usd)
    batch_requests = None  # remote backends: prompt by prompt, `concurrency` at a time
    if kind == "openai":
        from nash.judges.openai_judge import OpenAIBackend
        from nash.openai_client import read_api_key

        backend, concurrency = OpenAIBackend(cfg, read_api_key(cfg)), cfg.concurrency
    elif kind in ("self", "hf"):
        from nash.judges.local import LocalBackend
        from nash.policy import resolve_policy
        from nash.precision import resolve

        if kind == "self" and policy_path is None:
            raise ValueError("judge.kind=self needs the policy that sampled the candidates")
        model = policy_path if kind == "self" else resolve_policy(cfg.model)
        if kind == "hf" or precision is None:
            precision = resolve(getattr(cfg, "precision", "auto"))
        if kind == "self" and sampling is not None and sampling.backend != "transformers":
            from nash.judges.served import served_policy_backend

            backend = served_policy_backend(sampling, model, precision.inference_dtype, cfg.concurrency, work_dir)
            concurrency = cfg.concurrency
        else:
            # One model in this process: prompts one chunk at a time, `batch_size` requests per pass.
            backend, concurrency = LocalBackend(model, precision.inference_dtype, cfg.batch_size), 1
            batch_requests = cfg.batch_size
    else:
        raise ValueError(f"judge.kind: unknown judge {kind!r}")
    cache = judgment_cache(backend.identity) if cfg.cache else None
    return LMJudge(kind, backend, cfg, cache=cache, budget=budget, concurrency=concurrency,
                   batch_requests=batch_requests)


def check_judge(cfg, section: str, prompts=(), annotating: bool = False) -> None:
    """What building the judge of `cfg` needs, checked without loading a model or paying a request.

    Raises a UserError naming `section.key`: a key or Prefect Secret that is missing, a server that
    does not answer or refuses the key, a model directory without weights or tokenizer, a template
    that cannot be read, a rules judge over `prompts` that carry no constraints. `annotating`: the
    evaluation's annotator, which LM judges run with the pairwise protocol.
    """
    from nash.models import check_model
    from nash.policy import resolve_policy

    kind = cfg.kind
    if kind == "composite":
        for i, c in enumerate(cfg.components):
            check_judge(c, f"{section}.components[{i}]", prompts, annotating)
    elif kind == "cascade":
        from nash.distill import PREFIX

        check_judge(cfg.teacher, f"{section}.teacher", prompts, annotating)
        if not cfg.student.model.startswith(PREFIX):  # distill:...: the run's own, found when judging
            check_model(resolve_policy(cfg.student.model), f"{section}.student.model")
    elif kind == "rules":
        from nash.judges.rules import check_prompts

        check_prompts(list(prompts), f"{section}.kind", "evaluation" if annotating else "training")
    elif kind == "quality":
        from nash.judges.quality import resolve_embedder

        check_model(resolve_embedder(cfg.embedder), f"{section}.embedder")
    elif kind == "reward_model":
        check_model(resolve_policy(cfg.model), f"{section}.model")
    if kind in ("openai", "self", "hf"):
        from nash.judges.lm import template_path

        path = template_path(None if annotating else cfg.template, "pairwise" if annotating else cfg.protocol)
        try:
            path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{section}.template: cannot read {path}: {e}") from None
    if kind == "openai":
        from nash.openai_client import make_client, probe_server, read_api_key

        probe_server(make_client(read_api_key(cfg, section), cfg.base_url, cfg.timeout_s, cfg.max_retries), section)
    elif kind == "hf":
        check_model(resolve_policy(cfg.model), f"{section}.model")
    # `self` on a served policy needs only what the sampling backend needs: nash.preflight checks that.


def build_alpaca_eval_judge(cfg, annotator: str, model: str | None = None):
    """AlpacaEval 2.0's annotator `annotator` over the openai judge section `cfg` (judges.alpaca_eval)."""
    from nash.judges.alpaca_eval import AlpacaEvalJudge
    from nash.judges.cache import judgment_cache

    judge = AlpacaEvalJudge(cfg, annotator, model, budget=Budget(max_tokens=cfg.budget_tokens, max_usd=cfg.budget_usd))
    if cfg.cache:  # keyed by the judge's identity, which includes the package's template and request
        judge.cache = judgment_cache(judge.identity)
    return judge


def close_judge(judge) -> None:
    """Stop what a judge started (the `self` judge's vLLM server); judges without any are left as they are."""
    parts = getattr(judge, "components", None)
    if parts is not None:
        for part in parts:
            close_judge(part)
        return
    backend = getattr(getattr(judge, "judge", judge), "backend", None)
    if hasattr(backend, "close"):
        backend.close()


__all__ = ["Budget", "BudgetExhausted", "Judge", "build_alpaca_eval_judge", "build_judge", "check_judge", "close_judge"]
