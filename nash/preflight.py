"""Everything that can fail before the first paid stage, checked in seconds before it starts.

Sampling on GPUs and judging with GPT-4 are what an iteration pays for. A config that cannot
finish the iteration must fail before either begins: prompts that cannot be read, are not
unique, empty, too long for the policy or uncheckable by the judge that will read them; a
policy directory without weights or tokenizer; a judge or annotator whose key, Prefect Secret,
model, template or server is missing; a reference set or drift text that does not load; a vLLM
interpreter that is not there. No model is loaded and no request is paid for: servers are asked
for their model list only. Every failure is a UserError naming the key, the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path

from nash import prompts as prompt_sources
from nash.errors import UserError
from nash.models import chat_text, check_model, load_tokenizer
from nash.policy import resolve_policy
from nash.prompts import name_prompts
from nash.records import Prompt
from nash.registry import RunDir


def load_run_prompts(cfg) -> list[Prompt]:
    p = cfg.prompts
    return prompt_sources.load_prompts(p.source, p.seed, p.field, reference_field=p.reference_field)


def eval_prompts(cfg, all_prompts: list[Prompt]) -> list[Prompt]:
    """The held-out split (reference: initial) or the reference set's instructions."""
    if cfg.eval.reference == "initial":
        return prompt_sources.eval_split(all_prompts, cfg.eval.num_prompts)
    from nash.evaluation import load_reference_set

    return load_reference_set(cfg.eval.reference, cfg.eval.num_prompts)


def preflight(cfg, run: RunDir) -> None:
    """Raise a UserError for anything that would stop the next `run.iterations` iterations."""
    all_prompts = load_run_prompts(cfg)
    first = run.next_iteration().index
    training = [p for i in range(first, first + cfg.run.iterations)
                for p in prompt_sources.partition(all_prompts, i, cfg.prompts.partition_size, cfg.prompts.seed)]
    if cfg.pairs.rule == "spin" and not any(p.reference for p in all_prompts if p.split == "train"):
        raise prompt_sources.PromptError(
            f"pairs.rule spin needs gold answers: no training prompt of {cfg.prompts.source} has a "
            f"{cfg.prompts.reference_field!r} value (prompts.reference_field)"
        )
    held_out = eval_prompts(cfg, all_prompts)
    # Keys, secrets and servers first: they take milliseconds; the policy may need converting.
    # A stage on a work pool is checked by its workers, whose keys, GPUs and interpreters these are.
    remote = cfg.stages.mapped()
    if "sample" not in remote:
        check_sampling(cfg.sampling)
    from nash.judges import check_judge

    if cfg.pairs.rule != "spin" and "judge" not in remote:
        check_judge(cfg.judge, "judge", training)
    from nash import tracking

    tracking.check(cfg)
    if cfg.judge.kind == "cascade":
        from nash.distill import check_student

        check_student(run, cfg.judge)
    annotator, section = cfg.annotator, "eval.judge" if cfg.eval.judge else "judge"
    if annotator is not (cfg.eval.judge or cfg.judge):
        section += ".teacher"
    if "evaluate" in remote:
        pass
    elif cfg.eval.protocol == "alpaca_eval":
        from nash.judges import build_alpaca_eval_judge
        from nash.openai_client import probe_server

        built = build_alpaca_eval_judge(annotator, cfg.eval.alpaca_eval_annotator, cfg.eval.alpaca_eval_model)
        probe_server(built.backend.client, section)
    else:
        check_judge(annotator, section, held_out, annotating=True)
    if "train" not in remote:
        from nash.training import check_training

        check_training(cfg.train)
    if cfg.eval.drift_prompts:
        from nash.drift import load_texts

        load_texts(cfg.eval.drift_text)
    if cfg.eval.retention is not None:
        from nash.retention import load_items

        load_items(cfg.eval.retention.source, cfg.eval.retention.items)
    policy = resolve_policy(cfg.policy.model)
    check_model(policy, "policy.model")
    parent = run.parent_of_next(cfg.train.parent)
    if parent is not None:
        check_model(str(parent.policy), f"the policy of {parent.path.name} (the next iteration's parent)")
    check_lengths(cfg, policy, training, held_out)


def context_length(policy: str) -> int | None:
    """The policy's context window from its config, where it states one."""
    path = Path(policy) / "config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(policy).to_dict()
    config = config.get("text_config", config)
    return config.get("max_position_embeddings") or config.get("n_positions")


def check_lengths(cfg, policy: str, training: list[Prompt], held_out: list[Prompt]) -> None:
    """Prompts the policy reads must leave room for an answer: in training (`train.max_length`
    truncates prompt plus answer, so a prompt that fills it trains on nothing) and within the
    model's context with the answer's `max_new_tokens`."""
    tok = load_tokenizer(policy)
    context = context_length(policy)

    def tokens(prompts, chunk: int = 1024):  # lengths only, a chunk at a time: 100k token lists are gigabytes
        out = {}
        for i in range(0, len(prompts), chunk):
            part = prompts[i : i + chunk]
            ids = tok([chat_text(tok, p.text) for p in part], add_special_tokens=False)["input_ids"]
            out.update(zip((p.id for p in part), map(len, ids)))
        return out

    n_train = tokens(training)
    too_long = [p for p in training if n_train[p.id] >= cfg.train.max_length]
    if too_long:
        raise UserError(f"train.max_length: {len(too_long)} training prompt(s) of {cfg.prompts.source} leave no room "
                        f"for an answer in {cfg.train.max_length} tokens: "
                        + name_prompts(too_long, lambda p: f"{n_train[p.id]} tokens")
                        + "; raise train.max_length or shorten them")
    if context:
        over = [p for p in training if n_train[p.id] + cfg.sampling.max_new_tokens > context]
        if over:
            raise UserError(f"sampling.max_new_tokens: {len(over)} training prompt(s) plus "
                            f"{cfg.sampling.max_new_tokens} new tokens exceed the policy's context of {context}: "
                            + name_prompts(over, lambda p: f"{n_train[p.id]} tokens"))
        n_eval = tokens(held_out)
        over = [p for p in held_out if n_eval[p.id] + cfg.eval.max_new_tokens > context]
        if over:
            raise UserError(f"eval.max_new_tokens: {len(over)} evaluation prompt(s) plus {cfg.eval.max_new_tokens} "
                            f"new tokens exceed the policy's context of {context}: "
                            + name_prompts(over, lambda p: f"{n_eval[p.id]} tokens"))


def check_sampling(sampling) -> None:
    if sampling.backend == "vllm":
        from nash.vllm_engine import check_engine

        check_engine(sampling.vllm, sampling.data_parallel)
    elif sampling.backend == "openai":
        from nash.openai_client import make_client, probe_server, read_api_key

        s = sampling.server
        probe_server(make_client(read_api_key(s, "sampling.server"), s.base_url, s.timeout_s, s.max_retries),
                     "sampling.server")
