"""Evaluation: win rate against reference outputs (plain and length-controlled), pass rates, drift.

Each policy answers every evaluation prompt once, greedily, so two policies are compared on
the same prompts without sampling noise. Each answer is annotated against the reference
output of its prompt by a judge in pairwise mode: LM judges are asked in both orders (a
verdict counts only when both orders agree, otherwise it is a tie; a local judge gives a
probability instead), other judges score both outputs. Preferences follow AlpacaEval:
1 = reference wins, 2 = policy wins, 1.5 = tie, fractional when weighted.

The win rate is the mean preference for the policy (ties half) with its standard error
over the n annotated prompts; failed or unjudged prompts are counted, never dropped
silently. The length-controlled win rate is AlpacaEval 2.0's GLM, fitted with the
`alpaca_eval` package's own design-matrix and logistic-regression code.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections import defaultdict
from pathlib import Path

from nash import gate, report
from nash.drift import load_texts, perplexity, token_kl
from nash.errors import UserError
from nash.judges import build_alpaca_eval_judge, build_judge, close_judge
from nash.judges.base import Judge
from nash.judging import judge_samples, outcome_counts
from nash.policy import resolve_policy
from nash.precision import for_config
from nash.records import USAGE, Judgment, Prompt, Sample, read_jsonl, read_lines, write_json, write_jsonl
from nash.registry import IterationDir, RunDir
from nash.sampling import Progress, SamplingParams, build_sampler

log = logging.getLogger("nash")

MODEL, REFERENCE = 0, 1  # candidate indices in an annotation
# The gold answers of builtin:gold's eval split, in the AlpacaEval layout.
GOLD_REFERENCE = Path(__file__).parent / "data" / "gold_reference.jsonl"


# -- reference sets -------------------------------------------------------------------------


class ReferenceSetError(UserError, ValueError):
    """A reference set (eval.reference) that cannot be loaded."""


# AlpacaEval 2.0's evaluation set: 805 instructions with GPT-4-Turbo's (gpt-4-1106-preview) outputs.
ALPACA_EVAL_REPO = "tatsu-lab/alpaca_eval"
ALPACA_EVAL_FILE = "alpaca_eval_gpt4_baseline.json"


def alpaca_eval_set() -> Path:
    """The hub file of AlpacaEval 2.0's set, from the Hugging Face cache or the hub."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ALPACA_EVAL_REPO, ALPACA_EVAL_FILE, repo_type="dataset"))
    except Exception as e:  # offline and not cached, or the hub refused
        raise ReferenceSetError(
            f"eval.reference: alpaca_eval: cannot get {ALPACA_EVAL_FILE} of the dataset {ALPACA_EVAL_REPO} "
            f"({type(e).__name__}); where a hub is reachable run `huggingface-cli download {ALPACA_EVAL_REPO} "
            f"{ALPACA_EVAL_FILE} --repo-type dataset` once, or set eval.reference to a local copy of that file "
            "(or of results/gpt4_1106_preview/model_outputs.json in the alpaca_eval repository)") from None


