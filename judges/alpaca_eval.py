"""AlpacaEval 2.0's annotator, run by nash: the `alpaca_eval` protocol of the evaluation.

The installed `alpaca_eval` package does everything that decides the number: its annotator
configuration (`weighted_alpaca_eval_gpt4_turbo` by default) and prompt template are read
from the package; its own single-annotator object randomises the order of the two outputs
per instruction, formats the prompt, parses the reply (`logprob_parser`: the preference from
the probabilities of the tokens `m` and `M` among the top log-probabilities) and undoes the
switch. nash only sends the request: the messages the package's `openai_completions` builds
(`prompt_to_chatml` of the stripped prompt) with the configuration's completion arguments
(`max_tokens` 1, `temperature` 1, `logprobs`, `top_logprobs` 5, the package's `top_p` 1.0),
through nash's OpenAI client, so the request is cached, budgeted and retried like every other
judge request. Identical outputs get preference 1.5 without a request, as in the package.

Preferences follow AlpacaEval: output_1 is the reference, output_2 the policy; 1 means the
reference wins, 2 the policy.
"""

from __future__ import annotations

import hashlib
import inspect
from functools import cached_property

from nash.errors import UserError
from nash.judges.base import Budget, request_cost
from nash.judges.cache import JudgmentCache, cache_key
from nash.records import Judgment, Prompt

DEFAULT_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
# openai_completions' own arguments and its helper's client settings: not part of the request body.
_NOT_REQUEST = {"model_name", "tokens_to_favor", "tokens_to_avoid", "is_skip_multi_tokens_to_avoid", "is_strip",
                "num_procs", "batch_size", "price_per_token", "requires_chatml", "is_chat", "sleep_time",
                "client_config_path", "openai_organization_ids", "openai_api_keys", "openai_api_base",
                "client_kwargs", "n_retries"}


class AlpacaEvalConfigError(UserError, ValueError):
    pass


def package_version() -> str:
    from importlib.metadata import version

    return version("alpaca_eval")


def annotator_config(name: str) -> dict:
    """The package's configuration `name` (its `configs.yaml`), checked to be one nash can send."""
    from alpaca_eval import constants, utils

    path = constants.EVALUATORS_CONFIG_DIR / name / "configs.yaml"
    if not path.is_file():
        known = sorted(p.parent.name for p in constants.EVALUATORS_CONFIG_DIR.glob("*/configs.yaml"))
        raise AlpacaEvalConfigError(f"eval.alpaca_eval_annotator: alpaca_eval {package_version()} has no annotator "
                                    f"{name!r}; it has {', '.join(k for k in known if 'gpt' in k)}, ...")
    configs = utils.load_configs(path)
    if list(configs) != [name]:
        raise AlpacaEvalConfigError(f"eval.alpaca_eval_annotator: {path} defines {list(configs)}; nash runs "
                                    "configurations of one annotator")
    cfg = dict(configs[name])
    problems = []
    if cfg.get("fn_completions") != "openai_completions":
        problems.append(f"fn_completions is {cfg.get('fn_completions')!r}, not openai_completions")
    if cfg.get("batch_size", 1) != 1:
        problems.append(f"batch_size is {cfg['batch_size']}, not 1")
    kwargs = cfg.get("completions_kwargs", {})
    if kwargs.get("tokens_to_favor") or kwargs.get("tokens_to_avoid") or kwargs.get("tool_choice"):
        problems.append("it biases tokens or calls functions")
    if problems:
        raise AlpacaEvalConfigError(f"eval.alpaca_eval_annotator: {name}: {'; '.join(problems)}")
    return cfg


def _helper_defaults() -> dict:
    """The request settings `_openai_completion_helper` adds when the configuration leaves them out."""
    from alpaca_eval.decoders.openai import _openai_completion_helper

    params = inspect.signature(_openai_completion_helper).parameters
    return {k: params[k].default for k in ("top_p", "temperature") if params[k].default is not None}


