import json

import pytest

from nash import constraints
from nash.prompts import (
    PromptError,
    builtin_prompts,
    eval_split,
    load_prompts,
    partition,
)


def test_builtin_is_deterministic_and_verifiable():
    a, b = builtin_prompts(0), builtin_prompts(0)
    assert [p.model_dump() for p in a] == [p.model_dump() for p in b]
    assert [p.text for p in builtin_prompts(1)] != [p.text for p in a]
    assert len(a) >= 300
    assert len({p.id for p in a}) == len(a)
    for p in a:
        assert 1 <= len(p.constraints) <= 2
        for c in p.constraints:
            constraints.validate(c)
            assert constraints.describe(c) in p.text


def test_eval_topics_never_appear_in_training():
    prompts = builtin_prompts(0)
    train_topics = {p.topic for p in prompts if p.split == "train"}
    eval_topics = {p.topic for p in prompts if p.split == "eval"}
    assert eval_topics and train_topics and not (eval_topics & train_topics)
    assert len(train_topics) + len(eval_topics) >= 50


def test_partitions_are_disjoint_and_exhaust_with_a_clear_error():
    prompts = builtin_prompts(0)
    parts = [partition(prompts, i, 64) for i in (1, 2, 3)]
    ids = [{p.id for p in part} for part in parts]
    assert all(len(s) == 64 for s in ids)
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
    assert all(p.split == "train" for part in parts for p in part)
    assert [p.id for p in partition(prompts, 2, 64)] == [p.id for p in parts[1]]
    with pytest.raises(PromptError, match="prompts.partition_size"):
        partition(prompts, 100, 64)


def test_jsonl_source_and_its_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    rows = [{"prompt": f"say {i}", "constraints": [{"kind": "lowercase"}]} for i in range(10)]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prompts = load_prompts(str(good), seed=0)
    assert len(prompts) == 10 and sum(p.split == "eval" for p in prompts) == 2
    assert len(eval_split(prompts, 0)) == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    with pytest.raises(PromptError, match=r"bad.jsonl:2: missing field 'prompt'"):
        load_prompts(str(bad))
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(PromptError, match=r"bad.jsonl:2: invalid JSON"):
        load_prompts(str(bad))
    bad.write_text('{"prompt": "ok", "constraints": [{"kind": "shout"}]}\n')
    with pytest.raises(PromptError, match="bad.jsonl:1: unknown constraint kind"):
        load_prompts(str(bad))
    bad.write_text('{"prompt": "ok", "split": "test"}\n')
    with pytest.raises(PromptError, match="bad.jsonl:1: split: Input should be 'train' or 'eval'"):
        load_prompts(str(bad))
    with pytest.raises(PromptError, match="file not found"):
        load_prompts(str(tmp_path / "missing.jsonl"))
