"""The vllm sampling backend with the real engine (the CPU build, in .venv-vllm: `make vllm`)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nash.config import VLLMSection
from nash.records import Prompt
from nash.sampling import SamplingParams
from nash.sampling.vllm import VLLMSampler
from nash.vllm_engine import EngineFailed

ROOT = Path(__file__).resolve().parent.parent
PYTHON = os.environ.get("NASH_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))

if not Path(PYTHON).exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"CI needs vLLM for these tests: {PYTHON} is missing (make vllm)")
    pytest.skip("vLLM is not installed (make vllm)", allow_module_level=True)

PROMPTS = ["Say hi.", "Count to three.", "Name a color.", "Write one word."]


def tiny_llama(out, seed: int, adjust=None, **config) -> str:
    """A tiny random Llama with SmolLM2's tokenizer; head size 64, which the CPU attention supports."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from nash.policy import embedded_gguf_path

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(seed)
    config = LlamaConfig(**{"vocab_size": len(tok), "hidden_size": 128, "intermediate_size": 256,
                            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                            "max_position_embeddings": 512, "bos_token_id": tok.bos_token_id,
                            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                            "tie_word_embeddings": True, **config})
    model = LlamaForCausalLM(config)
    if adjust:
        with torch.no_grad():
            adjust(model, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("vllm-policy"), seed=0)


# Every engine these tests start carries this mark in its environment, and so do its children:
# what they look for is theirs, whatever else runs vLLM on the machine.
MARK = f"NASH_TEST_MARK=vllm-tests-{os.getpid()}"
MARK_ENV = {**dict([MARK.split("=", 1)]), "VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB: tiny models


def make(model, work, shards=1, **kw):
    cfg = VLLMSection(python=PYTHON, enforce_eager=True, max_model_len=512, env=MARK_ENV, **kw)
    return VLLMSampler(model, cfg, shards, "bfloat16", work)


def engine_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        if "vllm_worker.py" in line or "EngineCore" in line:
            try:
                environ = Path(f"/proc/{line.split()[0]}/environ").read_bytes().split(b"\0")
            except OSError:  # gone meanwhile
                continue
            if MARK.encode() in environ:
                found.append(line)
    return found


# Per shard, more prompt tokens than one engine step takes (max_num_batched_tokens 512 below): a
# chunked prefill would split them across steps, which broke per-prompt seeds on the CPU build
# ("CPU Generator does not use offset").
LONG = [f"Summarize: {'the quick brown fox jumps over the lazy dog. ' * 30}({i})" for i in range(8)]


@pytest.mark.slow  # 80-130 s on 2 cores; the fast selection keeps the vLLM evaluation test
def test_shards_samples_chat_template_seed_and_resume(vllm_model_dir, tmp_path):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=7)
    s = make(vllm_model_dir, tmp_path, shards=2, engine_args={"max_num_batched_tokens": 512})
    prompts = PROMPTS + LONG
    out = s.generate(prompts, params, show_progress=False)
    assert [len(cs) for cs in out] == [3] * len(prompts)
    assert all(len({c.text for c in cs}) == 3 for cs in out), "K samples of a prompt must differ"
    assert all(1 <= c.num_tokens <= 12 for cs in out for c in cs)
    shards = sorted(tmp_path.glob("shard-*-of-02.jsonl"))
    assert [p.name for p in shards] == ["shard-00-of-02.jsonl", "shard-01-of-02.jsonl"]
    # the engine applied the policy's chat template: prompt lengths match transformers' rendering
    rows = [json.loads(line) for p in shards for line in p.read_text().splitlines()]
    for row in rows:
        chat = s.tokenizer.apply_chat_template([{"role": "user", "content": prompts[row["index"]]}],
                                               add_generation_prompt=True, tokenize=False)
        ids = s.tokenizer(chat, add_special_tokens=False)["input_ids"]
        assert row["prompt_tokens"] == len(ids)
    info = s.info
    assert info["shards"] == 2 and info["sequences"] == 3 * len(prompts) and info["tokens_per_second"] > 0
    for shard in shards:  # each engine had more prompt tokens than a step takes
        assert sum(json.loads(line)["prompt_tokens"] for line in shard.read_text().splitlines()) > 512
    assert info["engine_args"]["generation_config"] == "vllm" and info["sampling_params"]["n"] == 3
    assert info["vllm_version"] and info["engine_start_seconds"] > 0
    assert not engine_processes()

    # A shard that did not finish (no marker) is redone, alone, and the engine seed gives the same samples.
    (tmp_path / "shard-01-of-02.jsonl.done").unlink()
    log0 = (tmp_path / "shard-00-of-02.log").read_text()
    again = make(vllm_model_dir, tmp_path, shards=2, engine_args={"max_num_batched_tokens": 512}).generate(
        prompts, params, show_progress=False)
    assert [[c.text for c in cs] for cs in again] == [[c.text for c in cs] for cs in out]
    assert (tmp_path / "shard-00-of-02.log").read_text() == log0  # shard 0's engine did not start again
    assert (tmp_path / "shard-01-of-02.jsonl.done").is_file()

    # Other sampling parameters are another job: nothing is reused (this interpreter fails at once).
    (tmp_path / "shard-00-of-02.jsonl.done").touch()
    other = VLLMSampler(vllm_model_dir, VLLMSection(python="/bin/false"), 2, "bfloat16", tmp_path)
    with pytest.raises(EngineFailed, match="shard 0 exited with status 1"):
        other.generate(prompts, SamplingParams(n=2, temperature=0.5, max_new_tokens=12, seed=7), show_progress=False)
    assert json.loads((tmp_path / "shard-00-of-02.job.json").read_text())["sampling"]["n"] == 2
    assert not (tmp_path / "shard-00-of-02.jsonl.done").exists()


