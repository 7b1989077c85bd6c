from nash.sampling import SamplingParams, TransformersSampler


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