def load_reference_set(source: str, num_prompts: int) -> list[Prompt]:
    """An AlpacaEval-layout set (instruction, output, generator) as prompts with reference outputs."""
    if source == "alpaca_eval":
        source = str(alpaca_eval_set())
    if source.startswith("hf:"):
        import datasets

        name, _, split = source[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or "eval")
        except Exception as e:  # offline, unknown id, bad split
            raise ReferenceSetError(f"eval.reference: cannot load dataset {name!r} (split {split or 'eval'!r}): {e}") from None
        rows, where = list(ds), source
    else:
        path = GOLD_REFERENCE if source == "builtin:gold" else Path(source).expanduser()
        if not path.is_file():
            raise ReferenceSetError(f"eval.reference: file not found: {source}")
        rows, where = [], str(path)
        if path.suffix == ".json":  # AlpacaEval's own files: one JSON list
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise ReferenceSetError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}) (eval.reference)") from None
            except json.JSONDecodeError as e:
                raise ReferenceSetError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(rows, list):
                raise ReferenceSetError(f"{path}: expected a JSON list of objects (AlpacaEval layout)")
        else:
            for line_at, line in read_lines(path, "eval.reference"):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ReferenceSetError(f"{line_at}: invalid JSON: {e.msg}") from None
    prompts = []
    for i, row in enumerate(rows[: num_prompts or None]):
        if not isinstance(row, dict):
            raise ReferenceSetError(f"{where}: row {i + 1}: expected an object with instruction, output, generator")
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        if missing:
            raise ReferenceSetError(f"{where}: row {i + 1}: missing {', '.join(missing)} (AlpacaEval layout: "
                                 "instruction, output, generator)")
        prompts.append(Prompt(id=f"ref-{i:04d}", text=row["instruction"], split="eval", reference=row["output"],
                              generator=str(row.get("generator") or "reference")))
    if not prompts:
        raise ReferenceSetError(f"eval.reference: {where} has no rows")
    return prompts


# -- answers and annotation -----------------------------------------------------------------


def answer(policy_path: str, prompts: list[Prompt], cfg, out_dir: Path, label: str,
           progress: Progress | None = None, precision=None) -> list[Sample]:
    """Greedy answers of one policy to `prompts`, kept in `out_dir/samples.jsonl` and reused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "samples.jsonl"
    if path.is_file():
        return read_jsonl(path, Sample)
    precision = precision or for_config(cfg)
    sampler = build_sampler(cfg.sampling, policy_path, precision.inference_dtype, out_dir / "sampling")
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.run.seed)
    completions = sampler.generate([p.text for p in prompts], params, progress)
    samples = [Sample(prompt_id=p.id, candidate=0, prompt=p.text, response=c[0].text, num_tokens=c[0].num_tokens,
                      policy=label) for p, c in zip(prompts, completions)]
    write_jsonl(path, samples)
    return samples


class PairwiseAnnotator:
    """Wraps any judge so that `score(prompt, [policy_output, reference_output])` annotates the pair.

    Candidate 0 gets the policy's preference in [0, 1] as its score, candidate 1 the
    complement; a failed annotation fails both. The judge's usage is booked on candidate 0.
    """

    def __init__(self, judge: Judge):
        self.judge = judge
        self.name = f"pairwise:{judge.name}"
        self.concurrency = getattr(judge, "concurrency", 1)

    def score(self, prompt: Prompt, candidates: list[str]) -> list[Judgment]:
        model, ref = candidates
        if hasattr(self.judge, "compare"):
            j = self.judge.compare(prompt, model, ref)
            p = j.details.get("p_a")
            if p is None and j.outcome != "failed":
                p = 0.5 if j.outcome == "tie" else float(j.winner == 0)
            usage = {k: getattr(j, k) for k in USAGE}
            details, raw, error = j.details, j.raw, j.error
        else:
            js = self.judge.score(prompt, [model, ref])
            usage = {k: sum(getattr(x, k) for x in js) for k in USAGE}
            ok = all(x.outcome == "scored" for x in js)
            p = (0.5 if js[0].score == js[1].score else float(js[0].score > js[1].score)) if ok else None
            details = {"scores": [x.score for x in js], "model": js[0].details, "reference": js[1].details}
            raw, error = None, next((x.error for x in js if x.outcome == "failed"), None)
        out = []
        for k in (MODEL, REFERENCE):
            fields = dict(usage) if k == MODEL else dict.fromkeys(USAGE, 0)
            if p is None:
                out.append(Judgment(prompt_id=prompt.id, candidate=k, judge=self.name, outcome="failed",
                                    details=details, raw=raw, error=error or "annotation failed", **fields))
            else:
                out.append(Judgment(prompt_id=prompt.id, candidate=k, judge=self.name, outcome="scored",
                                    score=p if k == MODEL else 1.0 - p, details=details, raw=raw, **fields))
        return out


def annotate(judge: Judge, prompts: list[Prompt], model: list[Sample], reference: dict[str, str],
             out_path: Path, progress: Progress | None = None) -> tuple[list[Judgment], dict]:
    """Annotate each policy answer against its prompt's reference output; append-only, resumable."""
    pairs = []
    for s in model:
        if s.prompt_id in reference:
            pairs += [s.model_copy(update={"candidate": MODEL}),
                      Sample(prompt_id=s.prompt_id, candidate=REFERENCE, prompt=s.prompt,
                             response=reference[s.prompt_id], num_tokens=0, policy="reference")]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return judge_samples(PairwiseAnnotator(judge), {p.id: p for p in prompts}, pairs, out_path, progress)


