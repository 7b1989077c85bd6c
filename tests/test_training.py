import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from nash.config import LengthGuard, LoraSection, TrainSection
from nash.errors import UserError
from nash.records import Pair
from nash.training import accelerate_config_path, build_trainer, check_training, train_policy

BETA = 0.2


def pairs(n=4):
    return [
        Pair(prompt_id=str(i), prompt=f"Write about item {i} in lowercase.", chosen=f"item {i} is nice.",
             rejected=f"ITEM {i} IS NICE, REALLY.", chosen_candidate=0, rejected_candidate=1,
             chosen_score=1.0, rejected_score=0.0, margin=1.0)
        for i in range(n)
    ]


def changed_params(a, b):
    sa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def test_dpo_update_changes_weights_and_starts_at_log2(tiny_model_dir, tmp_path):
    cfg = TrainSection(learning_rate=1e-2, epochs=2, batch_size=2, max_length=64, warmup_ratio=0.0)
    out = tmp_path / "policy"
    seen = []
    metrics = train_policy(tiny_model_dir, pairs(), out, cfg, progress=lambda d, t: seen.append((d, t)))
    assert metrics["steps"] == 4 and seen[-1] == (4, 4)
    # The reference is the starting policy, so the first loss is -log σ(0) = log 2.
    assert math.isclose(metrics["first_step_loss"], math.log(2), rel_tol=1e-3)
    assert metrics["last_step_loss"] < metrics["first_step_loss"]
    assert metrics["reward_accuracy"] == 1.0 and metrics["reward_margin"] > 0
    assert changed_params(tiny_model_dir, out), "training left every parameter unchanged"
    assert (out / "tokenizer_config.json").is_file() and not (tmp_path / "policy.trainer").exists()


def test_reference_initial_pins_pi0(tiny_model_dir, tmp_path):
    """π_t ≠ π_0: with reference initial the first loss is no longer log 2, with previous it is."""
    cfg = TrainSection(learning_rate=1e-2, epochs=1, batch_size=2, max_length=64, warmup_ratio=0.0)
    pi1 = tmp_path / "pi1"
    train_policy(tiny_model_dir, pairs(), pi1, cfg)
    prev = train_policy(str(pi1), pairs(), tmp_path / "a", cfg)
    init = train_policy(str(pi1), pairs(), tmp_path / "b", cfg.model_copy(update={"reference": "initial"}),
                        initial_path=tiny_model_dir)
    assert math.isclose(prev["first_step_loss"], math.log(2), rel_tol=1e-3)
    # π_1 already prefers the chosen answers relative to π_0, so its loss against π_0 starts lower.
    assert init["first_step_loss"] < math.log(2) - 0.01


@pytest.mark.parametrize("loss", ["kto", "cpo", "ipo"])
def test_other_losses_train(tiny_model_dir, tmp_path, loss):
    cfg = TrainSection(loss=loss, learning_rate=1e-2, epochs=1, batch_size=2, max_length=64, warmup_ratio=0.0)
    out = tmp_path / "policy"
    metrics = train_policy(tiny_model_dir, pairs(), out, cfg)
    assert metrics["steps"] >= 1 and metrics["loss_function"] == loss
    assert changed_params(tiny_model_dir, out)


def test_lora_is_merged_into_a_plain_policy(tiny_model_dir, tmp_path):
    cfg = TrainSection(learning_rate=5e-2, epochs=1, batch_size=2, max_length=64, warmup_ratio=0.0,
                       lora=LoraSection(r=4, alpha=8, dropout=0.0))
    out = tmp_path / "policy"
    metrics = train_policy(tiny_model_dir, pairs(), out, cfg)
    assert math.isclose(metrics["first_step_loss"], math.log(2), rel_tol=1e-3)  # adapter off = π_t
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    changed = changed_params(tiny_model_dir, out)  # same keys: no lora_A / lora_B left behind
    assert changed and all("proj" in k for k in changed)


# Closed-form checks: TRL's loss code, configured by nash, fed a hand-built batch whose
# per-token log-probabilities are known.

CHOSEN = torch.tensor([[-0.5, -0.25, -0.25], [-1.0, -0.5, 0.0]])  # completion tokens: 3 and 2
REJECTED = torch.tensor([[-1.0, -1.0, -1.0], [-0.5, -0.5, -0.5]])
REF_C, REF_R = torch.tensor([-1.5, -1.0]), torch.tensor([-2.5, -2.0])
MASK_C = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
MASK_R = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]])


class FakeModel:
    """Returns fixed per-token log-probs; the trainer's loss code does the rest."""

    training = True

    def __init__(self, log_probs):
        self.log_probs = log_probs

    def __call__(self, **kw):
        lp = self.log_probs.clone().requires_grad_()
        z = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool())


def dpo_batch():
    mask = torch.cat([MASK_C, MASK_R])
    lp = torch.cat([CHOSEN, REJECTED]) * mask[:, 1:]
    inputs = {"input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": REF_C, "ref_rejected_logps": REF_R}
    return FakeModel(lp), inputs


