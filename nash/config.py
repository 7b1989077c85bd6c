"""The run configuration: YAML -> typed, validated models, with `--set` overrides.

Every section forbids unknown keys, and every error names the dotted key and, where
the key came from a file, the file and line.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nash.errors import UserError
from nash.policy import EMBEDDED
from nash.precision import misfit


class ConfigError(UserError, ValueError):
    pass


Precision = Literal["auto", "bf16", "fp16", "fp32"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


UNHASHED = ("iterations", "keep_policies")  # run keys a command may change on an existing run
UNHASHED_SECTIONS = ("stages", "tracking")  # where stages run and figures are logged shape no result


def _absolute_if_local(value: str | None) -> str | None:
    """A relative path that exists becomes absolute, so workers with another working directory find it."""
    if value and not Path(value).is_absolute() and Path(value).exists():
        return str(Path(value).resolve())
    return value


LocalPath = Annotated[str, AfterValidator(_absolute_if_local)]  # a path, or a name (hub id, builtin, ...)


class RunSection(Section):
    name: str = Field("demo", description="Run directory name under --runs-dir; a different config needs its own.")
    iterations: int = Field(2, ge=1, description="Iterations per `nash run`.")
    seed: int = Field(0, description="Seed for sampling and training.")
    keep_policies: Literal["all"] | int = Field(
        "all", description="Policies whose weights stay on disk: all, or k >= 1 for the last k iterations' and the "
        "promoted one; older weights are deleted when an iteration completes (manifests, hashes and records stay).",
    )

    @field_validator("keep_policies")
    @classmethod
    def _keep_at_least_one(cls, v):
        if v != "all" and v < 1:
            raise ValueError("keep_policies: 'all' or an integer >= 1 (the parent of the next iteration must stay)")
        return v


class PolicySection(Section):
    model: LocalPath = Field(EMBEDDED, description="π_0: the embedded default, a local HF directory, or a hub id.")
    precision: Precision = Field(
        "auto", description="Compute precision of training, sampling, evaluation answers and local judges. auto: "
        "bf16 on CUDA devices and CPUs (avx512_bf16, AMX) that have it, fp16 on older GPUs, else fp32.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights that training updates and saves (float32: mixed precision with float32 "
        "master weights and optimizer state).",
    )
    drift_precision: Literal["fp32", "policy"] = Field(
        "fp32", description="KL and perplexity: fp32, or policy (policy.precision). bf16 rounds away small updates.",
    )

    @model_validator(mode="after")
    def _precision_fits_dtype(self):
        if error := misfit(self.precision, self.dtype):
            raise ValueError(error)
        return self


class PromptsSection(Section):
    source: LocalPath = Field("builtin", description="'builtin', a .jsonl path, or 'hf:<dataset>[:split]'.")
    field: str = Field("prompt", description="Prompt text column of a JSONL or HF source.")
    reference_field: str = Field("reference", description="Column of gold answers, when the source has one.")
    seed: int = Field(0, description="Seed of the built-in set and of the partition shuffle.")
    partition_size: int = Field(64, ge=1, description="Fresh training prompts per iteration.")


class VLLMSection(Section):
    """vLLM's offline engine, run in a child process per shard (nash/vllm_worker.py)."""

    python: LocalPath | None = Field(
        None, description="Interpreter that runs the engine, e.g. .venv-vllm/bin/python (`make vllm`); "
        "null: nash's own.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0.0, le=1.0, description="Share of device memory for weights and KV cache; null: 0.85 on a "
        "GPU, 0.3 on a CPU (the CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE).",
    )
    max_model_len: int | None = Field(None, ge=1, description="Context length; null: the model's.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Engine weights; auto: the run's policy.precision.")
    enforce_eager: bool | None = Field(
        None, description="No CUDA graphs or compilation: faster start, slower decode. null: true without CUDA "
        "(vLLM's CPU compilation takes minutes), false on a GPU.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Any other vllm.LLM argument, passed through unchanged.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment of the engine process, e.g. VLLM_CPU_KVCACHE_SPACE: '4'.")
    start_timeout_s: float = Field(1800.0, gt=0, description="A shard that reports nothing for this long fails.")


