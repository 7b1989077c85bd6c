import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny randomly initialised Llama built from a config, with SmolLM2's real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from nash.policy import embedded_gguf_path

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    out = tmp_path_factory.mktemp("tiny-policy")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_prompts(tmp_path_factory):
    """Prompts whose constraints a random model meets some of the time, so pairs exist."""
    import json

    rows = [
        {"id": f"p{i}", "prompt": f"Describe thing {i} briefly.", "split": "eval" if i >= 20 else "train",
         "constraints": [{"kind": "max_words", "n": 6}, {"kind": "no_commas"}]}
        for i in range(26)
    ]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def tiny_overrides(tiny_model_dir, tiny_prompts):
    """Config overrides that make a whole iteration take seconds on the tiny model."""
    return [
        f"policy.model={tiny_model_dir}",
        f"prompts.source={tiny_prompts}",
        "prompts.partition_size=6",
        "sampling.n=4",
        "sampling.max_new_tokens=12",
        "eval.num_prompts=5",
        "eval.max_new_tokens=12",
        "train.batch_size=2",
        "train.max_length=96",
        "pairs.min_chosen_score=0.5",
        "pairs.min_margin=0.5",
        "pairs.per_prompt=all",
        "judge.kind=rules",
        "train.epochs=1",
        "eval.gate=null",  # a tiny random policy beats nothing: the gate has tests of its own (test_gate.py)
        "eval.retention.items=24",  # the whole probe and its gate have tests of their own (test_retention.py)
        "eval.retention.max_drop=null",
    ]