@pytest.mark.slow  # the fast selection checks orphans with the training worker (tests/test_recovery.py)
def test_killed_engine_fails_the_stage_and_leaves_nothing_running(vllm_model_dir, tmp_path):
    s = make(vllm_model_dir, tmp_path)

    def kill_when_started():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            lines = engine_processes()
            # The engine core's process lives from the engine's start to its end, seconds even for this model:
            # killing the worker once it exists lands inside the engine's work on any machine speed.
            if any("EngineCore" in line for line in lines):
                worker = [line.split()[0] for line in lines if "vllm_worker.py" in line]
                os.kill(int(worker[0]), signal.SIGKILL)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    with pytest.raises(EngineFailed, match=r"sampling\.vllm: the vLLM engine of shard 0 exited with status -9"):
        s.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=8), show_progress=False)
    killer.join()
    deadline = time.monotonic() + 10
    while engine_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not engine_processes(), engine_processes()
    assert not (tmp_path / "shard-00-of-01.jsonl.done").exists()


STAGE = """
import sys
from pathlib import Path
from nash.config import VLLMSection
from nash.sampling import SamplingParams
from nash.sampling.vllm import VLLMSampler
model, work, python = sys.argv[1:4]
cfg = VLLMSection(python=python, enforce_eager=True, max_model_len=512, env=dict([sys.argv[4].split("=", 1)]))
VLLMSampler(model, cfg, 1, "bfloat16", Path(work)).generate(["Say hi."] * 64, SamplingParams(n=4, max_new_tokens=64))
"""