class SamplingServerSection(Section):
    """An OpenAI-compatible server that already serves the policy (`vllm serve`, SGLang, TGI, llama.cpp)."""

    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(
        "{policy}", description="Model name the server knows; {policy} becomes the policy's path (a server that "
        "loads weights from disk per request, or serves π_t under that name).",
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable that holds the API key.")
    api_key_secret: str | None = Field(None, description="Prefect Secret block holding the key (used when set).")
    concurrency: int = Field(8, ge=1, description="Requests in flight.")
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0, description="Retries on 429, 5xx, timeouts and undecodable replies.")


class SamplingSection(Section):
    backend: Literal["transformers", "vllm", "openai"] = Field(
        "transformers", description="transformers: generate() in this process; vllm: vLLM's offline engine in a "
        "child process; openai: a server at sampling.server.base_url.",
    )
    n: int = Field(4, ge=1, description="Candidates per prompt (K).")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(128, ge=1, description="Sequences per generate() call.")
    include_reference: bool = Field(
        False, description="Add each prompt's gold answer as one more candidate, judged side by side (DNO)."
    )
    data_parallel: int = Field(1, ge=1, description="vllm: independent engines in the stage's process (one per "
                               "GPU group), each on a slice of the shard's prompts.")
    shards: int = Field(1, ge=1, description="The iteration's prompts split into this many shards, each sampled "
                        "from its own seed into its own file with a completion marker; with stages.sample set, "
                        "one child run per shard on the sampling pool. Part of the result: keep it fixed for a run.")
    vllm: VLLMSection = VLLMSection()
    server: SamplingServerSection = SamplingServerSection()

    @model_validator(mode="after")
    def _backend_has_what_it_needs(self):
        if self.backend == "openai" and not self.server.base_url:
            raise ValueError("sampling.server.base_url: the openai backend needs the server's URL")
        if self.data_parallel > 1 and self.backend != "vllm":
            raise ValueError("sampling.data_parallel: only the vllm backend shards prompts over engines")
        return self


class RulesJudge(Section):
    kind: Literal["rules"] = "rules"


class _LMJudge(Section):
    """Keys shared by judges that write a verdict as text (openai, self, hf)."""

    protocol: Literal["pointwise", "batched", "pairwise"] = Field(
        "pointwise",
        description="pointwise: one request per candidate (Self-Rewarding); batched: all candidates of a "
        "prompt in one request, JSON reply (DNO); pairwise: every pair in both orders, agreement only.",
    )
    template: LocalPath | None = Field(None, description="Prompt template file; default: the protocol's own in judges/prompts/.")
    repeats: int = Field(1, ge=1, description="Pointwise: judge each candidate this many times and average.")
    temperature: float = Field(0.0, ge=0.0)
    max_tokens: int = Field(512, ge=1, description="Reply length limit.")
    parse_retries: int = Field(2, ge=0, description="Re-asks after a malformed reply before recording `failed`.")
    cache: bool = Field(True, description="Reuse replies from the on-disk judgment cache.")
    budget_tokens: int | None = Field(None, ge=1, description="Stop judging once this many tokens are spent.")
    budget_usd: float | None = Field(None, gt=0, description="Stop judging once this much is spent.")
    price_input_per_mtok: float = Field(0.0, ge=0.0, description="USD per million prompt tokens.")
    price_output_per_mtok: float = Field(0.0, ge=0.0, description="USD per million completion tokens.")


class OpenAIJudge(_LMJudge):
    kind: Literal["openai"]
    model: str = Field("gpt-4-turbo", description="Model name as the server knows it.")
    base_url: str | None = Field(None, description="Any OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable that holds the API key.")
    api_key_secret: str | None = Field(None, description="Prefect Secret block holding the key (used when set).")
    concurrency: int = Field(8, ge=1, description="Prompts judged at once.")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0, description="Retries on 429, 5xx, timeouts, dropped "
                             "connections and undecodable replies (backoff with jitter, Retry-After).")
    weighted: bool = Field(
        False, description="Pairwise: P(a) against P(b) from the verdict token's top_logprobs, where the server "
        "returns them (otherwise the text verdict counts).",
    )
    price_input_per_mtok: float = 10.0  # GPT-4-Turbo list prices
    price_output_per_mtok: float = 30.0


class _LocalJudge(_LMJudge):
    weighted: bool = Field(
        True,
        description="Pointwise: prefill 'Score: ' and take the probability-weighted mean of the scale "
        "(no generated justification). False: generate the full reply and parse its score.",
    )
    batch_size: int = Field(16, ge=1)
    concurrency: int = Field(
        64, ge=1, description="self, with sampling.backend vllm or openai: requests in flight to the served "
        "policy, which the engine batches.")


