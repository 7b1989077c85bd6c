import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nash.drift import token_kl

PROMPTS = ["Name a fruit.", "Write two words about rain, please, in lowercase letters."]
RESPONSES = ["An apple.", "soft rain falls on the quiet town"]


@pytest.fixture(scope="module")
def moved_model_dir(tiny_model_dir, tmp_path_factory):
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("moved")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


def direct_kl(p_dir, q_dir):
    """One sequence at a time, no padding, the KL sum written out over the vocabulary."""
    tok = AutoTokenizer.from_pretrained(p_dir)
    p, q = AutoModelForCausalLM.from_pretrained(p_dir), AutoModelForCausalLM.from_pretrained(q_dir)
    total, n, ranks = 0.0, 0, []
    for prompt, response in zip(PROMPTS, RESPONSES):
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        h = tok(head, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([h + r])
        with torch.no_grad():
            pp = torch.softmax(p(ids).logits[0].double(), -1)
            qq = torch.softmax(q(ids).logits[0].double(), -1)
        for pos in range(len(h) - 1, len(h) + len(r) - 1):  # the positions that predict response tokens
            total += float((pp[pos] * (pp[pos].log() - qq[pos].log())).sum())
            n += 1
            ranks.append(int((qq[pos] > qq[pos][ids[0, pos + 1]]).sum()) + 1)  # the token's rank under q
    direct_kl.ranks = ranks
    return total / n, n


def test_token_kl_matches_a_direct_calculation(tiny_model_dir, moved_model_dir):
    want, n = direct_kl(moved_model_dir, tiny_model_dir)
    got = token_kl(moved_model_dir, tiny_model_dir, PROMPTS, RESPONSES, batch_size=2)
    assert got["tokens"] == n and got["sequences"] == 2
    assert want > 1e-4 and math.isclose(got["kl"], want, rel_tol=1e-4)
    # Token-rank shift: each response token's rank under q, from the same pass.
    ranks = direct_kl.ranks
    shift = got["rank_shift"]
    assert shift["tokens"] == n and 0 < shift["not_first_share"] <= 1
    assert shift["not_first_share"] == pytest.approx(sum(r > 1 for r in ranks) / n)
    assert shift["mean_log_rank"] == pytest.approx(sum(math.log(r) for r in ranks) / n, rel=1e-6)
    # Zero from a model to itself.
    assert token_kl(tiny_model_dir, tiny_model_dir, PROMPTS, RESPONSES)["kl"] == pytest.approx(0.0, abs=1e-6)
