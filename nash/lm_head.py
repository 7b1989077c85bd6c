"""Per-token log-probabilities for TRL's trainers on a CPU: only the labelled positions are scored.

TRL's DPO and KTO trainers patch the policy with `add_fused_lm_head`. On CUDA it runs Triton
kernels over the labelled positions only; elsewhere it falls back to torch ops over every
position (prompt and padding included), vocabulary tile by vocabulary tile. On the demo's CPU
that fallback took 13.7-17.5 s for the forward and backward of one DPO batch (16 x 160 tokens,
half of them prompt) against 7.7-8.3 s for one matrix multiply over the labelled positions
(benchmarks/lm_head.py). `cpu_scored_lm_head` keeps TRL's head for every other call and
answers `fused_lm_head=True` on a CPU with that multiply, in tiles of `TILE` positions
recomputed in the backward pass so the logits of a long batch are never all held at once.
"""

from __future__ import annotations

import contextlib

TILE = 4096
# Models whose logits are not plain `lm_head(h)`: these keep TRL's head, which knows their scaling.
_SCALED = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def _score(hidden, weight, bias, labels, temperature: float, outputs: tuple[str, ...]):
    import torch

    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    extra = {}
    with torch.no_grad():
        if "entropy" in outputs:
            extra["entropy"] = -(logp_all.exp() * logp_all).sum(-1)
        if "log_sum_sq_probs" in outputs:
            extra["log_sum_sq_probs"] = torch.logsumexp(2 * logp_all, -1)
        if "mean_logits" in outputs:
            extra["mean_logits"] = logits.mean(-1)
        if "is_top1" in outputs:
            extra["is_top1"] = logits.argmax(-1) == labels
    return logp, extra


def _score_tiles(hidden, weight, bias, labels, temperature, outputs):
    import torch
    from torch.utils.checkpoint import checkpoint

    if hidden.shape[0] <= TILE:
        return _score(hidden, weight, bias, labels, temperature, outputs)
    logps, extras = [], []
    for start in range(0, hidden.shape[0], TILE):
        end = start + TILE
        logp, extra = checkpoint(_score, hidden[start:end], weight, bias, labels[start:end], temperature, outputs,
                                 use_reentrant=False)
        logps.append(logp)
        extras.append(extra)
    return torch.cat(logps), {k: torch.cat([e[k] for e in extras]) for k in extras[0]}


def cpu_scored_lm_head(model, temperature: float = 1.0, outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """TRL's `add_fused_lm_head`, with `fused_lm_head=True` on a CPU scoring only labelled positions."""
    from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head

    add_fused_lm_head(model, temperature=temperature, outputs=outputs)
    text_config = model.config.get_text_config()
    if any(getattr(text_config, key, None) is not None for key in _SCALED) \
            or getattr(text_config, "output_router_logits", False):
        return
    trl_forward = model.forward

    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        head = model.get_output_embeddings()
        if not fused_lm_head or head.weight.device.type != "cpu":
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = model.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        logp, extra = _score_tiles(hidden[mask], head.weight, head.bias, labels[mask], temperature, outputs)
        # `masked_scatter` keeps an all-masked batch connected to the graph, as TRL's head does.
        per_token = {k: v.new_zeros(mask.shape).masked_scatter(mask, v) for k, v in {"log_probs": logp, **extra}.items()}
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-per_token["log_probs"].sum() / denom, label_mask=mask, **per_token)

    model.forward = forward


@contextlib.contextmanager
def cpu_scored_heads():
    """While TRL's DPO and KTO trainers are built (the reference pass runs there), use `cpu_scored_lm_head`."""
    from trl.trainer import dpo_trainer, kto_trainer

    saved = dpo_trainer.add_fused_lm_head, kto_trainer.add_fused_lm_head
    dpo_trainer.add_fused_lm_head = kto_trainer.add_fused_lm_head = cpu_scored_lm_head
    try:
        yield
    finally:
        dpo_trainer.add_fused_lm_head, kto_trainer.add_fused_lm_head = saved