def preferences(annotations: list[Judgment]) -> dict[str, float | None]:
    """AlpacaEval preference per prompt (1: reference wins, 2: policy wins), None when failed."""
    return {j.prompt_id: (1.0 + j.score if j.outcome == "scored" else None)
            for j in annotations if j.candidate == MODEL}


# -- metrics ----------------------------------------------------------------------------------


def win_rate(prefs: list[float | None], expected: int | None = None) -> dict:
    """Win rate of the policy (ties half), its standard error (ddof 1) and counts, in [0, 1]."""
    got = [p - 1.0 for p in prefs if p is not None]
    n = len(got)
    mean = sum(got) / n if n else None
    se = math.sqrt(sum((x - mean) ** 2 for x in got) / (n - 1) / n) if n > 1 else None
    return {
        "win_rate": mean,
        "standard_error": se,
        "n": n,
        "wins": sum(x > 0.5 for x in got),
        "ties": sum(x == 0.5 for x in got),
        "losses": sum(x < 0.5 for x in got),
        "failed": len(prefs) - n,
        "unjudged": (expected - len(prefs)) if expected is not None else 0,
    }


def length_controlled(prefs: list[float | None], model_outputs: list[str], ref_outputs: list[str],
                      glm: str = "length_controlled_minimal", instruction_index: list[int] | None = None) -> dict:
    """AlpacaEval 2.0's length-controlled win rate on these annotations, in [0, 1].

    A preference may be None (an annotation that failed): as in the package, its row counts in
    the length standardisation and in the prediction, not in the fit.
    `length_controlled_minimal` (intercept plus tanh of the standardised length difference) is
    fitted here with the package's design-matrix and cross-validated logistic-regression code,
    so it runs offline on any set. `length_controlled_v1` adds AlpacaEval's instruction
    difficulty and regularisation towards its gamed baselines; it calls the package's
    `get_length_controlled_winrate` itself and needs the public AlpacaEval set and a hub.
    """
    # alpaca_eval imports pkg_resources and calls scikit-learn in ways both now warn about at
    # every call; the numbers are unaffected (scikit-learn is pinned below the version that
    # drops them).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))
        return _length_controlled(prefs, model_outputs, ref_outputs, glm, instruction_index)


