"""How far a policy moved: the mean per-token KL between two policies on fixed text, and the
rank of the policy's own tokens under the other.

KL is measured teacher-forced: both models read the same prompt and response, and at every
response position the full next-token distributions are compared,
KL(p || q) = sum_v p(v | prefix) (log p(v | prefix) - log q(v | prefix)), averaged over
response tokens. Exact at each position, so no sampling noise on top of the choice of text.

Token-rank shift: for π_t's own greedy answers, the rank each token has under π_0's next-token
distribution at the same prefix (1: π_0 would have chosen it too). The share of tokens π_0 would
not have ranked first and their mean log-rank say how much of the answer is new to π_0, where
KL averages over the whole vocabulary; the tokens that moved most say what changed.
"""

from __future__ import annotations

import math

from nash.errors import UserError
from nash.models import chat_text, load_causal_lm, load_tokenizer
from nash.precision import default_device
from nash.records import read_lines


def _pad(rows: list[list[int]], value: int, device):
    """Right-padded ids and their attention mask."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [value] * (width - len(r)) for r in rows], device=device)
    attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, attn


def _encode(tok, prompts: list[str], responses: list[str], max_length: int):
    """Chat-formatted prompt + response token ids, and which positions are response tokens."""
    rows = []
    for prompt, response in zip(prompts, responses):
        head = chat_text(tok, prompt)  # as the sampler formatted it
        p_ids = tok(head, add_special_tokens=False)["input_ids"]
        r_ids = tok(response, add_special_tokens=False)["input_ids"]
        ids = (p_ids + r_ids)[:max_length]
        rows.append((ids, [0] * len(p_ids) + [1] * (len(ids) - len(p_ids))))
    return rows


class RankShift:
    """Ranks of response tokens under a reference distribution, accumulated over batches."""

    def __init__(self):
        self.tokens, self.not_first, self.log_rank = 0, 0, 0.0
        self.moved: dict[int, list[float]] = {}  # token id -> [times not first, sum of log-ranks there]

    def add(self, logq, targets, mask) -> None:
        """`logq` [B, T, V]: the reference's log-probabilities (or logits) at each position; `targets` [B, T]:
        the token that followed; `mask` [B, T]: 1 where it is a response token."""
        import torch

        picked = logq.gather(-1, targets.unsqueeze(-1))
        ranks = (logq > picked).sum(-1) + 1  # ties rank with the token: a reference that agrees gives 1
        keep = mask.bool()
        ranks, ids = ranks[keep], targets[keep]
        logs = torch.log(ranks.double())
        self.tokens += int(ranks.numel())
        self.not_first += int((ranks > 1).sum())
        self.log_rank += float(logs.sum())
        for t, lr in zip(ids[ranks > 1].tolist(), logs[ranks > 1].tolist()):
            m = self.moved.setdefault(t, [0, 0.0])
            m[0] += 1
            m[1] += lr

    def summary(self, tok=None, top: int = 10) -> dict:
        if not self.tokens:
            return {"tokens": 0, "not_first_share": None, "mean_log_rank": None, "moved": []}
        most = sorted(self.moved.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))[:top]
        return {"tokens": self.tokens, "not_first_share": self.not_first / self.tokens,
                "mean_log_rank": self.log_rank / self.tokens,
                "moved": [{"token": tok.decode([t]) if tok is not None else t, "times": n,
                           "mean_rank": round(math.exp(s / n), 1)} for t, (n, s) in most]}


def token_kl(p_path: str, q_path: str, prompts: list[str], responses: list[str], dtype: str = "float32",
             batch_size: int = 8, max_length: int = 512) -> dict:
    """Mean per-token KL(p || q) over the response tokens of (prompt, response) pairs.

    Rows are batched by length, and the models' logits are kept only from the first position
    that predicts a response token (`logits_to_keep`): on the demo's CPU that took the float32
    KL of 32 answers from 42 s to 23-29 s for the same figure to 1e-8.
    """
    import torch

    device = default_device()
    tok = load_tokenizer(p_path)
    pad = tok.pad_token_id
    p_model, q_model = load_causal_lm(p_path, dtype, device), load_causal_lm(q_path, dtype, device)
    rows = sorted((r for r in _encode(tok, prompts, responses, max_length) if sum(r[1]) > 0), key=lambda r: len(r[0]))
    total, tokens, shift = 0.0, 0, RankShift()
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids, attn = _pad([i for i, _ in batch], pad, device)
        resp, _ = _pad([m for _, m in batch], 0, device)
        # Position i predicts token i + 1: keep the positions from the earliest response token's predecessor on.
        keep = torch.arange(min(m.index(1) for _, m in batch) - 1, ids.shape[1] - 1, device=device)
        with torch.inference_mode():
            lp = torch.log_softmax(p_model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits.float(), -1)
            lq = torch.log_softmax(q_model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits.float(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)
        mask = resp[:, keep + 1].float()
        total += float((kl * mask).sum())
        tokens += int(mask.sum())
        shift.add(lq, ids[:, keep + 1], mask)
    # Each position's KL is >= 0; float32 rounding can leave a -1e-8 sum for identical models.
    return {"kl": max(total / tokens, 0.0) if tokens else None, "tokens": tokens, "sequences": len(rows),
            "rank_shift": shift.summary(tok)}


def load_texts(source: str = "builtin") -> list[str]:
    """General text for perplexity: the shipped paragraphs, or a .jsonl with a 'text' field."""
    import json
    from pathlib import Path

    path = Path(__file__).parent / "data" / "general_text.jsonl" if source == "builtin" else Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"eval.drift_text: file not found: {source}")
    texts = []
    for where, line in read_lines(path, "eval.drift_text"):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON: {e.msg} (eval.drift_text)") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise UserError(f"{where}: missing 'text' (eval.drift_text)")
            texts.append(row["text"])
    if not texts:
        raise UserError(f"eval.drift_text: {path} has no texts")
    return texts


def perplexity(model_path: str, texts: list[str], dtype: str = "float32", batch_size: int = 4,
               max_length: int = 512) -> dict:
    """Token-weighted perplexity of a policy on plain text (no chat template)."""
    import torch

    device = default_device()
    tok = load_tokenizer(model_path)
    pad = tok.pad_token_id
    model = load_causal_lm(model_path, dtype, device)
    rows = [tok(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts]
    nll, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids, attn = _pad(batch, pad, device)
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
        got = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        mask = attn[:, 1:].float()
        nll -= float((got * mask).sum())
        tokens += int(mask.sum())
    return {"perplexity": math.exp(nll / tokens), "tokens": tokens, "texts": len(rows)}
