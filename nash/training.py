"""The update: TRL's DPOTrainer, KTOTrainer or CPOTrainer on the iteration's pairs, or SFTTrainer on
their chosen answers (rejection-sampling fine-tuning, to compare forgetting with DPO's).

The policy being trained starts as π_t. The reference is π_t (`train.reference: previous`)
or π_0 (`initial`); either way its log-probabilities are computed once before the first
step (TRL's `precompute_ref_log_probs`), reused by every epoch, and the reference model
is freed before training starts. CPO has no reference.

`train_policy` runs in a subprocess (nash/train_worker.py) started by `train_in_subprocess`,
so the trainer's memory goes back to the system before the next stage, and the same worker
runs under `accelerate launch` on several GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from tqdm.auto import tqdm

from nash.config import ACCELERATE_CONFIGS, PAIRED_LOSSES
from nash.errors import UserError
from nash.lm_head import cpu_scored_heads
from nash.models import load_causal_lm, load_tokenizer
from nash.precision import Precision, resolve
from nash.records import Pair, fsync_dir
from nash.supervisor import Child, Progress


def pairs_to_dataset(pairs: list[Pair], loss: str = "dpo"):
    """Conversational rows: paired for DPO-family and CPO, unpaired halves (label True/False) for KTO, each
    distinct chosen answer once as a prompt-completion row for SFT."""
    from datasets import Dataset

    def user(text):
        return [{"role": "user", "content": text}]

    def reply(text):
        return [{"role": "assistant", "content": text}]

    if loss == "kto":
        rows = [row for p in pairs for row in (
            {"prompt": user(p.prompt), "completion": reply(p.chosen), "label": True},
            {"prompt": user(p.prompt), "completion": reply(p.rejected), "label": False},
        )]
    elif loss == "sft":
        best = dict.fromkeys((p.prompt, p.chosen) for p in pairs)  # a prompt's several pairs share their chosen
        rows = [{"prompt": user(q), "completion": reply(a)} for q, a in best]
    else:
        rows = [{"prompt": user(p.prompt), "chosen": reply(p.chosen), "rejected": reply(p.rejected)} for p in pairs]
    return Dataset.from_list(rows)


def shared_dataset(dataset, path: Path):
    """The dataset saved under the trainer's work directory and read back by every process.

    TRL writes the reference log-probabilities next to the dataset's cache files on the main
    process, and the other ranks read that file back: an in-memory dataset's cache lives in a
    temporary directory of each process's own, where the other ranks cannot find it.
    """
    from accelerate import PartialState
    from datasets import load_from_disk

    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            shutil.rmtree(path, ignore_errors=True)  # left by a killed worker
            dataset.save_to_disk(str(path))
    return load_from_disk(str(path))


def build_trainer(policy_path: str, pairs: list[Pair], work_dir: Path, train_cfg, length_guard=None,
                  precision: Precision | None = None, seed: int = 0, initial_path: str | None = None, callbacks=(),
                  report_to: str | list[str] = "none", tracker_args: dict | None = None):
    """The TRL trainer for `train.loss`, configured from the train section.

    The weights load in `precision.weights` and TRL's bf16/fp16 arguments put the forward and
    backward passes (and the reference log-probabilities) under autocast in `precision.compute`.
    """
    cfg = train_cfg
    precision = precision or resolve("fp32")
    common = dict(
        output_dir=str(work_dir),
        beta=cfg.beta,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        warmup_steps=cfg.warmup_ratio,  # below 1: a share of the steps
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to=report_to,  # the run's tracker (tracking.kind); its callback reads where from the environment
        disable_tqdm=True,
        seed=seed,
        gradient_checkpointing=cfg.gradient_checkpointing,
        **precision.trainer_args(),
        **(tracker_args or {}),
    )
    # The trainer's arguments come before the weights: under ZeRO-3 they register the DeepSpeed
    # config, so from_pretrained loads every rank's shard only (zero3_init_flag).
    if cfg.loss in PAIRED_LOSSES:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

        downweight = length_guard is not None and length_guard.action == "downweight"
        # RPO: TRL's `sft` term is the mean NLL of the chosen tokens, weighted against the preference loss.
        losses, weights = [PAIRED_LOSSES[cfg.loss]], None
        if cfg.nll_alpha:
            losses, weights = losses + ["sft"], [1.0, cfg.nll_alpha]
        args = Config(**common, loss_type=losses, loss_weights=weights, label_smoothing=cfg.label_smoothing,
                      ld_alpha=length_guard.alpha if downweight else None, precompute_ref_log_probs=True)
    elif cfg.loss == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer

        args = Config(**common, precompute_ref_log_probs=True)
    elif cfg.loss == "cpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

        args = Config(**common, loss_type="sigmoid", cpo_alpha=cfg.cpo_alpha)
    elif cfg.loss == "sft":
        from trl import SFTConfig as Config
        from trl import SFTTrainer as Trainer

        common.pop("beta")
        args = Config(**common, completion_only_loss=True)  # the prompt is context, not a target
    else:
        raise ValueError(f"train.loss: unknown loss {cfg.loss!r}")
    tokenizer = load_tokenizer(policy_path)
    model = load_causal_lm(policy_path, precision.weights)
    peft_config = None
    if cfg.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    dataset = shared_dataset(pairs_to_dataset(pairs, cfg.loss), work_dir / "pairs.arrow")
    kwargs = dict(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                  callbacks=list(callbacks), peft_config=peft_config)
    if cfg.loss in ("cpo", "sft"):
        return Trainer(**kwargs)  # no reference
    ref_model = None
    if cfg.reference == "initial" and initial_path:
        ref_model = load_causal_lm(initial_path, precision.weights)
    with cpu_scored_heads():
        return Trainer(ref_model=ref_model, **kwargs)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())


def save_policy(trainer, out_dir: Path, policy_path: str, lora: bool, precision: Precision) -> str | None:
    """Save π_{t+1} as a plain HF checkpoint at `out_dir`, complete or absent; its weights' dtype on the main process.

    Under DDP every rank holds the whole model and the main process saves it. Under ZeRO-3 and FSDP
    the weights are sharded, so every rank takes part in `trainer.save_model`, which gathers them
    (zero3_save_16bit_model, FULL_STATE_DICT); a LoRA adapter saved that way is merged afterwards.
    """
    acc = trainer.accelerator
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    dtype = None
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        trainer.save_model(str(tmp))  # collective: gathers the shards, writes on the main process
        if acc.is_main_process and lora:
            from peft import PeftModel

            adapter = tmp.with_name(tmp.name + ".adapter")
            shutil.rmtree(adapter, ignore_errors=True)
            tmp.rename(adapter)
            base = load_causal_lm(policy_path, precision.weights)
            PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(tmp)
            trainer.processing_class.save_pretrained(tmp)
            shutil.rmtree(adapter)
        if acc.is_main_process:
            saved = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            dtype = saved.get("dtype") or saved.get("torch_dtype")
    elif acc.is_main_process:
        model = acc.unwrap_model(trainer.model)
        if lora:
            model = model.merge_and_unload()  # the next sampler loads a plain model
        model.save_pretrained(tmp)
        trainer.processing_class.save_pretrained(tmp)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if acc.is_main_process:
        _fsync_tree(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)  # the policy directory is complete or absent
        fsync_dir(out_dir.parent)
    acc.wait_for_everyone()
    return dtype


def train_policy(policy_path: str, pairs: list[Pair], out_dir: Path, train_cfg, length_guard=None,
                 precision: Precision | None = None, seed: int = 0, initial_path: str | None = None,
                 progress: Progress | None = None, report_to: str | list[str] = "none",
                 tracker_args: dict | None = None) -> dict:
    """Train π_t on `pairs`, save π_{t+1} to `out_dir` (HF format, LoRA merged), return training metrics."""
    from transformers import TrainerCallback

    class _Report(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if progress:
                progress(state.global_step, state.max_steps)

    work = out_dir.with_name(out_dir.name + ".trainer")
    precision = precision or resolve("fp32")
    trainer = build_trainer(policy_path, pairs, work, train_cfg, length_guard, precision, seed, initial_path,
                            [_Report()], report_to, tracker_args)
    result = trainer.train()
    weights_dtype = save_policy(trainer, out_dir, policy_path, train_cfg.lora is not None, precision)
    shutil.rmtree(work, ignore_errors=True)

    logs = [h for h in trainer.state.log_history if "loss" in h]
    first, last = (logs[0], logs[-1]) if logs else ({}, {})
    return {
        "loss_function": train_cfg.loss,
        "reference": "none" if train_cfg.loss in ("cpo", "sft") else train_cfg.reference,
        "steps": trainer.state.global_step,
        "pairs": len(pairs),
        "train_loss": result.training_loss,
        "first_step_loss": first.get("loss"),
        "last_step_loss": last.get("loss"),
        "reward_margin": last.get("rewards/margins"),
        "reward_accuracy": last.get("rewards/accuracies"),
        "reward_margin_mean": _mean([h.get("rewards/margins") for h in logs]),
        "reward_accuracy_mean": _mean([h.get("rewards/accuracies") for h in logs]),
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type).removeprefix("DistributedType."),
        "precision": precision.compute,
        "weights_dtype": weights_dtype,
        "train_seconds": result.metrics.get("train_runtime"),
        "pairs_per_second": round(len(pairs) * train_cfg.epochs / result.metrics["train_runtime"], 3)
        if result.metrics.get("train_runtime") else None,
    }


ACCELERATE_DIR = Path(__file__).parent / "data" / "accelerate"
def accelerate_config_path(name: str) -> Path:
    """A shipped config by name (ddp, zero3, fsdp2), or the user's file."""
    return ACCELERATE_DIR / f"{name}.yaml" if name in ACCELERATE_CONFIGS else Path(name)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_training(train_cfg, env: dict | None = None) -> None:
    """Raise a UserError for a train section that cannot launch here; loads no model.

    Run by the preflight where training runs in the round's process, and by the train stage
    itself, on the machine whose GPUs it will use.
    """
    if train_cfg.launcher != "accelerate":
        return
    env = os.environ if env is None else env
    name = train_cfg.accelerate_config
    kind = "MULTI_GPU"
    if name is not None:
        from accelerate.commands.config.config_args import load_config_from_file

        path = accelerate_config_path(name)
        try:
            kind = str(load_config_from_file(str(path)).distributed_type).removeprefix("DistributedType.")
        except Exception as e:  # accelerate raises several kinds for a bad file
            raise UserError(f"train.accelerate_config: {path} is not an accelerate config: {e}") from e
    if not _cuda():
        if kind in ("DEEPSPEED", "FSDP"):
            raise UserError(f"train.accelerate_config: {name} ({kind}) shards the policy over GPUs and this machine "
                            "has no CUDA device; use ddp (which runs on the CPU over gloo) or launcher python")
        return
    if kind == "DEEPSPEED":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(f"train.accelerate_config: {name} needs DeepSpeed: pip install deepspeed on the "
                            "training machines")
    import torch

    machines = int(env.get("NASH_NUM_MACHINES") or 1)
    per_machine = -(-train_cfg.num_processes // machines)
    if per_machine > torch.cuda.device_count():
        raise UserError(f"train.num_processes: {train_cfg.num_processes} over {machines} machine(s) needs "
                        f"{per_machine} GPUs here; {torch.cuda.device_count()} are visible")


def multi_node_args(env) -> list[str]:
    """accelerate's multi-node flags, read on each machine of a multi-node job from its own environment.

    NASH_NUM_MACHINES, NASH_MACHINE_RANK, NASH_MAIN_PROCESS_IP and NASH_MAIN_PROCESS_PORT win; inside
    a Slurm step (srun) the node count, the node's index and the address of the node that ran srun
    stand in for the first three.
    """
    slurm = "SLURM_NODEID" in env
    machines = int(env.get("NASH_NUM_MACHINES") or (env.get("SLURM_NNODES") if slurm else None) or 1)
    if machines <= 1:
        return []
    rank = env.get("NASH_MACHINE_RANK") or (env.get("SLURM_NODEID") if slurm else None)
    address = env.get("NASH_MAIN_PROCESS_IP") or (env.get("SLURM_LAUNCH_NODE_IPADDR") if slurm else None)
    if rank is None or address is None:
        raise UserError(f"a training job over {machines} machines needs NASH_MACHINE_RANK and NASH_MAIN_PROCESS_IP "
                        "on each machine (or an srun step, which gives both)")
    return ["--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", address,
            "--main_process_port", env.get("NASH_MAIN_PROCESS_PORT") or "29500"]


def worker_command(iter_dir: str | Path, train_cfg, env: dict | None = None) -> tuple[list[str], dict]:
    """The training worker's command line and the environment it needs on top of this one's.

    Under accelerate the command is `[launch_prefix] python -m nash.training ARGS`: on each machine
    that the prefix (e.g. srun) starts, it adds that machine's multi-node flags to ARGS and runs
    `accelerate launch`.
    """
    # nash.lifeline ties the launcher to this process; the workers tie themselves to the launcher.
    lifeline = [sys.executable, "-m", "nash.lifeline"]
    worker = ["-m", "nash.train_worker", str(iter_dir)]
    if train_cfg.launcher != "accelerate":
        return lifeline + [sys.executable, *worker], {}
    env = os.environ if env is None else env
    check_training(train_cfg, env)
    args = ["--num_processes", str(train_cfg.num_processes)]
    extra = {}
    if train_cfg.accelerate_config is not None:
        args += ["--config_file", str(accelerate_config_path(train_cfg.accelerate_config))]
    elif train_cfg.num_processes > 1:
        args += ["--multi_gpu"]  # torchrun's launcher: DDP
    if not _cuda():
        extra["ACCELERATE_USE_CPU"] = "true"  # DDP over gloo, one process per train.num_processes
    return lifeline + list(train_cfg.launch_prefix) + [sys.executable, "-m", "nash.training", *args, *worker], extra


def launch(argv: list[str]) -> None:
    """`python -m nash.training ARGS`: `accelerate launch` with this machine's multi-node flags."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *multi_node_args(os.environ), *argv]
    print("nash: " + " ".join(command), flush=True)
    os.execv(sys.executable, command)


def train_in_subprocess(iter_dir: Path, train_cfg, progress: Progress | None = None) -> dict:
    """Run nash/train_worker.py on the iteration; stream its progress; return what it wrote to train.json.

    The worker's output goes to train.log in the iteration directory; a failure raises
    with the log's last lines. The worker's process group is killed on any way out.
    """
    log_path, result_path = iter_dir / "train.log", iter_dir / "train.json"
    result_path.unlink(missing_ok=True)
    from nash import tracking
    from nash.registry import IterationDir

    command, extra = worker_command(iter_dir, train_cfg)
    extra.update(tracking.trainer_env(IterationDir.from_path(iter_dir)))
    return run_worker(command, extra, log_path, result_path, "training", progress)


def run_worker(command: list[str], env: dict, log_path: Path, result_path: Path, what: str,
               progress: Progress | None = None) -> dict:
    """Run a worker that reports `nash-train-progress` lines and writes its figures to `result_path`;
    a bar in the terminal, its output in `log_path`, its process group killed on any way out."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **env}
    bar = tqdm(desc=what, unit="step", leave=False)

    def on_progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()
        if progress:
            progress(done, total)

    with Child(command, log_path, env, on_progress, tail=20) as worker:
        rc = worker.follow()
        tail = list(worker.tail)
    bar.close()
    if rc != 0 or not result_path.is_file():
        raise RuntimeError(f"{what} subprocess exited with status {rc}; see {log_path}:\n  " + "\n  ".join(tail))
    return json.loads(result_path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    launch(sys.argv[1:])