def _length_controlled(prefs, model_outputs, ref_outputs, glm, instruction_index) -> dict:
    import pandas as pd

    n = sum(p is not None for p in prefs)
    if n < 5:
        return {"lc_win_rate": None, "lc_standard_error": None, "lc_note": f"needs at least 5 annotations, got {n}"}
    prefs = [math.nan if p is None else p for p in prefs]
    if glm == "length_controlled_v1":
        from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate

        df = alpaca_eval_frame(prefs, model_outputs, ref_outputs, instruction_index)
        out = get_length_controlled_winrate(df, glm_name=glm, save_weights_dir=None, is_warn_extreme_changes=False)
        return {"lc_win_rate": out["length_controlled_winrate"] / 100,
                "lc_standard_error": out["lc_standard_error"] / 100, "lc_glm": glm}
    from alpaca_eval.metrics.glm_winrate import GLM_INFO, fit_LogisticRegressionCV, make_dmatrix_for_model

    # The package's featurisation (`_get_featurized_data`) without its hub file, which only
    # supplies the instruction difficulty that this formula leaves out.
    info = GLM_INFO[glm]
    delta = pd.Series([len(r) - len(m) for m, r in zip(model_outputs, ref_outputs)], dtype=float)
    if delta.std() == 0 or math.isnan(delta.std()):
        std = delta * 0.0  # every pair the same length difference: nothing to control for
    else:
        std = delta / delta.std()
    df = pd.DataFrame({"preference": [p - 1.0 for p in prefs], "std_delta_len": std,
                       "instruction_difficulty": 0.0, "not_gamed_baseline": True})
    test = df[["instruction_difficulty", "not_gamed_baseline"]].copy()
    test["std_delta_len"] = 0
    train, x_test = make_dmatrix_for_model(df, test, formula=info["formula"])
    train = train[train["preference"].notna()]
    model = fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True, **info["kwargs"])
    predicted = pd.Series(model.predict_proba(x_test)[:, 1])
    return {"lc_win_rate": float(predicted.mean()), "lc_standard_error": float(predicted.sem()), "lc_glm": glm}


def package_win_rate(prefs: list[float | None], expected: int | None = None) -> dict:
    """`win_rate` computed by the `alpaca_eval` package's own `get_winrate`, in nash's keys and units."""
    import pandas as pd
    from alpaca_eval.metrics import get_winrate

    series = pd.Series([math.nan if p is None else p for p in prefs], dtype=float)
    m = get_winrate(pd.DataFrame({"preference": series}))
    n = int(m["n_total"])
    return {
        "win_rate": m["win_rate"] / 100 if n else None,
        "standard_error": m["standard_error"] / 100 if n > 1 else None,
        "discrete_win_rate": m["discrete_win_rate"] / 100 if n else None,
        "n": n, "wins": int(m["n_wins"]), "ties": int(m["n_draws"]), "losses": int(m["n_wins_base"]),
        "failed": len(prefs) - n,
        "unjudged": (expected - len(prefs)) if expected is not None else 0,
    }


def alpaca_eval_frame(prefs, model_outputs, ref_outputs, instruction_index=None, generator="policy",
                      reference_generator="reference", annotator="nash"):
    """Annotations in the layout the `alpaca_eval` package reads (output_1: the reference)."""
    import pandas as pd

    return pd.DataFrame({
        "index": instruction_index or list(range(len(prefs))), "preference": prefs,
        "output_1": ref_outputs, "output_2": model_outputs, "generator_1": reference_generator,
        "generator_2": generator, "annotator": annotator,
    })


def _passed(details: dict) -> dict | None:
    """The rules judge's per-constraint verdicts, also from inside a composite judge's details."""
    if "passed" in details:
        return details["passed"]
    for c in details.get("components", []):
        found = _passed(c.get("details") or {})
        if found is not None:
            return found
    return None


def pass_rates(annotations: list[Judgment], side: str = "model") -> dict:
    """Constraint pass rates of one side's outputs, where the judge checks constraints (rules)."""
    passed = [_passed(j.details.get(side, {})) for j in annotations if j.candidate == MODEL]
    passed = [p for p in passed if p]
    per: dict[str, list[bool]] = defaultdict(list)
    for p in passed:
        for name, ok in p.items():
            per[name.split("(")[0]].append(ok)
    checks = [ok for oks in per.values() for ok in oks]
    return {
        "pass_rate": sum(all(p.values()) for p in passed) / len(passed) if passed else None,
        "constraint_pass_rate": sum(checks) / len(checks) if checks else None,
        "per_constraint": {k: round(sum(v) / len(v), 4) for k, v in sorted(per.items())},
    }