def trainer_for(tiny_model_dir, tmp_path, **train):
    guard = train.pop("guard", None)
    cfg = TrainSection(beta=BETA, batch_size=2, max_length=64, **train)
    return build_trainer(tiny_model_dir, pairs(2), tmp_path / "w", cfg, guard)


def closed_form(loss, label_smoothing=0.0):
    pc, pr = (CHOSEN * MASK_C[:, 1:]).sum(1), (REJECTED * MASK_R[:, 1:]).sum(1)
    delta = (pc - REF_C) - (pr - REF_R)
    if loss == "dpo":
        return (-F.logsigmoid(BETA * delta)).mean()
    if loss == "hinge":
        return torch.relu(1 - BETA * delta).mean()
    if loss == "robust":
        e = label_smoothing
        return ((-(1 - e) * F.logsigmoid(BETA * delta) + e * F.logsigmoid(-BETA * delta)) / (1 - 2 * e)).mean()
    if loss == "ipo":  # per-token averages, TRL's normalisation (as in the IPO paper's experiments)
        d = (pc - REF_C) / MASK_C.sum(1) - (pr - REF_R) / MASK_R.sum(1)
        return ((d - 1 / (2 * BETA)) ** 2).mean()
    raise AssertionError(loss)


@pytest.mark.parametrize("loss,extra", [("dpo", {}), ("ipo", {}), ("hinge", {}),
                                        ("robust", {"label_smoothing": 0.2})])
def test_paired_losses_match_closed_form(tiny_model_dir, tmp_path, loss, extra):
    trainer = trainer_for(tiny_model_dir, tmp_path, loss=loss, **extra)
    model, inputs = dpo_batch()
    got = trainer._compute_loss(model, inputs, return_outputs=False)
    want = closed_form(loss, extra.get("label_smoothing", 0.0))
    assert torch.allclose(got, want, atol=1e-6), (loss, float(got), float(want))


def test_dpo_loss_is_log2_when_reference_equals_policy(tiny_model_dir, tmp_path):
    trainer = trainer_for(tiny_model_dir, tmp_path)
    model, inputs = dpo_batch()
    inputs["ref_chosen_logps"] = (CHOSEN * MASK_C[:, 1:]).sum(1)
    inputs["ref_rejected_logps"] = (REJECTED * MASK_R[:, 1:]).sum(1)
    assert math.isclose(float(trainer._compute_loss(model, inputs, False)), math.log(2), rel_tol=1e-6)


def test_kto_loss_matches_closed_form(tiny_model_dir, tmp_path):
    trainer = trainer_for(tiny_model_dir, tmp_path, loss="kto")
    # Unpaired: rows 0, 1 desirable; rows 2, 3 undesirable. KL rows: mismatched completions.
    lp = torch.cat([CHOSEN, REJECTED]) * torch.cat([MASK_C, MASK_R])[:, 1:]
    kl_lp = torch.full((4, 3), -1.0)  # KL completions: -3 each under the policy
    ref_logps = torch.cat([REF_C, REF_R])
    ref_kl = torch.full((4,), -4.0)  # and -4 under the reference: z_ref = mean(-3 - -4) = 1
    mask = torch.cat([MASK_C, MASK_R])
    kl_ids = torch.full_like(mask, 7)

    class Kto(FakeModel):
        def __call__(self, **kw):
            if torch.equal(kw["input_ids"], kl_ids):
                return SimpleNamespace(log_probs=kl_lp)
            return super().__call__(**kw)

    inputs = {"input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(mask), "KL_completion_mask": mask,
              "label": torch.tensor([True, True, False, False]), "ref_logps": ref_logps, "ref_KL_logps": ref_kl}
    got = trainer._compute_loss(Kto(lp), inputs, return_outputs=False)
    z = 1.0
    pc, pr = lp[:2].sum(1), lp[2:].sum(1)
    want = torch.cat([1 - torch.sigmoid(BETA * ((pc - REF_C) - z)), 1 - torch.sigmoid(BETA * (z - (pr - REF_R)))]).mean()
    assert torch.allclose(got, want, atol=1e-6), (float(got), float(want))


