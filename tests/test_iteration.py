import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from nash import iteration
from nash.config import ConfigError, load_config
from nash.records import Judgment, Pair, Prompt, Sample, read_jsonl
from nash.registry import RunDir, sha256_file


def test_two_iterations_write_the_contract_and_chain_policies(tmp_path, tiny_overrides, capsys, monkeypatch):
    cfg = load_config(None, tiny_overrides + ["run.name=t", "pairs.replay=[0.3]", "train.learning_rate=1e-3"])
    run = RunDir.create(tmp_path, cfg)
    first = iteration.run_iteration(str(run.path))
    second = iteration.run_iteration(str(run.path))
    assert json.loads((run.path / "run.json").read_text())["config"]["run"]["name"] == "t"

    it1, it2 = run.iterations()
    for it in (it1, it2):
        m = it.manifest()
        assert m["status"] == "complete" and m["config_hash"] == cfg.hash()
        for name in ("samples.jsonl", "judgments.jsonl", "pairs.jsonl", "metrics.json",
                     "policy/config.json", "policy/model.safetensors", "policy/tokenizer.json"):
            assert (it.path / name).is_file(), name
            assert m["files"][name] == sha256_file(it.path / name)
        samples = read_jsonl(it.samples, Sample)
        assert len(samples) == 6 * 4 and len(read_jsonl(it.judgments, Judgment)) == 24
        assert m["judge_outcomes"]["scored"] == 24 and m["judge_outcomes"]["failed"] == 0
        assert m["judge_stop"] == {"unjudged_prompts": 0, "budget_stop": None}
        pairs = read_jsonl(it.pairs, Pair)
        assert m["pairs"]["training_pairs"] == len(pairs) > 0
        assert m["pairs"]["pairs"] == sum(p.iteration == it.index for p in pairs) > 0
        # Training ran in its own process, and π_{t+1} moved away from π_t.
        assert m["train"]["worker_pid"] != os.getpid() and m["train"]["kl_from_parent"] > 0
        assert (it.path / "train.log").is_file()
        assert set(m["timings"]) == set(iteration.STAGES) and "transformers" in m["packages"]
        metrics = json.loads(it.metrics.read_text())
        head, wr = metrics["headline"], metrics["win_rate"]
        assert 0.0 <= head["pass_rate"] <= 1.0 and 0.0 <= head["win_rate"] <= 1.0
        assert wr["n"] + wr["failed"] + wr["unjudged"] == 5 and wr["against"] == "reference"
        # The tiny random model's greedy answers may decode to empty text, leaving KL no tokens to read
        # (tests/test_drift.py checks the KL itself); perplexity reads the shipped general text.
        if metrics["drift"]["kl_tokens"] == 0:
            assert head["kl_from_initial"] is None
        else:
            assert head["kl_from_initial"] >= 0
        assert head["perplexity"] > 1 and metrics["drift"]["initial_perplexity"] > 1 and head["promoted"] is True
        assert [r["iteration"] for r in metrics["table"]] == list(range(1, it.index + 1))
        assert metrics["train"]["steps"] > 0
    assert first.endswith("iter_001/manifest.json") and second.endswith("iter_002/manifest.json")
    spend1, spend2 = it1.manifest()["judge_spend"], it2.manifest()["judge_spend"]
    assert spend1["run"] == spend1["iteration"]
    assert spend2["run"]["tokens_in"] == spend1["iteration"]["tokens_in"] + spend2["iteration"]["tokens_in"]
    # The plot starts at π_0 (iteration 0: its own reference, win rate 0.5) and shows every iteration.
    from nash import report

    base = report.baseline_head(run)
    assert (base["iteration"], base["win_rate"], base["mean_length"]) == (0, 0.5, 12.0)
    assert run.plot_path.read_bytes()[:4] == b"\x89PNG"
    # Replay: iteration 2 trains on 30% pairs drawn from iteration 1's own pairs.
    replayed = [p for p in read_jsonl(it2.pairs, Pair) if p.iteration == 1]
    fresh1 = {(p.prompt_id, p.chosen_candidate, p.rejected_candidate) for p in read_jsonl(it1.pairs, Pair)}
    want = round(0.3 * it2.manifest()["pairs"]["pairs"] / 0.7)
    assert it2.manifest()["pairs"]["replayed"] == {"iter_001": {"requested": want, "drawn": len(replayed)}}
    assert len(replayed) == min(want, len(fresh1)) > 0
    assert {(p.prompt_id, p.chosen_candidate, p.rejected_candidate) for p in replayed} <= fresh1
    # π_2 is trained from π_1 on fresh prompts.
    assert it2.manifest()["parent_policy"] == {"iteration": 1, "path": str(it1.policy), "rule": "promoted"}
    ids = [{p.id for p in read_jsonl(it.path / "prompts.jsonl", Prompt)} for it in (it1, it2)]
    assert ids[0] and not ids[0] & ids[1]
    assert it1.manifest()["prompt_partition"]["sha256"] == sha256_file(it1.path / "prompts.jsonl")
    assert {s.policy for s in read_jsonl(it2.samples, Sample)} == {"iter_001"}
    # π_0's held-out answers are generated once and shared by every iteration.
    assert (run.baseline_dir / "eval" / "samples.jsonl").is_file()
    # A model card beside each policy, valid Hub metadata whose figures are metrics.json's, hashed with the weights.
    from huggingface_hub import ModelCard

    for it in (it1, it2):
        card = ModelCard.load(it.policy / "README.md")
        meta, head = card.data.to_dict(), json.loads(it.metrics.read_text())["headline"]
        assert meta["library_name"] == "transformers" and {"nash", "dpo", "pairs-dno"} <= set(meta["tags"])
        assert "base_model" not in meta  # π_0 is a local directory here: no hub id to name
        figures = meta["nash"]["metrics"]
        assert figures and all(figures[k] == head[k] for k in figures)
        assert meta["nash"]["iteration"] == it.index and meta["nash"]["config_hash"] == cfg.hash()
        assert f"| real pass rate | {head['substantive_pass_rate']:.3f} |" in card.text
        assert it.manifest()["files"]["policy/README.md"] == sha256_file(it.policy / "README.md")
    assert "π_0 → iter_001 → iter_002" in ModelCard.load(it2.policy / "README.md").text
    # `nash push --dry-run`: the promoted policy, its card, a private repo and a branch per iteration; no network.
    from nash.flows.cli import main

    capsys.readouterr()
    assert main(["push", str(run.path), "--repo-id", "me/policy", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload iter_002 of t to me/policy@iter_002 (private)" in out
    assert "README.md" in out and "model.safetensors" in out
    # The upload itself, through huggingface_hub, to a loopback stand-in for the Hub's API.
    from tests.hub_server import HubServer

    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_do_not_leak")
        assert main(["push", str(run.path), "--repo-id", "me/policy", "--iteration", "1"]) == 0
    out = capsys.readouterr().out
    assert not hub.unknown, hub.unknown
    create = hub.repos["me/policy"]
    assert create.get("private") is True or create.get("visibility") == "private"
    assert hub.branches == [("me/policy", "iter_001")]
    (commit,) = hub.commits
    assert commit["revision"] == "iter_001" and commit["summary"] == "nash: t iter_001"
    assert {name: data for name, data in commit["files"].items()} == {
        p.name: p.read_bytes() for p in it1.policy.iterdir() if p.is_file()}
    assert "Bearer hf_test_do_not_leak" in hub.auth and "hf_test_do_not_leak" not in out


def test_failed_stage_is_recorded_and_resumed(tmp_path, tiny_overrides, monkeypatch):
    cfg = load_config(None, tiny_overrides + ["run.name=r"])
    run = RunDir.create(tmp_path, cfg)
    calls = []
    real_train = iteration.train_in_subprocess

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(iteration, "train_in_subprocess", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        iteration.run_iteration(str(run.path))
    it = run.iterations()[0]
    m = it.manifest()
    assert m["status"] == "failed" and "train: RuntimeError: out of memory" in m["error"]
    assert m["stages"]["sample"]["status"] == "complete" and not it.complete
    assert run.last_complete() is None
    samples_before = it.samples.read_bytes()

    monkeypatch.setattr(iteration, "train_in_subprocess", real_train)
    iteration.run_iteration(str(run.path))
    assert [i.index for i in run.iterations()] == [1] and it.complete
    assert it.samples.read_bytes() == samples_before  # paid-for samples were reused, not redrawn


def test_reopening_a_run_with_another_config_names_the_keys(tmp_path):
    RunDir.create(tmp_path, load_config(None, ["run.name=x"]))
    RunDir.create(tmp_path, load_config(None, ["run.name=x", "run.iterations=9"]))  # same run, more rounds
    with pytest.raises(ConfigError, match=r"different config \(sampling.n, train.beta\)"):
        RunDir.create(tmp_path, load_config(None, ["run.name=x", "sampling.n=8", "train.beta=0.3"]))


def test_no_pairs_is_a_clear_failure(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["run.name=np", "pairs.min_chosen_score=2.0"])
    run = RunDir.create(tmp_path, cfg)
    with pytest.raises(RuntimeError, match="no pairs kept .*pairs.min_margin"):
        iteration.run_iteration(str(run.path))
    assert run.iterations()[0].status == "failed"


def test_self_judging_iteration_with_max_min_pairs(tmp_path, tiny_overrides, monkeypatch):
    monkeypatch.setenv("NASH_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, tiny_overrides + ["run.name=self", "judge.kind=self", "pairs.rule=max_min"])
    run = RunDir.create(tmp_path, cfg)
    iteration.run_iteration(str(run.path))
    it = run.iterations()[0]
    m = it.manifest()
    assert it.complete and m["judge_outcomes"]["scored"] == 24 and m["judge_outcomes"]["requests"] == 24
    assert {j.judge for j in read_jsonl(it.judgments, Judgment)} == {"self"}
    pairs = read_jsonl(it.pairs, Pair)
    assert pairs and all(p.chosen_score > p.rejected_score for p in pairs)
    # Evaluation: π_0 annotates pairwise, both orders, reading P(a) against P(b).
    metrics = json.loads(it.metrics.read_text())
    assert metrics["headline"]["pass_rate"] is None and metrics["win_rate"]["n"] == 5
    annotations = read_jsonl(it.eval_dir / "vs_reference" / "judgments.jsonl", Judgment)
    p_a = [j.details["p_a"] for j in annotations if j.candidate == 0]
    assert len(p_a) == 5 and all(0 < p < 1 for p in p_a)
    assert metrics["win_rate"]["win_rate"] == pytest.approx(sum(p_a) / 5)
    assert metrics["eval_judge_usage"]["requests"] == 10  # 5 prompts, both orders


def test_gold_answers_join_the_candidates(tmp_path, tiny_overrides):
    rows = [{"id": f"g{i}", "prompt": f"Describe thing {i}.", "reference": f"thing {i} is small",
             "split": "eval" if i >= 6 else "train", "constraints": [{"kind": "lowercase"}]} for i in range(8)]
    src = tmp_path / "gold.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, tiny_overrides + ["run.name=gold", f"prompts.source={src}", "sampling.include_reference=true",
                                              "eval.num_prompts=2"])
    run = RunDir.create(tmp_path, cfg)
    path = iteration.prepare(str(run.path))
    iteration.sample(path)
    samples = read_jsonl(run.iterations()[0].samples, Sample)
    gold = [s for s in samples if s.policy == "reference"]
    assert len(samples) == 6 * 5 and len(gold) == 6
    assert all(s.candidate == 4 and s.response == f"thing {s.prompt_id[1:]} is small" for s in gold)


def _up_to_train(tmp_path, overrides):
    run = RunDir.create(tmp_path, load_config(None, overrides))
    path = iteration.prepare(str(run.path))
    for stage in (iteration.sample, iteration.judge, iteration.select):
        stage(path)
    return run, run.iterations()[0]


def test_training_subprocess_failure_names_the_log_and_keeps_pairs(tmp_path, tiny_overrides):
    run, it = _up_to_train(tmp_path, tiny_overrides + ["run.name=f"])
    pairs_before = it.pairs.read_bytes()
    it.update_manifest(parent_policy={"iteration": 0, "path": str(tmp_path / "no-such-policy")})
    with pytest.raises(RuntimeError, match=r"training subprocess exited with status 1; see .*train\.log") as e:
        iteration.train(str(it.path))
    assert "no-such-policy" in str(e.value)  # the log's last lines travel with the error
    assert "no-such-policy" in (it.path / "train.log").read_text()
    assert it.manifest()["stages"]["train"]["status"] == "failed" and it.pairs.read_bytes() == pairs_before


def test_accelerate_ddp_two_processes_trains_a_policy_that_loads_and_moved(tmp_path, tiny_overrides):
    # The shipped DDP config under `accelerate launch --num_processes 2`: on this CPU, gloo.
    run, it = _up_to_train(tmp_path, tiny_overrides + ["run.name=acc", "train.launcher=accelerate",
                                                       "train.num_processes=2", "train.accelerate_config=ddp"])
    iteration.train(str(it.path))
    log = (it.path / "train.log").read_text()
    assert "accelerate.commands.launch --num_processes 2 --config_file" in log and "ddp.yaml" in log
    metrics = it.manifest()["train"]
    assert metrics["num_processes"] == 2 and metrics["distributed_type"] == "MULTI_CPU"
    assert metrics["steps"] > 0
    parent = it.manifest()["parent_policy"]["path"]
    before = AutoModelForCausalLM.from_pretrained(parent).state_dict()
    after = AutoModelForCausalLM.from_pretrained(it.policy).state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not (it.path / "policy.partial").exists()




@pytest.mark.slow  # the DDP test above keeps multi-process training in the fast selection
def test_two_machine_training_job_through_a_launch_prefix(tmp_path, tiny_overrides, monkeypatch):
    # Two "machines" on loopback: the prefix starts the launcher twice, as srun would on two nodes,
    # and each launcher reads its own rank from its environment.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NASH_NUM_MACHINES", "2")
    monkeypatch.setenv("NASH_MAIN_PROCESS_IP", "127.0.0.1")
    monkeypatch.setenv("NASH_MAIN_PROCESS_PORT", str(port))
    prefix = '[bash, -c, "NASH_MACHINE_RANK=1 \\"$@\\" & NASH_MACHINE_RANK=0 \\"$@\\"; r=$?; wait $! && exit $r", x]'
    run, it = _up_to_train(tmp_path, tiny_overrides + ["run.name=nodes", "train.launcher=accelerate",
                                                       "train.num_processes=2", "train.accelerate_config=ddp",
                                                       f"train.launch_prefix={prefix}"])
    iteration.train(str(it.path))
    log = (it.path / "train.log").read_text()
    assert "--num_machines 2 --machine_rank 0" in log and "--num_machines 2 --machine_rank 1" in log
    metrics = it.manifest()["train"]
    assert metrics["num_processes"] == 2 and metrics["steps"] > 0
    assert (it.policy / "model.safetensors").is_file()


def test_multi_node_flags_come_from_each_machines_environment():
    from nash.errors import UserError
    from nash.training import multi_node_args

    assert multi_node_args({}) == [] and multi_node_args({"SLURM_NNODES": "4"}) == []  # not inside srun
    slurm = {"SLURM_NODEID": "3", "SLURM_NNODES": "4", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.1"}
    assert multi_node_args(slurm) == ["--num_machines", "4", "--machine_rank", "3", "--main_process_ip",
                                      "10.0.0.1", "--main_process_port", "29500"]
    assert multi_node_args({**slurm, "NASH_MAIN_PROCESS_IP": "head", "NASH_MAIN_PROCESS_PORT": "7000"})[-3:] == [
        "head", "--main_process_port", "7000"]
    with pytest.raises(UserError, match="NASH_MACHINE_RANK and NASH_MAIN_PROCESS_IP"):
        multi_node_args({"NASH_NUM_MACHINES": "2"})