def compare(judge: Judge, prompts: list[Prompt], model: list[Sample], reference: dict[str, str],
            out_path: Path, glm: str, progress: Progress | None = None) -> dict:
    """Annotate and summarise one comparison: win rate, LC win rate, lengths, pass rates, usage."""
    annotations, info = annotate(judge, prompts, model, reference, out_path, progress)
    prefs = preferences(annotations)
    order = [s for s in model if s.prompt_id in reference]
    if getattr(judge, "protocol", None) == "alpaca_eval":
        # The package's numbers: its win rate, and a failed annotation is a row without a preference.
        result = package_win_rate([prefs[s.prompt_id] for s in order if s.prompt_id in prefs], len(order))
        ok = [s for s in order if s.prompt_id in prefs]
        result["alpaca_eval"] = judge.describe()
    else:
        result = win_rate([prefs[s.prompt_id] for s in order if s.prompt_id in prefs], expected=len(order))
        ok = [s for s in order if prefs.get(s.prompt_id) is not None]
    result.update(length_controlled([prefs.get(s.prompt_id) for s in ok], [s.response for s in ok],
                                    [reference[s.prompt_id] for s in ok], glm,
                                    [int(s.prompt_id[4:]) if s.prompt_id.startswith("ref-") else i
                                     for i, s in enumerate(ok)]))
    result["mean_tokens"] = sum(s.num_tokens for s in order) / len(order) if order else None
    result["mean_chars"] = sum(len(s.response) for s in order) / len(order) if order else None
    result["reference_mean_chars"] = sum(len(reference[s.prompt_id]) for s in order) / len(order) if order else None
    result.update(pass_rates(annotations))
    result["reference_pass_rate"] = pass_rates(annotations, "reference")["pass_rate"]
    result["budget_stop"] = info["budget_stop"]
    result["usage"] = outcome_counts(annotations)
    return result


# -- degeneration -----------------------------------------------------------------------------


def answer_report(prompts: list[Prompt], answers: list[Sample], min_words: int) -> dict:
    """Degeneration shares of one policy's answers, and pass rates counted with and without them.

    `pass_rate` is the share of prompts whose answer meets every constraint; `substantive_pass_rate`
    counts only answers that are also real answers (a sentence or more, not repetitive, naming the
    topic), so an empty answer that meets "at most 15 words" does not count. Both are computed
    from the prompts' own constraints, whatever the judge.
    """
    from nash import constraints, quality

    by_id = {p.id: p for p in prompts}
    rows = [(by_id[s.prompt_id], s) for s in answers if s.prompt_id in by_id]
    rep = quality.report([s.response for _, s in rows], [p.topic for p, _ in rows], min_words)
    flags = rep.pop("flags")
    checked = [(f, all(constraints.check(c, s.response) for c in p.constraints))
               for f, (p, s) in zip(flags, rows) if p.constraints]
    rep["pass_rate"] = sum(ok for _, ok in checked) / len(checked) if checked else None
    rep["substantive_pass_rate"] = (sum(ok and f["substantive"] for f, ok in checked) / len(checked)
                                    if checked else None)
    rep["mean_tokens"] = sum(s.num_tokens for _, s in rows) / len(rows) if rows else None
    rep["degenerate"] = 1 - rep["substantive"] if rep["substantive"] is not None else None
    return rep


def answer_flags(prompts: list[Prompt], answers: list[Sample], min_words: int) -> dict[str, dict]:
    """Per prompt: whether the answer is a real answer meeting every constraint (None: the prompt has
    none) and whether it is degenerate; what the head-to-head gate compares prompt by prompt."""
    from nash import constraints, quality

    by_id = {p.id: p for p in prompts}
    out = {}
    for s in answers:
        p = by_id.get(s.prompt_id)
        if p is None:
            continue
        real = quality.degeneration(s.response, p.topic, min_words)["substantive"]
        passed = all(constraints.check(c, s.response) for c in p.constraints) if p.constraints else None
        out[p.id] = {"real_pass": None if passed is None else bool(passed and real), "degenerate": not real}
    return out