@pytest.mark.slow  # two engine starts, 95 s here; the same PDEATHSIG tie is checked fast in tests/test_recovery.py
def test_killed_stage_takes_its_engine_with_it(vllm_model_dir, tmp_path):
    """kill -9 of the process running the stage: no worker and no engine core may live on, and
    running the stage again samples what the killed one left unfinished."""
    stage = subprocess.Popen([sys.executable, "-c", STAGE, vllm_model_dir, str(tmp_path), PYTHON, MARK],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any("EngineCore" in line for line in engine_processes()):
            assert stage.poll() is None and time.monotonic() < deadline, "the engine core never started"
            time.sleep(0.1)
        stage.kill()
        stage.wait()
        deadline = time.monotonic() + 10
        while engine_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not engine_processes(), engine_processes()
    finally:
        stage.kill()
        for line in engine_processes():
            os.kill(int(line.split()[0]), signal.SIGKILL)
    assert not (tmp_path / "shard-00-of-01.jsonl.done").exists()
    cfg = VLLMSection(python=PYTHON, enforce_eager=True, max_model_len=512, env=MARK_ENV)
    out = VLLMSampler(vllm_model_dir, cfg, 1, "bfloat16", tmp_path).generate(
        ["Say hi."] * 64, SamplingParams(n=4, max_new_tokens=64), show_progress=False)
    assert len(out) == 64 and all(len(cs) == 4 for cs in out)
    assert (tmp_path / "shard-00-of-01.jsonl.done").is_file() and not engine_processes()


def test_bad_model_path_names_the_key_and_the_log(tmp_path):
    s = make(str(tmp_path / "no-such-policy"), tmp_path / "work")
    with pytest.raises(EngineFailed) as err:
        s.generate(PROMPTS[:1], SamplingParams(n=1, max_new_tokens=4), show_progress=False)
    msg = str(err.value)
    assert msg.startswith("policy.model: the vLLM engine of shard 0 exited") and "shard-00-of-01.log" in msg
    assert not engine_processes()


def test_missing_interpreter_names_the_key(vllm_model_dir, tmp_path):
    cfg = VLLMSection(python=str(tmp_path / "nowhere" / "python"))
    with pytest.raises(EngineFailed, match=r"sampling\.vllm\.python: .* does not exist"):
        VLLMSampler(vllm_model_dir, cfg, 1, "float32", tmp_path).generate(["Hi."], SamplingParams(), show_progress=False)


@pytest.fixture(scope="module")
def scoring_model_dir(tmp_path_factory):
    """A tiny Llama whose next token is one of the digits 0..5, by a distribution that the last token
    sets: a prefilled reply rendered even slightly differently ("Score: " followed by a newline)
    moves the weighted score by 0.03 or more, "Score:" by 3."""

    def digits_first(model, tok):
        digits = [tok.convert_tokens_to_ids(str(d)) for d in range(6)]
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.normal_(0, 1)
        emb[:, 0] = 8.0  # one direction every hidden state shares...
        head.normal_(0, 0.3)
        head[:, 0] = 0.0
        head[digits, 0] = 3.0  # ...lifts the digits above every other token

    return tiny_llama(tmp_path_factory.mktemp("scoring-policy"), seed=1, adjust=digits_first,
                      max_position_embeddings=1024, tie_word_embeddings=False)


@pytest.mark.slow  # four engine starts: 2.5 to 6 minutes here
def test_self_rewarding_iteration_on_vllm_end_to_end(scoring_model_dir, tiny_prompts, tmp_path, monkeypatch):
    """One iteration with sampling.backend vllm and judge.kind self, LoRA training: the samples, the
    self-judging (a vLLM server for the stage) and the held-out answers of π_1 (the merged policy
    that training wrote) and of π_0 all come from vLLM; the served weighted scores equal the
    transformers backend's on the same candidates; nothing of vLLM lives on."""
    from nash import iteration
    from nash.config import load_config
    from nash.judges import build_judge
    from nash.precision import resolve
    from nash.records import Judgment, Pair, Sample, read_jsonl
    from nash.registry import RunDir

    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, [
        f"policy.model={scoring_model_dir}", "policy.precision=fp32", f"prompts.source={tiny_prompts}",
        "prompts.partition_size=4", "sampling.n=3", "sampling.max_new_tokens=8", "sampling.backend=vllm",
        f"sampling.vllm.python={PYTHON}", "sampling.vllm.max_model_len=1024",
        "judge.kind=self", "pairs.rule=max_min", "pairs.min_chosen_score=0", "pairs.min_margin=1e-6",
        "train.lora={r: 4, alpha: 8, dropout: 0.0}", "train.batch_size=2", "train.max_length=96",
        "eval.num_prompts=3", "eval.max_new_tokens=8", "eval.judge={kind: rules}", "run.name=vllm"])
    cfg.sampling.vllm.env.update(MARK_ENV)
    run = RunDir.create(tmp_path / "runs", cfg)
    iteration.run_iteration(str(run.path))
    it = run.iterations()[0]
    m = it.manifest()
    assert it.complete and not engine_processes(), engine_processes()
    assert m["sampling"]["backend"] == "vllm" and m["stages"]["sample"]["tokens_per_second"] > 0
    # Self-judging went through the stage's vLLM server: every candidate scored, from the served policy.
    judgments = read_jsonl(it.judgments, Judgment)
    assert len(judgments) == 12 and all(j.outcome == "scored" for j in judgments)
    assert "Uvicorn running" in (it.path / "judge_server" / "server.log").read_text() or \
        "Application startup complete" in (it.path / "judge_server" / "server.log").read_text()
    assert read_jsonl(it.pairs, Pair)
    # ...and gave the transformers backend's scores on the same candidates.
    local = build_judge(cfg.judge.model_copy(update={"cache": False}), scoring_model_dir, resolve("fp32"))
    prompts = {p.id: p for p in read_jsonl(it.path / "prompts.jsonl", Prompt)}
    samples = read_jsonl(it.samples, Sample)
    for pid in prompts:
        group = sorted((s for s in samples if s.prompt_id == pid), key=lambda s: s.candidate)
        served = sorted((j for j in judgments if j.prompt_id == pid), key=lambda j: j.candidate)
        assert [j.score for j in local.score(prompts[pid], [s.response for s in group])] == \
            pytest.approx([j.score for j in served], abs=2e-3)
    # π_1 was trained with LoRA and merged; vLLM read that plain policy for the held-out answers.
    assert (it.policy / "model.safetensors").is_file() and not (it.policy / "adapter_config.json").exists()
    jobs = [json.loads(p.read_text()) for p in (it.eval_dir / "sampling").glob("shard-*.job.json")]
    assert [j["model"] for j in jobs] == [str(it.policy)]
    base_jobs = [json.loads(p.read_text()) for p in (run.baseline_dir / "eval" / "sampling").glob("shard-*.job.json")]
    assert [j["model"] for j in base_jobs] == [scoring_model_dir]
    assert len(read_jsonl(it.eval_dir / "samples.jsonl", Sample)) == 3


