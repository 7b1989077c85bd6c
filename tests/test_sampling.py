from nash.sampling import SamplingParams
from nash.sampling.hf import TransformersSampler


def test_n_completions_per_prompt_seeded(tiny_model_dir):
    sampler = TransformersSampler(tiny_model_dir, batch_size=3)
    prompts = ["Say hi.", "Write a much longer request about the weather in spring.", "Count."]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=3)
    seen = []
    out = sampler.generate(prompts, params, progress=lambda d, t: seen.append((d, t)))
    assert [len(c) for c in out] == [2, 2, 2]
    assert all(1 <= c.num_tokens <= 8 for cs in out for c in cs)
    assert seen[-1] == (6, 6)
    again = sampler.generate(prompts, params)
    assert [[c.text for c in cs] for cs in again] == [[c.text for c in cs] for cs in out]
    other = sampler.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=4))
    assert [[c.text for c in cs] for cs in other] != [[c.text for c in cs] for cs in out]


def test_greedy_ignores_seed(tiny_model_dir):
    sampler = TransformersSampler(tiny_model_dir, batch_size=4)
    a = sampler.generate(["Hello there."], SamplingParams(n=1, temperature=0.0, max_new_tokens=6, seed=1))
    b = sampler.generate(["Hello there."], SamplingParams(n=1, temperature=0.0, max_new_tokens=6, seed=2))
    assert a[0][0].text == b[0][0].text


def test_chat_template_is_applied(tiny_model_dir):
    sampler = TransformersSampler(tiny_model_dir)
    text = sampler.chat_text("Say hi.")
    assert "<|im_start|>user\nSay hi.<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_inverse_cdf_draws_follow_the_warped_distribution():
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from nash.sampling.hf import InverseCDFSampler

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 40_000
    scores = logits.repeat(rows, 1)
    for temperature, top_p in [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)]:
        draw = InverseCDFSampler(temperature, top_p, torch.Generator().manual_seed(0))
        out = draw(None, scores.clone())
        assert torch.isfinite(out).sum(dim=1).eq(1).all()  # exactly one token left per row
        counts = torch.bincount(out.argmax(dim=1), minlength=len(logits)).double()
        expected = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits[None].clone()))
        p = torch.softmax(expected[0].double(), dim=0)
        assert counts[p == 0].sum() == 0, "a token outside the nucleus was drawn"
        sigma = (rows * p * (1 - p)).sqrt()
        assert ((counts - rows * p).abs() <= 5 * sigma + 1).all(), (temperature, top_p, counts / rows, p)


def test_inverse_cdf_draws_are_seeded():
    import torch

    from nash.sampling.hf import InverseCDFSampler

    scores = torch.randn(8, 50)
    a = InverseCDFSampler(1.0, 1.0, torch.Generator().manual_seed(1))(None, scores.clone()).argmax(1)
    b = InverseCDFSampler(1.0, 1.0, torch.Generator().manual_seed(1))(None, scores.clone()).argmax(1)
    c = InverseCDFSampler(1.0, 1.0, torch.Generator().manual_seed(2))(None, scores.clone()).argmax(1)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