def side_by_side(prompts: list[Prompt], columns: dict[str, list[Sample]], n: int) -> list[dict]:
    """The first `n` prompts that every column answered, with each column's answer and its flags."""
    from nash import quality

    answers = {name: {s.prompt_id: s.response for s in samples} for name, samples in columns.items()}
    rows = []
    for p in prompts:
        if len(rows) >= n:
            break
        if all(p.id in a for a in answers.values()):
            rows.append({"prompt": p.text, "topic": p.topic, "answers": {
                name: {"text": a[p.id], **{k: v for k, v in quality.degeneration(a[p.id], p.topic).items()
                                          if k != "substantive"}} for name, a in answers.items()}})
    return rows


# -- the evaluate stage of an iteration --------------------------------------------------


def eval_judge(cfg, precision=None, work_dir=None):
    """The annotator: eval.judge or the run's judge (a cascade's teacher), LM judges in pairwise mode; `self` is π_0.

    Close it with `close_judge`: with sampling.backend vllm the `self` annotator is a server.
    """
    jcfg = cfg.annotator
    if cfg.eval.protocol == "alpaca_eval":
        return build_alpaca_eval_judge(jcfg, cfg.eval.alpaca_eval_annotator, cfg.eval.alpaca_eval_model)
    if jcfg.kind in ("openai", "self", "hf"):
        jcfg = jcfg.model_copy(update={"protocol": "pairwise", "template": None, "weighted": cfg.eval.weighted})
    return build_judge(jcfg, policy_path=resolve_policy(cfg.policy.model), precision=precision,
                       sampling=cfg.sampling, work_dir=work_dir)


def reference_outputs(run: RunDir, cfg, against: str, prompts: list[Prompt], progress=None,
                      precision=None) -> tuple[dict, str]:
    """The outputs a policy is compared with: the reference set, π_0's answers, or iter_M's answers."""
    if against == "reference" and cfg.eval.reference != "initial":
        return {p.id: p.reference for p in prompts}, prompts[0].generator or "reference"
    if against in ("reference", "iter_000"):
        base = answer(resolve_policy(cfg.policy.model), prompts, cfg, run.baseline_dir / "eval",
                                 "iter_000", progress, precision)
        return {s.prompt_id: s.response for s in base}, "iter_000"
    other = IterationDir(run, int(against[5:])) if re.fullmatch(r"iter_\d+", against) else None
    if other is None or not other.complete or not (other.eval_dir / "samples.jsonl").is_file():
        raise ReferenceSetError(
            f"--against {against}: expected 'reference' or iter_M of a complete iteration of {run.name}")
    return {s.prompt_id: s.response for s in read_jsonl(other.eval_dir / "samples.jsonl", Sample)}, against


def compare_iteration(it: IterationDir, against: str = "reference", progress=None, judge_=None) -> dict:
    """Annotate iteration `it`'s held-out answers against `against`; files under eval/vs_<against>/."""
    run, cfg, precision = it.run, it.run.config(), it.precision()
    prompts = read_jsonl(run.eval_prompts, Prompt)
    model = answer(str(it.policy), prompts, cfg, it.eval_dir, f"iter_{it.index:03d}", progress,
                              precision)
    reference, generator = reference_outputs(run, cfg, against, prompts, progress, precision)
    annotator = judge_ or eval_judge(cfg, precision, it.eval_dir / "judge_server")
    try:
        result = compare(annotator, prompts, model, reference,
                                    it.eval_dir / f"vs_{against}" / "judgments.jsonl", cfg.eval.lc_glm, progress)
    finally:
        if judge_ is None:
            close_judge(annotator)
    return {"against": against, "generator": generator, **result}