class AlpacaEvalJudge:
    """`compare(prompt, policy_output, reference_output)`: one request, AlpacaEval's preference."""

    protocol = "alpaca_eval"

    def __init__(self, cfg, annotator: str = DEFAULT_ANNOTATOR, model: str | None = None,
                 cache: JudgmentCache | None = None, budget: Budget | None = None):
        from nash.judges.openai_judge import OpenAIBackend
        from nash.openai_client import read_api_key

        self.cfg = cfg
        self.annotator = annotator
        self.config = annotator_config(annotator)
        self.single  # noqa: B018  (builds the package's annotator now, so that a bad config fails at start)
        request = {**_helper_defaults(), **{k: v for k, v in self.config.get("completions_kwargs", {}).items()
                                            if k not in _NOT_REQUEST}}
        # Another model name (a local OpenAI-compatible server) replaces the configuration's.
        self.model = model or self.config["completions_kwargs"]["model_name"]
        self.request = request
        self.backend = OpenAIBackend(cfg.model_copy(update={"model": self.model}), read_api_key(cfg))
        self.name = f"alpaca_eval:{annotator}"
        self.concurrency = cfg.concurrency
        self.cache = cache
        self.budget = budget or Budget()
        self.identity = {**self.backend.identity, "protocol": self.protocol, "annotator": annotator,
                         "template": self.template, "request": request}

    @cached_property
    def single(self):
        """The package's own single pairwise annotator, built as its `PairwiseAnnotator` builds it."""
        from alpaca_eval import constants
        from alpaca_eval.annotators.base import BaseAnnotator
        from alpaca_eval.annotators.pairwise_evaluator import SinglePairwiseAnnotator

        seed = inspect.signature(BaseAnnotator.__init__).parameters["seed"].default
        return SinglePairwiseAnnotator(seed=seed, base_dir=constants.EVALUATORS_CONFIG_DIR,
                                       annotation_column="preference", completion_column="raw_completion",
                                       **self.config)

    @cached_property
    def template(self) -> str:
        return self.single.prompt_template

    def describe(self) -> dict:
        """What metrics.json records, so that two runs' figures are known to be comparable."""
        return {"alpaca_eval_version": package_version(), "annotator": self.annotator,
                "annotator_config": self.config, "model": self.model, "base_url": self.cfg.base_url,
                "template_sha256": hashlib.sha256(self.template.encode()).hexdigest(), "request": self.request}

    def prepare(self, instruction: str, policy_output: str, reference_output: str):
        """(messages, row) for one instruction: the package's switch and prompt; row keeps the switch."""
        import pandas as pd
        from alpaca_eval import utils

        row = pd.DataFrame([{"instruction": instruction, "output_1": reference_output, "output_2": policy_output}])
        row = self.single._preprocess(row)
        prompts, row = self.single._make_prompts(row)
        return utils.prompt_to_chatml(prompts[0].strip()), row

    def parse(self, row, completion: dict) -> float | None:
        """The package's preference (1..2, policy as output_2) from one reply; None when it finds none."""
        import numpy as np

        row = row.copy()
        text_key = self.single.completion_key == "completions"
        try:
            values = list(self.single.fn_completion_parser(completion["text"] if text_key else completion))
        except Exception:  # the package records None for a reply its parser cannot read
            values = [None]
        if len(values) != 1:
            values = [None]
        row["preference"] = values
        row["raw_completion"] = [completion]
        row = self.single._postprocess(row)  # drops a missing preference; undoes the switch
        if row.empty:
            return None
        value = float(row["preference"].iloc[0])
        return None if np.isnan(value) else value

    def compare(self, prompt: Prompt, a: str, b: str) -> Judgment:
        """Candidate 0 is the policy's output `a`, candidate 1 the reference `b`."""
        common = dict(prompt_id=prompt.id, candidate=0, other=1, judge=self.name)
        if a == b:  # the package sets 1.5 without asking
            return Judgment(**common, outcome="tie", details={"preference": 1.5, "p_a": 0.5, "identical": True})
        messages, row = self.prepare(prompt.text, a, b)
        switched = bool(row["is_switched_outputs"].iloc[0])
        key = cache_key(self.identity, messages)
        usage = {"requests": 0, "cached": 0, "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0}
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None:
            usage["cached"] = 1
            completion = hit["completion"]
        else:
            completion, error = self._request(messages, usage)
            if completion is None:
                return Judgment(**common, outcome="failed", error=error, details={"switched": switched}, **usage)
        preference = self.parse(row, completion)
        if preference is not None and hit is None and self.cache is not None:
            self.cache.put(key, {"completion": completion, "tokens_in": usage["tokens_in"],
                                 "tokens_out": usage["tokens_out"]})
        raw = completion.get("text")
        if preference is None:
            return Judgment(**common, outcome="failed", raw=raw, details={"switched": switched},
                            error=f"ParseError: {self.config.get('fn_completion_parser')} found no preference "
                                  f"in the reply", **usage)
        p = preference - 1.0
        return Judgment(**common, outcome="preferred" if p != 0.5 else "tie", winner=(0 if p > 0.5 else 1)
                        if p != 0.5 else None, raw=raw, details={"preference": preference, "p_a": p,
                                                                 "switched": switched}, **usage)

    def _request(self, messages: list[dict], usage: dict) -> tuple[dict | None, str | None]:
        from nash.openai_client import create_completion, describe

        self.budget.check()
        try:
            with self.backend._in_flight:
                resp = create_completion(self.backend.client, self.backend._key, model=self.model,
                                         messages=messages, **self.request)
        except Exception as e:  # the client's retries are spent: a failed annotation
            usage["requests"] = 1
            return None, describe(e, self.backend._key)
        choice = resp.choices[0]
        # The completion as the package's decoder hands it to the parser.
        completion = choice.model_dump()
        completion["text"] = choice.message.content or " "
        tokens_in = resp.usage.prompt_tokens if resp.usage else 0
        tokens_out = resp.usage.completion_tokens if resp.usage else 0
        completion["total_tokens"] = resp.usage.total_tokens if resp.usage else 0
        cost = request_cost(self.cfg, tokens_in, tokens_out)
        self.budget.add(tokens_in + tokens_out, cost)
        usage.update(requests=1, tokens_in=tokens_in, tokens_out=tokens_out, cost_usd=cost)
        return completion, None


