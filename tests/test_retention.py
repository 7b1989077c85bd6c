"""The retention probe, token-rank shift and the forgetting gate, on the tiny model."""

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from nash import report
from nash import retention as probe
from nash.config import EvalSection, TrainSection
from nash.drift import RankShift, load_texts
from nash.errors import UserError
from nash.models import chat_text, load_tokenizer
from nash.records import Pair
from nash.training import train_policy


def test_builtin_probe_is_well_formed():
    items = probe.load_items("builtin")
    assert len(items) >= 200 and len({i.id for i in items}) == len(items)
    assert {i.answer for i in items} == {0, 1, 2, 3}  # the right option is not always in one slot
    assert len({i.subject for i in items}) >= 10
    assert probe.load_items("builtin", 12) == items[:12]


def direct_logprob(model, tok, question, choice):
    head = tok(chat_text(tok, question), add_special_tokens=False)["input_ids"]
    cont = tok(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(float(logp[len(head) + k - 1, t]) for k, t in enumerate(cont))


def test_option_scores_match_a_direct_log_likelihood(tiny_model_dir):
    items = probe.load_items("builtin", 10)
    got = probe.option_logprobs(tiny_model_dir, items)  # options of unequal length share a padded batch
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = load_tokenizer(tiny_model_dir)
    for item, scores in zip(items, got):
        want = [direct_logprob(model, tok, item.question, c) for c in item.choices]
        assert scores == pytest.approx(want, abs=1e-3)
    result = probe.score(tiny_model_dir, items)
    for item, scores in zip(items, got):
        assert result["per_item"][item.id]["chosen"] == max(range(4), key=scores.__getitem__)
    acc = result["accuracy"]
    assert result["stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 10))


@pytest.mark.parametrize("row, message", [
    ({"question": "Q?", "choices": ["a", "b"], "answer": 2}, "answer 2 is not the index"),
    ({"question": "Q?", "choices": ["a"], "answer": 0}, "choices"),
    ({"question": "Q?", "choices": ["a", "a"], "answer": 0}, "distinct"),
    ({"choices": ["a", "b"], "answer": 0}, "question"),
])
def test_a_bad_item_names_the_file_and_line(tmp_path, row, message):
    path = tmp_path / "items.jsonl"
    good = {"question": "Fine?", "choices": ["yes", "no"], "answer": 0}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=rf"items.jsonl:2: .*{message}.*eval.retention.source"):
        probe.load_items(str(path))


def test_rank_shift_against_a_hand_computed_case():
    # Two sequences, vocabulary of 4. Log-probabilities at each position, the token that followed, the mask.
    logq = torch.tensor([[[0.0, -1.0, -2.0, -3.0], [-3.0, -2.0, -1.0, 0.0], [0.0, 0.0, -5.0, -5.0]],
                         [[-1.0, 0.0, -2.0, -3.0], [0.0, -1.0, -2.0, -3.0], [-9.0, -9.0, -9.0, 0.0]]])
    targets = torch.tensor([[0, 1, 1], [3, 2, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # Ranks: seq 0 -> 1 (top), 3 (two above: tokens 2 and 3), 1 (tied with token 0: not beaten);
    # seq 1 -> 4, 3; the last position is masked out.
    shift = RankShift()
    shift.add(logq, targets, mask)
    s = shift.summary()
    assert s["tokens"] == 5
    assert s["not_first_share"] == pytest.approx(3 / 5)
    assert s["mean_log_rank"] == pytest.approx((math.log(3) + math.log(4) + math.log(3)) / 5)
    # Token 1 moved once (rank 3), token 3 once (rank 4), token 2 once (rank 3): each once, larger rank first.
    assert [(m["token"], m["times"], m["mean_rank"]) for m in s["moved"]] == [(3, 1, 4.0), (1, 1, 3.0), (2, 1, 3.0)]


def test_a_policy_ranks_its_own_greedy_answer_first(tiny_model_dir, tmp_path):
    """Greedy tokens rank 1 under the model that chose them, and not all of them under another."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = load_tokenizer(tiny_model_dir)
    head = tok(chat_text(tok, "Say something."), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ids = model.generate(head, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    mask = torch.zeros_like(ids[:, 1:])
    mask[:, head.shape[1] - 1:] = 1  # positions that predict an answer token

    def shift(m):
        with torch.no_grad():
            logq = torch.log_softmax(m(input_ids=ids).logits[:, :-1].float(), -1)
        s = RankShift()
        s.add(logq, ids[:, 1:], mask)
        return s.summary(tok)

    own = shift(model)
    assert own["tokens"] == 12 and own["not_first_share"] == 0 and own["mean_log_rank"] == 0
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.5 * torch.randn_like(param))
    moved = shift(other.eval())
    assert moved["not_first_share"] > 0 and moved["moved"] and moved["mean_log_rank"] > 0


def _teach(model_dir, items, out, steps=60):
    """π_0 that knows the items: a plain loop on each question's right answer."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rows = []
    for i in items:
        head = tok(chat_text(tok, i.question), add_special_tokens=False)["input_ids"]
        cont = tok(i.choices[i.answer], add_special_tokens=False)["input_ids"]
        rows.append((torch.tensor([head + cont]), len(head)))
    torch.manual_seed(0)
    for step in range(steps):
        ids, first = rows[step % len(rows)]
        labels = ids.clone()
        labels[0, :first] = -100
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_a_policy_made_to_forget_is_refused(tiny_model_dir, tmp_path):
    items = probe.load_items("builtin", 16)
    source = tmp_path / "items.jsonl"
    source.write_text("".join(i.model_dump_json() + "\n" for i in items))
    pi0 = _teach(tiny_model_dir, items, tmp_path / "pi0", steps=8 * len(items))
    before = probe.score(pi0, items)
    assert before["accuracy"] >= 0.75, before["accuracy"]
    # A few steps of SFT on unrelated text (the shipped general paragraphs), through nash's own update rule.
    texts = load_texts("builtin")[:8]
    unrelated = [Pair(prompt_id=str(k), prompt=f"Continue the text {k}.", chosen=t[:200], rejected="-",
                      chosen_candidate=0, rejected_candidate=1) for k, t in enumerate(texts)]
    cfg = TrainSection(loss="sft", learning_rate=1e-1, epochs=2, batch_size=2, max_length=64, warmup_ratio=0.0)
    metrics = train_policy(pi0, unrelated, tmp_path / "pi1", cfg)
    assert metrics["loss_function"] == "sft" and metrics["steps"] == 8 and metrics["reference"] == "none"
    after = probe.score(str(tmp_path / "pi1"), items)
    kept = probe.compare(after, before, items)
    assert kept["drop"] >= 0.1 and kept["forgotten"] >= 2, kept
    assert kept["drop"] == pytest.approx(before["accuracy"] - after["accuracy"])

    eval_cfg = EvalSection(retention={"source": str(source), "max_drop": 0.02}, promote_if=[])
    head = {"iteration": 1, "n": 10, "retention": kept["accuracy"], "initial_retention": kept["initial_accuracy"],
            "retention_drop": kept["drop"], "retention_drop_se": kept["change_stderr"]}
    promo = report.promotion(head, [], report.promotion_conditions(eval_cfg))
    assert not promo["promoted"] and "retention_drop <= 0.02" in promo["reason"]
    assert any("retention of general knowledge fell" in w for w in report.warnings_for(head, [], eval_cfg))
    # The same iteration without the gate (max_drop null) is promoted, with the figures still reported.
    no_gate = EvalSection(retention={"source": str(source), "max_drop": None}, promote_if=[])
    assert report.promotion(head, [], report.promotion_conditions(no_gate))["promoted"]
    assert report.table_rows([head])[0]["retention (π_0)"] == f"{kept['accuracy']:.3f} ({kept['initial_accuracy']:.3f})"


def test_sft_trains_on_each_chosen_answer_once(tiny_model_dir, tmp_path):
    from nash.training import pairs_to_dataset

    ps = [Pair(prompt_id="a", prompt="Q", chosen="best", rejected=r, chosen_candidate=0, rejected_candidate=k)
          for k, r in enumerate(["x", "y", "z"], 1)]
    rows = pairs_to_dataset(ps, "sft").to_list()
    assert rows == [{"prompt": [{"role": "user", "content": "Q"}],
                     "completion": [{"role": "assistant", "content": "best"}]}]
    with pytest.raises(ValueError, match="sft uses no reference model"):
        TrainSection(loss="sft", reference="initial")
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_condition_on_a_figure_not_measured_is_a_config_error():
    with pytest.raises(ValueError, match="needs eval.retention"):
        EvalSection(retention=None, promote_if=["retention_drop <= 0.01"])
    with pytest.raises(ValueError, match="needs eval.drift_prompts"):
        EvalSection(drift_prompts=0, promote_if=["rank_shift <= 0.3"])