def drift(it: IterationDir, cfg) -> dict:
    """KL(π_t || π_0) on held-out prompts (π_t's own answers) and perplexity on general text."""
    if not cfg.eval.drift_prompts:
        return {}
    run, initial, dtype = it.run, resolve_policy(cfg.policy.model), it.precision().drift_dtype
    answers = read_jsonl(it.eval_dir / "samples.jsonl", Sample)[: cfg.eval.drift_prompts]
    kl = token_kl(str(it.policy), initial, [s.prompt for s in answers], [s.response for s in answers],
                  dtype, max_length=cfg.train.max_length)
    texts = load_texts(cfg.eval.drift_text)
    # π_0's perplexity is measured once per run and precision: a figure in another dtype is not comparable.
    base_path = run.baseline_dir / ("drift.json" if dtype == "float32" else f"drift-{dtype}.json")
    if not base_path.is_file():
        run.baseline_dir.mkdir(parents=True, exist_ok=True)
        write_json(base_path, perplexity(initial, texts, dtype))
    return {"kl_from_initial": kl["kl"], "kl_tokens": kl["tokens"], "rank_shift": kl["rank_shift"],
            "perplexity": perplexity(str(it.policy), texts, dtype)["perplexity"],
            "initial_perplexity": json.loads(base_path.read_text())["perplexity"], "precision": dtype}


def retention(it: IterationDir, cfg) -> dict | None:
    """π_t's accuracy on the retention probe beside π_0's (scored once per run, source and precision)."""
    r = cfg.eval.retention
    if r is None:
        return None
    from nash import retention as probe

    items = probe.load_items(r.source, r.items)
    dtype = it.precision().drift_dtype
    key = {"source": r.source, "items": [i.id for i in items], "dtype": dtype}
    base_path = it.run.baseline_dir / "retention.json"
    base = json.loads(base_path.read_text()) if base_path.is_file() else {}
    if base.get("key") != key:
        it.run.baseline_dir.mkdir(parents=True, exist_ok=True)
        base = {"key": key, **probe.score(resolve_policy(cfg.policy.model), items, dtype)}
        write_json(base_path, base)
    new = probe.score(str(it.policy), items, dtype)
    write_json(it.eval_dir / "retention.json", {"key": key, **new})
    return {"source": r.source, "max_drop": r.max_drop, **probe.compare(new, base, items)}


def degeneration(it: IterationDir, cfg, progress=None) -> dict:
    """Degeneration and substantive pass rate of π_t's and π_0's greedy answers to the same prompts."""
    prompts = read_jsonl(it.run.eval_prompts, Prompt)
    policy = read_jsonl(it.eval_dir / "samples.jsonl", Sample)
    initial = answer(resolve_policy(cfg.policy.model), prompts, cfg, it.run.baseline_dir / "eval",
                                "iter_000", progress, it.precision())
    return {"policy": answer_report(prompts, policy, cfg.eval.min_words),
            "initial": answer_report(prompts, initial, cfg.eval.min_words)}


def answers_side_by_side(it: IterationDir, n: int = 6) -> list[dict]:
    """Held-out answers of π_0, the previous iteration and this one, side by side."""
    prompts = read_jsonl(it.run.eval_prompts, Prompt)
    columns = {"iter_000": read_jsonl(it.run.baseline_dir / "eval" / "samples.jsonl", Sample)}
    lineage = it.run.lineage(before=it.index)
    if lineage and (lineage[-1].eval_dir / "samples.jsonl").is_file():
        columns[lineage[-1].path.name] = read_jsonl(lineage[-1].eval_dir / "samples.jsonl", Sample)
    columns[it.path.name] = read_jsonl(it.eval_dir / "samples.jsonl", Sample)
    return side_by_side(prompts, columns, n)