class SelfJudge(_LocalJudge):
    kind: Literal["self"]


class HFJudge(_LocalJudge):
    kind: Literal["hf"]
    model: LocalPath = Field(..., description="Local directory or hub id of a causal LM.")
    precision: Precision = Field("auto", description="As policy.precision, for the judge's weights.")


class RewardModelJudge(Section):
    kind: Literal["reward_model"]
    model: LocalPath = Field(..., description="Sequence-classification reward model: local directory or hub id.")
    precision: Precision = Field("auto", description="As policy.precision, for the reward model's weights.")
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(1024, ge=16)


class QualityJudge(Section):
    kind: Literal["quality"]
    embedder: LocalPath = Field("embedded:all-minilm-l6-v2", description="Sentence-embedding model (mean pooling): "
                          "the embedded all-MiniLM-L6-v2, a local directory or a hub id.")
    precision: Precision = Field("auto", description="As policy.precision, for the embedder.")
    min_words: int = Field(6, ge=0, description="Fewer words than this is not an answer (a sentence or more).")
    min_relevance: float = Field(0.25, description="Cosine of the answer's and the topic's embeddings below "
                                 "this is off topic (the prompt's text when it has no topic).")
    min_vocab_share: float = Field(0.7, ge=0.0, le=1.0, description="Share of alphabetic words the embedder's "
                                   "vocabulary knows below this is gibberish.")
    min_distinct_2: float = Field(0.5, ge=0.0, le=1.0, description="Distinct bigrams / bigrams below this is repetitive.")
    max_repeated_3: float = Field(0.3, ge=0.0, le=1.0, description="Repeated trigram share above this is repetitive.")


class CompositeJudge(Section):
    kind: Literal["composite"]
    components: list[JudgeSection] = Field(..., min_length=1)
    weights: list[float] | None = Field(None, description="One per component; default equal.")
    combine: Literal["mean", "gated"] = Field(
        "mean", description="mean: weighted mean of the components; gated: the first component (0..1, e.g. "
        "quality) multiplies (1 + weighted mean of the others) / 2, so the others pay only on what passes it.",
    )

    @model_validator(mode="after")
    def _weights_match(self):
        if self.weights is not None and len(self.weights) != len(self.components):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.components)} components")
        if self.combine == "gated" and len(self.components) < 2:
            raise ValueError("combine gated needs a gate and at least one other component")
        return self


class CascadeJudge(Section):
    kind: Literal["cascade"]
    student: RewardModelJudge = Field(
        ..., description="Scores every candidate: a reward model, by default the run's latest distilled one "
        "(model: distill:latest, or distill:vNNN; `nash distill`).")
    teacher: JudgeSection = Field(..., description="Judges the prompts the student is unsure of: any judge kind, "
                                  "with its own cache and budget.")
    agreement: float = Field(0.9, gt=0.0, le=1.0, description="The student decides a prompt when its decisive "
                             "margin (best minus worst candidate) is at least the threshold at which it agreed "
                             "with the teacher this often on the distillation's held-out prompts.")
    threshold: float | None = Field(None, description="Decisive margin in the student's units; null: from "
                                    "the distilled model's report at `agreement`. Needed for a reward model "
                                    "nash did not distill.")
    chunk_candidates: int = Field(256, ge=1, description="Candidates scored by the student per chunk; the "
                                  "chunk's unsure prompts then go to the teacher together (its concurrency).")

    @model_validator(mode="after")
    def _teacher_is_not_a_cascade(self):
        if self.teacher.kind == "cascade":
            raise ValueError("teacher: a cascade's teacher cannot be another cascade")
        return self


JudgeSection = Annotated[
    RulesJudge | QualityJudge | OpenAIJudge | SelfJudge | HFJudge | RewardModelJudge | CompositeJudge | CascadeJudge,
    Field(discriminator="kind"),
]
JUDGE_KINDS = ("rules", "quality", "openai", "self", "hf", "reward_model", "composite", "cascade")
CompositeJudge.model_rebuild()
CascadeJudge.model_rebuild()


