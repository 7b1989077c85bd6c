"""The one loader of models and tokenizers, and the one chat formatter.

Sampling, KL and perplexity, training, the local judges and the reward model all read a
policy's text the same way: the user turn through the tokenizer's chat template with the
generation prompt, then the reply. A tokenizer without a pad token pads with EOS.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def check_model(path: str, key: str) -> None:
    """A local model directory has a config, weights and a tokenizer; a hub id's config loads.

    Loads no weights: this is what `nash run` checks before the first stage.
    """
    from nash.errors import UserError

    p = Path(path)
    if p.is_dir():
        missing = [what for what, found in (
            ("config.json", (p / "config.json").is_file()),
            ("weights (*.safetensors or pytorch_model*.bin)", any(any(p.glob(g)) for g in WEIGHTS)),
            ("a tokenizer (tokenizer.json or tokenizer_config.json)", any((p / f).is_file() for f in TOKENIZER_FILES)),
        ) if not found]
        if missing:
            raise UserError(f"{key}: {p} has no {' and no '.join(missing)}")
        return
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path)
    except Exception as e:  # offline and not cached, unknown id, gated repository
        raise UserError(f"{key}: {path!r} is neither a local directory nor a hub id whose config loads "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def load_tokenizer(path: str, padding_side: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, **({"padding_side": padding_side} if padding_side else {}))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "float32", device: str | None = None):
    """A causal LM in `dtype`, in eval mode, on `device` (None: leave it where it loads)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return (model.to(device) if device else model).eval()


def load_reward_model(path: str, dtype: str, device: str):
    """A sequence-classification model (a reward model), in eval mode on `device`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def load_encoder(path: str, dtype: str = "float32"):
    """A bare encoder (a sentence embedder), in eval mode."""
    import torch
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


def chat_messages(prompt: str, response: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def chat_text(tok, prompt: str, response: str | None = None) -> str:
    """The prompt as the policy reads it; with `response`, the whole exchange.

    Without a chat template (a base model) the prompt is the plain text followed by a blank line.
    """
    if not getattr(tok, "chat_template", None):
        return f"{prompt}\n\n" + (response or "")
    if response is None:
        return tok.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=False)
    return tok.apply_chat_template(chat_messages(prompt, response), tokenize=False)