def versus_promoted(it: IterationDir, cfg, reference_result: dict, annotator, progress=None) -> dict | None:
    """The new iteration head to head with the promoted policy (π_0 until one is), and the gate's decision."""
    if cfg.eval.gate is None:
        return None
    g, run = cfg.eval.gate, it.run
    promoted = run.promoted(before=it.index)
    against = promoted.path.name if promoted else "iter_000"
    if reference_result["generator"] == against:  # the reference comparison is already this one
        annotations = it.eval_dir / "vs_reference" / "judgments.jsonl"
    else:
        compare_iteration(it, against, progress, judge_=annotator)
        annotations = it.eval_dir / f"vs_{against}" / "judgments.jsonl"
    prompts = read_jsonl(run.eval_prompts, Prompt)
    old_dir = promoted.eval_dir if promoted else run.baseline_dir / "eval"
    new = answer_flags(prompts, read_jsonl(it.eval_dir / "samples.jsonl", Sample), cfg.eval.min_words)
    old = answer_flags(prompts, read_jsonl(old_dir / "samples.jsonl", Sample), cfg.eval.min_words)
    diffs = gate.differences(preferences(read_jsonl(annotations, Judgment)), new, old)
    comparisons = gate.head_to_head(diffs, g.metrics, g.confidence)
    return {"against": against, "confidence": g.confidence, "margin": g.margin, "comparisons": comparisons,
            **gate.decide(comparisons, against, g.margin, g.confidence)}


def evaluate_iteration(it: IterationDir, progress: Progress | None = None) -> dict:
    """The evaluate stage: annotation against the reference and head to head with the promoted policy,
    drift, degeneration, warnings, promotion.

    Writes metrics.json and the run's plot; returns the stage's summary for the manifest.
    """
    cfg = it.run.config()
    annotator = eval_judge(cfg, it.precision(), it.eval_dir / "judge_server")
    try:
        result = compare_iteration(it, "reference", progress, judge_=annotator)
        versus = versus_promoted(it, cfg, result, annotator, progress)
    finally:
        close_judge(annotator)
    drifted = drift(it, cfg)
    kept = retention(it, cfg)
    degen = degeneration(it, cfg)
    pol, ini = degen["policy"], degen["initial"]
    head = {"iteration": it.index, **report.comparison_headline(result), "pass_rate": result["pass_rate"],
            "kl_from_initial": drifted.get("kl_from_initial"), "perplexity": drifted.get("perplexity"),
            "substantive_pass_rate": pol["substantive_pass_rate"],
            "initial_substantive_pass_rate": ini["substantive_pass_rate"],
            "degenerate": pol["degenerate"], "initial_degenerate": ini["degenerate"],
            "degenerate_rise": pol["degenerate"] - ini["degenerate"] if pol["n"] and ini["n"] else None,
            "length_ratio": pol["mean_tokens"] / ini["mean_tokens"] if ini["mean_tokens"] else None,
            "rank_shift": (drifted.get("rank_shift") or {}).get("not_first_share"),
            "retention": kept and kept["accuracy"], "initial_retention": kept and kept["initial_accuracy"],
            "retention_drop": kept and kept["drop"], "retention_drop_se": kept and kept["change_stderr"]}
    earlier = report.headlines(it.run, before=it.index)
    manifest = it.manifest()
    warned = report.warnings_for(head, earlier, cfg.eval, manifest.get("train", {}))
    promo = report.promotion(head, earlier, report.promotion_conditions(cfg.eval), versus)
    head["promoted"], head["promotion_reason"] = promo["promoted"], promo["reason"]
    if versus is not None:
        head["versus"] = {"against": versus["against"], "promoted": versus["promoted"],
                          **{m: {k: c[k] for k in ("n", "mean", "low", "high", "mde")}
                             for m, c in versus["comparisons"].items()}}
    metrics = {
        "iteration": it.index,
        "headline": head,
        "win_rate": result,
        "drift": drifted,
        "retention": kept,
        "degeneration": degen,
        "warnings": warned,
        "promotion": promo,
        "versus_promoted": versus,
        "eval_judge_usage": result["usage"],
        "precision": manifest.get("precision"),
        "train": manifest.get("train", {}),
        "pairs": manifest.get("pairs", {}),
        "table": report.table_rows(earlier + [head]),
    }
    write_json(it.metrics, metrics)
    for w in warned:
        log.warning(w)
    log.info("iter_%03d %s", it.index, promo["reason"])
    report.plot_run(it.run, earlier + [head], title=f"{it.run.name}: vs {head['against']}")
    return {"win_rate": head["win_rate"], "warnings": len(warned)}