class DistillSection(Section):
    """A reward model trained on the run's own judgments (`nash distill RUN`, or between iterations)."""

    every: int = Field(0, ge=0, description="Distill after every N-th complete iteration, before the next one "
                       "starts; 0: only when `nash distill` is run.")
    backbone: LocalPath | None = Field(None, description="Model under the classification head; null: π_0 "
                                       "(policy.model).")
    holdout: float = Field(0.2, gt=0.0, lt=1.0, description="Share of prompts held out (split by prompt) "
                           "for accuracy, calibration and the cascade's threshold.")
    min_margin: float = Field(0.0, ge=0.0, description="Teacher score difference a pair needs; ties (and "
                              "failed judgments) never make a pair.")
    max_pairs_per_prompt: int = Field(4, ge=1, description="Largest-margin pairs kept per prompt, so prompts "
                                      "with many candidates do not dominate.")
    learning_rate: float = Field(2e-5, gt=0)
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(512, ge=16, description="Tokens of prompt and answer; longer pairs are left out "
                            "by TRL's RewardTrainer, and counted.")
    center_rewards: float | None = Field(0.01, ge=0.0, description="TRL's center_rewards_coefficient: "
                                         "rewards near zero, so scores compare across prompts.")
    precision: Precision = Field("auto", description="As policy.precision.")