def test_cpo_loss_matches_closed_form(tiny_model_dir, tmp_path):
    """CPO: -log σ(β (log π(y_w) - log π(y_l))) plus cpo_alpha × NLL of the chosen tokens; no reference."""
    trainer = trainer_for(tiny_model_dir, tmp_path, loss="cpo", cpo_alpha=0.5)
    torch.manual_seed(0)
    vocab = 5
    logits = torch.randn(4, 4, vocab)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, 4, 0, -100], [-100, 2, 2, 2], [-100, 3, 1, 0]])

    class Logits:
        def __call__(self, *a, **kw):
            return SimpleNamespace(logits=logits.clone().requires_grad_())

    batch = {"chosen_input_ids": torch.ones(2, 4, dtype=torch.long), "chosen_attention_mask": torch.ones(2, 4),
             "chosen_labels": labels[:2], "rejected_input_ids": torch.ones(2, 4, dtype=torch.long),
             "rejected_attention_mask": torch.ones(2, 4), "rejected_labels": labels[2:]}
    got, _ = trainer.get_batch_loss_metrics(Logits(), batch)
    logp = torch.log_softmax(logits[:, :-1], -1)
    tgt = labels[:, 1:]
    tok = torch.where(tgt == -100, 0.0, logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1))
    seq = tok.sum(1)
    nll = -tok[:2][tgt[:2] != -100].mean()
    want = (-F.logsigmoid(BETA * (seq[:2] - seq[2:]))).mean() + 0.5 * nll
    assert torch.allclose(got, want, atol=1e-5), (float(got), float(want))


def test_length_guard_downweight_is_ld_dpo(tiny_model_dir, tmp_path):
    """downweight: tokens past the shorter answer's length count alpha times in the log-prob."""
    trainer = trainer_for(tiny_model_dir, tmp_path, guard=LengthGuard(action="downweight", alpha=0.5))
    assert trainer.ld_alpha == 0.5
    model, inputs = dpo_batch()
    got = trainer._compute_loss(model, inputs, return_outputs=False)
    # Pair 0: both 3 tokens, nothing discounted. Pair 1: chosen 2 tokens, rejected 3 -> its 3rd token counts half.
    pc = (CHOSEN * MASK_C[:, 1:]).sum(1)
    pr = torch.tensor([-3.0, -1.0 - 0.5 * 0.5])
    # The precomputed reference sums are taken as given (TRL computes them with the same weighting).
    want = (-F.logsigmoid(BETA * ((pc - REF_C) - (pr - REF_R)))).mean()
    assert torch.allclose(got, want, atol=1e-6)


def test_nll_alpha_adds_the_rpo_nll_term_on_chosen_tokens(tiny_model_dir, tmp_path):
    """RPO: the DPO loss plus nll_alpha × the mean negative log-likelihood of the chosen answer's tokens."""
    trainer = trainer_for(tiny_model_dir, tmp_path, nll_alpha=0.5)
    model, inputs = dpo_batch()
    got = trainer._compute_loss(model, inputs, return_outputs=False)
    nll = -CHOSEN[MASK_C[:, 1:].bool()].mean()
    want = closed_form("dpo") + 0.5 * nll
    assert torch.allclose(got, want, atol=1e-6), (float(got), float(want))


def test_nll_alpha_needs_a_dpo_family_loss():
    with pytest.raises(ValueError, match="nll_alpha works with the DPOTrainer losses"):
        TrainSection(loss="kto", nll_alpha=1.0)


@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("zero3", "DEEPSPEED"), ("fsdp2", "FSDP")])
def test_shipped_accelerate_configs_load_into_accelerates_plugins(name, kind, monkeypatch):
    # What `accelerate launch --config_file` hands each process, read back by accelerate's own plugins.
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, prepare_multi_gpu_env

    path = accelerate_config_path(name)
    assert path.is_file()
    args = launch_command_parser().parse_args(
        ["--config_file", str(path), "--num_processes", "8", "-m", "nash.train_worker", "ITER"])
    args, defaults, _ = _validate_launch_command(args)
    assert defaults.distributed_type.value == kind and args.num_processes == 8
    if kind == "FSDP":
        for k, v in prepare_multi_gpu_env(args).items():
            monkeypatch.setenv(k, v)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
        assert plugin.reshard_after_forward is True and plugin.cpu_ram_efficient_loading
    if kind == "DEEPSPEED":
        ds = {k: v for k, v in defaults.deepspeed_config.items() if k != "deepspeed_multinode_launcher"}
        zero = DeepSpeedPlugin(**ds).deepspeed_config["zero_optimization"]
        assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
        assert zero["offload_optimizer"]["device"] == "none"


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without CUDA is told")
def test_sharded_configs_are_refused_without_cuda_and_a_bad_file_is_named(tmp_path):
    for name in ("zero3", "fsdp2"):
        with pytest.raises(UserError, match=rf"{name} \((DEEPSPEED|FSDP)\) shards the policy .* no CUDA device"):
            check_training(TrainSection(launcher="accelerate", num_processes=2, accelerate_config=name))
    check_training(TrainSection(launcher="accelerate", num_processes=2, accelerate_config="ddp"))
    bad = tmp_path / "mine.yaml"
    bad.write_text("distributed_type: SHARDED_SOMEHOW\n")
    with pytest.raises(UserError, match=r"train.accelerate_config: .*mine.yaml is not an accelerate config"):
        check_training(TrainSection(launcher="accelerate", accelerate_config=str(bad)))


def test_an_accelerate_config_that_is_not_there_is_a_config_error():
    with pytest.raises(ValueError, match="neither a shipped accelerate config"):
        TrainSection(launcher="accelerate", accelerate_config="zero9")