def test_evaluation_answers_come_from_vllm_and_match_transformers(scoring_model_dir, tmp_path):
    """The evaluation's greedy answers through the vllm backend: the engine reads the policy, the
    answers are kept and reused, and equal transformers' greedy answers on a model whose argmax
    is never a near tie (float32 in both)."""
    from nash import evaluation
    from nash.config import load_config
    from nash.precision import resolve
    from nash.sampling.hf import TransformersSampler

    prompts = [Prompt(id=f"p{i}", text=f"Describe thing {i} briefly.") for i in range(5)]
    cfg = load_config(None, ["sampling.backend=vllm", f"sampling.vllm.python={PYTHON}", "eval.max_new_tokens=10",
                             "sampling.vllm.max_model_len=1024"])
    cfg.sampling.vllm.env.update(MARK_ENV)
    answers = evaluation.answer(scoring_model_dir, prompts, cfg, tmp_path / "eval", "iter_000",
                                precision=resolve("fp32"))
    assert not engine_processes(), engine_processes()
    job = json.loads((tmp_path / "eval" / "sampling" / "shard-00-of-01.job.json").read_text())
    assert job["model"] == scoring_model_dir and job["sampling"]["temperature"] == 0 and job["sampling"]["n"] == 1
    hf = TransformersSampler(scoring_model_dir, dtype="float32").generate(
        [p.text for p in prompts], SamplingParams(n=1, temperature=0.0, max_new_tokens=10), show_progress=False)
    assert [a.response for a in answers] == [c[0].text for c in hf]
    assert all(a.response and a.num_tokens == 10 for a in answers)  # digits all the way: no early stop
    # Kept: asking again reads the file and starts no engine.
    (tmp_path / "eval" / "sampling" / "shard-00-of-01.log").unlink()
    again = evaluation.answer(scoring_model_dir, prompts, cfg, tmp_path / "eval", "iter_000", precision=resolve("fp32"))
    assert [a.response for a in again] == [a.response for a in answers]
    assert not (tmp_path / "eval" / "sampling" / "shard-00-of-01.log").exists()