class LengthGuard(Section):
    action: Literal["off", "drop", "downweight"] = Field(
        "off",
        description="drop: drop pairs whose chosen answer is more than max_ratio times as long as the rejected; "
        "downweight: LD-DPO (TRL's ld_alpha), tokens past the shorter answer's length count `alpha` times.",
    )
    max_ratio: float = Field(1.5, gt=1.0, description="drop: chosen tokens / rejected tokens above this drops the pair.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="downweight: weight of the longer answer's extra tokens.")


class PairsSection(Section):
    rule: Literal["dno", "max_min", "spin"] = Field(
        "dno",
        description="dno: large-margin rule below; max_min: highest vs lowest, ties skipped (Self-Rewarding); "
        "spin: the gold answer chosen over the policy's sample, no judge (SPIN).",
    )
    min_chosen_score: float = Field(0.75, description="dno: chosen must score at least this (the default judge: "
                                    "a real answer meeting at least half its constraints).")
    min_margin: float = Field(0.25, gt=0.0, description="dno: chosen minus rejected must be at least this.")
    teacher_margin: float | None = Field(
        None, gt=0.0,
        description="dno: the margin when a policy sample is chosen over the gold answer (DNO: 1 where "
        "min_margin is 2); unset: min_margin.",
    )
    per_prompt: Literal["best", "all"] = Field(
        "best", description="'best': the largest-margin pair of a prompt; 'all': every qualifying pair."
    )
    replay: list[float] = Field(
        [], description="Share of the training set drawn from the pairs of iteration t-1, t-2, ... "
        "(DNO: [0.3, 0.15]); an earlier iteration with fewer pairs gives what it has.",
    )
    length_guard: LengthGuard = LengthGuard()

    @model_validator(mode="after")
    def _replay_shares(self):
        if any(not 0.0 <= s < 1.0 for s in self.replay) or sum(self.replay) >= 1.0:
            raise ValueError(f"replay shares must each be in [0, 1) and sum below 1, got {self.replay}")
        return self


class LoraSection(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field("all-linear", description="PEFT target_modules.")


ACCELERATE_CONFIGS = ("ddp", "zero3", "fsdp2")  # nash/data/accelerate/<name>.yaml
PAIRED_LOSSES = {"dpo": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust"}


class TrainSection(Section):
    loss: Literal["dpo", "ipo", "hinge", "robust", "kto", "cpo", "sft"] = Field(
        "dpo",
        description="dpo/ipo/hinge/robust: TRL DPOTrainer loss types; kto: KTOTrainer on unpaired halves; "
        "cpo: CPOTrainer, no reference model, preference loss plus NLL; sft: SFTTrainer on the kept pairs' "
        "chosen answers only (rejection-sampling fine-tuning), no reference model.",
    )
    beta: float = Field(0.1, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="robust: assumed share of flipped labels.")
    cpo_alpha: float = Field(1.0, ge=0.0, description="cpo: weight of the NLL term on the chosen answer.")
    nll_alpha: float = Field(0.0, ge=0.0, description="dpo/ipo/hinge/robust: weight of an NLL term on the chosen "
                             "answer added to the preference loss (RPO, iterative RPO); 0: none.")
    parent: Literal["promoted", "last"] = Field(
        "promoted", description="What the next iteration trains from: the promoted policy (π_0 until one is), or "
        "the last complete iteration whatever its evaluation (DNO's rule).")
    reference: Literal["previous", "initial"] = Field(
        "previous", description="previous: π_t, the policy that sampled the candidates; initial: π_0."
    )
    learning_rate: float = Field(5e-5, gt=0.0)
    epochs: float = Field(2.0, gt=0.0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(256, ge=16, description="Prompt plus completion tokens; longer pairs are truncated.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about a third more compute "
        "(TRL's default is on; large policies on GPUs want it).",
    )
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    lora: LoraSection | None = Field(None, description="Train a LoRA adapter (PEFT), merged into the saved policy.")
    launcher: Literal["python", "accelerate"] = Field(
        "python", description="Training runs in a subprocess: plain python, or `accelerate launch` (multi-GPU)."
    )
    num_processes: int = Field(1, ge=1, description="accelerate: processes (GPUs), over every machine.")
    accelerate_config: LocalPath | None = Field(
        None, description="accelerate: a shipped config (ddp, zero3, fsdp2; nash/data/accelerate/) or the path of "
        "your own accelerate config file; null: accelerate's defaults (DDP with --num_processes > 1).")
    launch_prefix: list[str] = Field(
        [], description="accelerate: a command that starts the launcher on every machine of a multi-node job, "
        "e.g. [srun, --nodes=2, --ntasks-per-node=1]; each machine reads its rank from its environment.")
    kl_prompts: int = Field(16, ge=0, description="Training prompts on which KL(π_{t+1} || π_t) is measured (0: skip).")

    @field_validator("accelerate_config")
    @classmethod
    def _known_accelerate_config(cls, v):
        if v is not None and v not in ACCELERATE_CONFIGS and not Path(v).is_file():
            raise ValueError(f"{v!r} is neither a shipped accelerate config ({', '.join(ACCELERATE_CONFIGS)}) "
                             "nor a file")
        return v

    @model_validator(mode="after")
    def _loss_options(self):
        if self.loss == "robust" and self.label_smoothing == 0.0:
            raise ValueError("loss robust needs label_smoothing > 0 (the assumed share of flipped labels)")
        if self.nll_alpha and self.loss not in PAIRED_LOSSES:
            raise ValueError(f"nll_alpha works with the DPOTrainer losses ({', '.join(PAIRED_LOSSES)}); "
                             f"cpo has its own cpo_alpha; sft is all NLL")
        if self.loss in ("cpo", "sft") and self.reference == "initial":
            raise ValueError(f"loss {self.loss} uses no reference model; remove reference: initial")
        return self


class GateSection(Section):
    """Promotion against the promoted policy, head to head on the held-out prompts (nash/gate.py)."""

    metrics: list[Literal["win_rate", "substantive_pass_rate", "degenerate"]] = Field(
        ["win_rate", "substantive_pass_rate", "degenerate"],
        description="Figures compared prompt by prompt with the promoted policy: the annotator's head-to-head "
        "preference, the real pass rate, the degenerate share.")
    confidence: float = Field(0.9, gt=0.5, lt=1.0, description="Two-sided confidence of the paired bootstrap "
                              "intervals.")
    margin: float = Field(0.05, ge=0.0, lt=1.0, description="How far below 0 a figure's interval may reach "
                          "(non-inferiority); and one figure's interval must be above 0. Keep it near the intervals' "
                          "half-width (`mde` in the metrics): about 0.05 at 384 prompts.")


class RetentionSection(Section):
    """General knowledge the policy must keep (nash/retention.py): scored by log-likelihood, no generation."""

    source: LocalPath = Field("builtin", description="Multiple-choice items: 'builtin' (240 items on subjects far "
                              "from the training prompts), a .jsonl or 'hf:<dataset>[:split]' with question, "
                              "choices and answer (the correct choice's index).")
    items: int = Field(0, ge=0, description="Items to score (0: all).")
    max_drop: float | None = Field(0.02, ge=0.0, le=1.0, description="Forgetting gate: an iteration whose accuracy "
                                   "is more than this below π_0's is not promoted, and is warned about; null: "
                                   "report only.")


class EvalSection(Section):
    num_prompts: int = Field(384, ge=0, description="Held-out prompts to evaluate (0: all).")
    max_new_tokens: int = Field(96, ge=1)
    reference: LocalPath = Field(
        "initial",
        description="Reference outputs the win rate is taken against: 'initial' (π_0's greedy answers on the "
        "held-out split, generated once per run), or an AlpacaEval-layout set (instruction, output, generator): "
        "a .json or .jsonl path, 'hf:<dataset>[:split]', or 'alpaca_eval': AlpacaEval 2.0's 805 instructions with "
        "GPT-4-Turbo's outputs (alpaca_eval_gpt4_baseline.json of the hub dataset tatsu-lab/alpaca_eval).",
    )
    judge: JudgeSection | None = Field(None, description="Annotator; default: the run's judge (self: π_0).")
    weighted: bool = Field(True, description="LM annotators: preference from P(a) vs P(b) of the verdict "
                           "(local judges: next-token probabilities; openai: top_logprobs where the server returns them).")
    protocol: Literal["pairwise", "alpaca_eval"] = Field(
        "pairwise",
        description="pairwise: nash's own annotation, the judge's pairwise prompt in both orders (LM judges) or "
        "both outputs scored (others); alpaca_eval: AlpacaEval 2.0's annotator, run exactly as the installed "
        "alpaca_eval package runs it (one request per instruction, preference from the top_logprobs of m and "
        "M); needs an openai annotator (eval.judge.kind openai, any OpenAI-compatible base_url).",
    )
    alpaca_eval_annotator: str = Field(
        "weighted_alpaca_eval_gpt4_turbo",
        description="protocol alpaca_eval: the package's annotator configuration.",
    )
    alpaca_eval_model: str | None = Field(
        None, description="protocol alpaca_eval: the annotator's model name on the server; default the "
        "configuration's own (gpt-4-1106-preview). eval.judge.model is not used by this protocol.",
    )
    lc_glm: Literal["length_controlled_minimal", "length_controlled_v1"] = Field(
        "length_controlled_minimal",
        description="AlpacaEval GLM for the length-controlled win rate; v1 adds AlpacaEval's instruction "
        "difficulty and needs the public AlpacaEval set and a hub.",
    )
    drift_text: LocalPath = Field("builtin", description="General text for perplexity: 'builtin' or a .jsonl with 'text'.")
    drift_prompts: int = Field(32, ge=0, description="Held-out prompts for KL(π_t || π_0) (0: skip drift).")
    promote_if: list[str] = Field(
        ["degenerate_rise <= 0.05"],
        description="Conditions for promoting an iteration, each 'METRIC OP best|previous|NUMBER', "
        "e.g. 'win_rate >= best', 'kl_from_initial <= 0.5'. Empty: every iteration with at least one usable "
        "annotation is promoted.",
    )
    gate: GateSection | None = Field(
        default_factory=GateSection, description="Promote only an iteration that beats the promoted policy (π_0 "
        "until one is) head to head; null: eval.promote_if alone decides.")
    retention: RetentionSection | None = Field(
        default_factory=RetentionSection, description="Retention of general knowledge beside π_0's, and the "
        "forgetting gate; null: not measured.")
    min_words: int = Field(6, ge=0, description="Answers with fewer words count as short (degenerate); 0: no "
                           "short flag.")
    warn_win_rate_drop: float = Field(0.05, ge=0.0, description="Warn when win rate falls by more than this.")
    warn_kl_ratio: float = Field(2.0, gt=1.0, description="Warn when KL from π_0 grows more than this factor.")
    warn_degenerate_rise: float = Field(0.05, ge=0.0, description="Warn when the share of degenerate answers "
                                        "(empty, short, repetitive, off topic) exceeds π_0's by more than this.")
    warn_length_ratio: float = Field(2.0, gt=1.0, description="Warn when mean answer length is more than this "
                                     "factor above or below π_0's.")

    @field_validator("promote_if")
    @classmethod
    def _conditions(cls, v):
        for c in v:
            parse_condition(c)
        return v

    @model_validator(mode="after")
    def _measured(self):
        """A condition on a figure that is not measured could never hold."""
        for c in self.promote_if:
            metric = parse_condition(c)[0]
            if metric in ("retention", "retention_drop") and self.retention is None:
                raise ValueError(f"promote_if {c!r} needs eval.retention (it is null)")
            if metric in ("kl_from_initial", "perplexity", "rank_shift") and not self.drift_prompts:
                raise ValueError(f"promote_if {c!r} needs eval.drift_prompts > 0")
        return self


PROMOTE_METRICS = ("win_rate", "lc_win_rate", "pass_rate", "kl_from_initial", "perplexity", "mean_length",
                   "substantive_pass_rate", "degenerate", "degenerate_rise", "length_ratio", "retention",
                   "retention_drop", "rank_shift")
_CONDITION = re.compile(r"^\s*(\w+)\s*(>=|<=|>|<)\s*(best|previous|[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*$")


def parse_condition(text: str) -> tuple[str, str, str]:
    m = _CONDITION.match(text)
    if not m or m.group(1) not in PROMOTE_METRICS:
        raise ValueError(f"cannot read {text!r}; expected 'METRIC OP best|previous|NUMBER' "
                         f"with METRIC one of {', '.join(PROMOTE_METRICS)} and OP one of >=, <=, >, <")
    return m.group(1), m.group(2), m.group(3)


class StagePool(Section):
    """Where one stage runs: a Prefect work pool whose workers have nash installed."""

    work_pool: str = Field(..., description="Prefect work pool (process, Docker, Kubernetes, ...).")
    work_queue: str | None = Field(None, description="A queue of the pool; null: its default queue.")
    job_variables: dict[str, Any] = Field(
        default_factory=dict, description="The pool's job variables for this stage, e.g. {env: {HF_HOME: ...}} "
        "or a Kubernetes pool's resource requests.")
    device_slots: int | None = Field(
        None, ge=1, description="Devices (GPUs or tensor-parallel groups) of the pool: the stage takes one "
        "slot of the Prefect global concurrency limit nash-devices-<pool>, so no two GPU stages (a scheduled "
        "round's and a manual `nash eval`'s) share a device. null: no slot.")


class TrackingSection(Section):
    """An experiment tracker (nash/tracking.py). Where figures are logged shapes no result: not hashed."""

    kind: Literal["none", "mlflow", "wandb", "tensorboard", "trackio"] = Field(
        "none", description="mlflow: one MLflow run per nash run, a nested run per iteration; wandb: one W&B run per "
        "nash run and one per iteration's training, grouped under the run's name (WANDB_MODE=offline writes run "
        "files to upload later with `wandb sync`); tensorboard: event files under `dir`; trackio: a run per nash "
        "run and one per iteration in a local project (TRACKIO_DIR). Install with `pip install 'nash[tracking]'`.")
    uri: str | None = Field(None, description="mlflow: the tracking URI, e.g. http://127.0.0.1:5000; null: "
                            "MLFLOW_TRACKING_URI, else ./mlruns. wandb: the W&B server's URL; null: WANDB_BASE_URL, "
                            "else api.wandb.ai.")
    experiment: str | None = Field(None, description="mlflow: the experiment; wandb and trackio: the project; null: "
                                   "the run's name.")
    entity: str | None = Field(None, description="wandb: the team or user owning the project; null: WANDB_ENTITY, "
                               "else the API key's default entity.")
    dir: LocalPath | None = Field(None, description="tensorboard: the log directory; wandb: W&B writes to its "
                                  "`wandb/` folder; null: RUN/tensorboard, RUN (so RUN/wandb).")
    timeout_s: float = Field(120, gt=0, description="wandb: how long the round waits for W&B to log an iteration's "
                             "figures, and the training worker for its run to finish, before going on without it.")
    on_error: Literal["fail", "warn"] = Field(
        "fail", description="fail: a tracker that cannot be reached stops the round before its first stage; "
        "warn: nash logs a warning and goes on, and logs the missed iterations when it answers again.")


class StagesSection(Section):
    """Stages mapped to work pools run as Prefect deployments (`nash deploy`); the others run in the round's process."""

    sample: StagePool | None = Field(None, description="One child run per sampling shard (sampling.shards).")
    judge: StagePool | None = None
    train: StagePool | None = None
    evaluate: StagePool | None = None
    round: StagePool | None = Field(None, description="Where `nash deploy` puts the round flow itself.")
    retries: int = Field(2, ge=0, description="A child run that crashed (its worker died) is started again this "
                         "many times; it resumes from the files the dead one left. Failed children are not retried.")
    heartbeat_s: int = Field(30, ge=30, description="Heartbeat period of child runs (PREFECT_FLOWS_HEARTBEAT_"
                             "FREQUENCY on the workers); Prefect's minimum is 30.")
    zombie_after_s: int = Field(90, ge=31, description="A child run with no heartbeat for this long is marked "
                                "Crashed by the automation `nash deploy` creates (its worker died).")
    poll_s: float = Field(2.0, gt=0, description="How often the round reads its children's states.")

    def mapped(self) -> dict[str, StagePool]:
        return {name: pool for name in ("sample", "judge", "train", "evaluate")
                if (pool := getattr(self, name)) is not None}

    @model_validator(mode="after")
    def _zombie_after_heartbeats(self):
        if self.zombie_after_s <= self.heartbeat_s:
            raise ValueError(f"zombie_after_s ({self.zombie_after_s}) must exceed heartbeat_s ({self.heartbeat_s}), "
                             "or every child looks dead between two heartbeats")
        return self


class Config(Section):
    run: RunSection = RunSection()
    policy: PolicySection = PolicySection()
    prompts: PromptsSection = PromptsSection()
    sampling: SamplingSection = SamplingSection()
    judge: JudgeSection = Field(
        default_factory=lambda: CompositeJudge(kind="composite", combine="gated",
                                               components=[QualityJudge(kind="quality"), RulesJudge()]),
        description="Default: constraints pay only on real answers, quality x (1 + rules) / 2.")
    pairs: PairsSection = PairsSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    distill: DistillSection = DistillSection()
    tracking: TrackingSection = TrackingSection()
    stages: StagesSection = StagesSection()

    @model_validator(mode="after")
    def _cross_section(self):
        if self.pairs.rule != "spin" and self.sampling.n + self.sampling.include_reference < 2:
            raise ValueError(f"sampling.n: pairs.rule {self.pairs.rule} needs at least 2 candidates per prompt")
        annotator = self.annotator
        if self.eval.protocol == "alpaca_eval" and annotator.kind != "openai":
            where = "eval.judge" if self.eval.judge else "judge (eval.judge is unset)"
            raise ValueError(f"eval.protocol: alpaca_eval sends AlpacaEval's requests to an OpenAI-compatible "
                             f"server, but {where} is kind {annotator.kind}; set eval.judge.kind: openai")
        if self.pairs.length_guard.action == "downweight" and self.train.loss not in PAIRED_LOSSES:
            raise ValueError(
                f"pairs.length_guard.action: downweight works with the DPOTrainer losses "
                f"({', '.join(PAIRED_LOSSES)}), not train.loss {self.train.loss}"
            )
        return self

    @property
    def annotator(self):
        """The evaluation's judge section: eval.judge, or the run's judge (a cascade's teacher: the student
        was trained to imitate it, not to measure)."""
        jcfg = self.eval.judge or self.judge
        return jcfg.teacher if jcfg.kind == "cascade" else jcfg

    def hash(self) -> str:
        """Hash of everything that shapes results (not how many iterations to run, nor what disk keeps)."""
        data = self.model_dump(mode="json")
        for key in UNHASHED:
            data["run"].pop(key)
        for section in UNHASHED_SECTIONS:
            data.pop(section)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        # A judge of another kind replaces the base's judge: their keys do not mix.
        other_kind = isinstance(v, dict) and "kind" in v and v["kind"] != (out.get(k) or {}).get("kind")
        merge = isinstance(v, dict) and isinstance(out.get(k), dict) and not other_kind
        out[k] = _deep_merge(out[k], v) if merge else v
    return out


def _line_index(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict:
    """Map each dotted key of a YAML document to the line it is written on."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = path + (k.value,)
            out[".".join(key)] = k.start_mark.line + 1
            _line_index(v, key, out)
    return out


def _read_yaml(path: Path, lines: dict[str, str]) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 ({e.reason}); save the file as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for key, line in (_line_index(node) if node else {}).items():
        lines[key] = f"{path}:{line}"
    base = data.pop("base", None)
    if base is not None:
        data = _deep_merge(_read_yaml((path.parent / base).resolve(), lines), data)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    lines: dict[str, str] = {}
    data = _read_yaml(Path(path), lines) if path else {}
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:  # an unset optional section (eval.judge: null) is opened by --set
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {k!r} is not a section")
        if keys[-1] == "kind" and node.get("kind") not in (None, value):
            # Another judge kind: the file's keys for the old kind do not apply to it.
            prefix = ".".join(keys[:-1]) + "."
            for k in [k for k in node if lines.get(prefix + k) != "--set"]:
                del node[k]
        node[keys[-1]] = value
        lines[".".join(keys)] = "--set"
    return validate_config(data, lines)


def validate_config(data: dict, lines: dict[str, str] | None = None) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            # Drop the union tag pydantic puts in the path (judge.openai.model -> judge.model).
            key = ".".join(str(p) for p in err["loc"] if p not in JUDGE_KINDS)
            if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
                key += ".kind"
            where = (lines or {}).get(key)
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            msg = msg.removeprefix("Value error, ")
            msgs.append(f"{where + ': ' if where else ''}{key + ': ' if key else ''}{msg}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(msgs)) from None


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
