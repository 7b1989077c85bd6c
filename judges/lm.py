"""Judges that write their verdict as text: the protocols of the papers over any backend.

- pointwise: one request per candidate with the Self-Rewarding additive rubric; the reply
  ends with `Score: <n>`; judged `repeats` times and averaged.
- batched: all candidates of a prompt in one request with DNO's 6-point rubric; the reply
  is a JSON object with `<id>_justification` and `<id>_score` for every candidate.
- pairwise: every pair of candidates in both orders; a preference counts only when both
  orders agree, otherwise it is a tie, which cancels position bias. A candidate's score is
  its share of wins over the others (ties count half).

The backend (an OpenAI-compatible server, or a local transformers model) only turns a list
of chat requests into replies. Caching, the budget, and re-asking after a malformed reply
live here, once for every backend. `score_batch` asks the requests of several prompts in one
list, which a local backend batches `judge.batch_size` at a time across prompt boundaries.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Protocol

from nash.errors import UserError
from nash.judges.base import Budget, request_cost
from nash.judges.cache import JudgmentCache, cache_key
from nash.records import USAGE, Judgment, Prompt

PROMPTS_DIR = Path(__file__).parent / "prompts"
DEFAULT_TEMPLATES = {
    "pointwise": "self_rewarding.txt",
    "batched": "dno_batched.txt",
    "pairwise": "pairwise.txt",
}
_SCORE = re.compile(r"Score:\s*\**\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)
_BETTER = re.compile(r"Better:\s*\**\s*(?:output\s*)?\(?\s*(a|b|tie)\b", re.IGNORECASE)


@dataclass
class Reply:
    text: str
    tokens_in: int = 0
    tokens_out: int = 0
    cached: bool = False


class Backend(Protocol):
    identity: dict  # what makes its replies differ: model, server; never a secret

    def complete(self, requests: list[list[dict]], temperature: float, max_tokens: int) -> list[Reply | Exception]:
        """One reply (or the exception that stopped it) per chat request, in order."""
        ...


class ParseError(ValueError):
    pass


def parse_score(text: str, low: float, high: float) -> float:
    found = _SCORE.findall(text)
    if not found:
        raise ParseError("no 'Score: <n>' in the reply")
    value = float(found[-1])
    if not low <= value <= high:
        raise ParseError(f"score {value} outside {low}..{high}")
    return value


def parse_batched(text: str, ids: list[str], low: float, high: float) -> dict[str, float]:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ParseError("no JSON object in the reply")
    try:
        obj = json.loads(text[start : end + 1])
    except json.JSONDecodeError as e:
        raise ParseError(f"malformed JSON: {e.msg}") from None
    scores, missing = {}, []
    for cid in ids:
        value = obj.get(f"{cid}_score")
        if isinstance(value, str):
            value = float(value) if re.fullmatch(r"\s*[0-9]+(\.[0-9]+)?\s*", value) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high:
            scores[cid] = float(value)
        else:
            missing.append(cid)
    if missing:
        raise ParseError(f"missing or invalid scores for {', '.join(missing)}", scores)
    return scores


def parse_preference(text: str) -> str:
    found = _BETTER.findall(text)
    if not found:
        raise ParseError("no 'Better: a|b|tie' in the reply")
    return found[-1].lower()


_P_A = re.compile(r"p_a=([0-9.]+)")


def parse_probability(text: str) -> float:
    """P(a) from a weighted reply; a reply without one (no log-probabilities) counts its verdict."""
    m = _P_A.search(text)
    if m:
        return float(m.group(1))
    return {"a": 1.0, "b": 0.0, "tie": 0.5}[parse_preference(text)]


def candidate_ids(k: int) -> list[str]:
    return [string.ascii_uppercase[i] if i < 26 else f"C{i}" for i in range(k)]


def template_path(template: str | None, protocol: str) -> Path:
    return Path(template) if template else PROMPTS_DIR / DEFAULT_TEMPLATES[protocol]


class LMJudge:
    SCALES = {"pointwise": (0.0, 5.0), "batched": (1.0, 6.0), "pairwise": (0.0, 1.0)}

    def __init__(self, name: str, backend: Backend, cfg, cache: JudgmentCache | None = None,
                 budget: Budget | None = None, concurrency: int = 1, batch_requests: int | None = None):
        self.name = name
        self.backend = backend
        self.cfg = cfg
        self.protocol = cfg.protocol
        path = template_path(cfg.template, cfg.protocol)
        if not path.is_file():
            raise UserError(f"judge.template: file not found: {path}")
        self.template = string.Template(path.read_text(encoding="utf-8"))
        self.cache = cache
        self.budget = budget or Budget()
        self.concurrency = concurrency
        # Requests the backend batches in one pass (a local model's judge.batch_size): judging hands
        # `score_batch` that many requests' worth of prompts at once. None: a remote backend, judged
        # prompt by prompt, `concurrency` prompts at a time.
        self.batch_requests = batch_requests
        # Probability-weighted verdicts, where the backend can read them: the expected score
        # (pointwise, local judges) or P(a) against P(b) (pairwise: local judges, and openai
        # servers that return logprobs).
        self.weighted = None
        if getattr(cfg, "weighted", False) and cfg.protocol == "pointwise":
            low, high = self.SCALES["pointwise"]
            self.weighted = (int(low), int(high))
        elif getattr(cfg, "weighted", False) and cfg.protocol == "pairwise":
            self.weighted = "pairwise"
        self.identity = {**backend.identity, "protocol": cfg.protocol, "template": self.template.template,
                         "temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "weighted": self.weighted}

    # -- requests: cache, budget, re-asking ---------------------------------------------

    def _cost(self, reply: Reply) -> float:
        return request_cost(self.cfg, reply.tokens_in, reply.tokens_out)

    def _ask(self, requests: list[tuple[str, int]], parse: Callable[[str, int], object]) -> list[dict]:
        """Ask each (text, repeat) request until its reply parses or the re-asks run out.

        Returns, per request: parsed value (or None), last raw reply, error, and usage.
        Raises BudgetExhausted before a request the budget no longer allows.
        """
        results = [dict(value=None, raw=None, error=None, requests=0, cached=0, tokens_in=0, tokens_out=0, cost_usd=0.0)
                   for _ in requests]
        pending = list(range(len(requests)))
        for _attempt in range(self.cfg.parse_retries + 1):
            if not pending:
                break
            to_send, keys = [], {}
            for i in pending:
                text, repeat = requests[i]
                messages = [{"role": "user", "content": text}]
                key = cache_key(self.identity, messages, repeat)
                hit = self.cache.get(key) if self.cache is not None else None
                if hit is not None:
                    results[i]["cached"] += 1
                    self._accept(i, Reply(**hit, cached=True), parse, results)
                    continue
                keys[i] = key
                to_send.append(i)
            if to_send:
                self.budget.check()
                extra = {"weighted": self.weighted} if self.weighted else {}
                stored: set[int] = set()
                if self.cache is not None and getattr(self.backend, "streams_replies", False):
                    def store(j: int, reply, to_send=to_send, keys=keys, stored=stored) -> None:
                        i = to_send[j]
                        if self._parses(reply, parse, i):
                            self._store(keys[i], reply)
                            stored.add(i)

                    extra["on_reply"] = store
                replies = self.backend.complete(
                    [[{"role": "user", "content": requests[i][0]}] for i in to_send],
                    self.cfg.temperature, self.cfg.max_tokens, **extra,
                )
                for i, reply in zip(to_send, replies):
                    if isinstance(reply, Exception):
                        results[i]["error"] = f"{type(reply).__name__}: {reply}"
                        results[i]["requests"] += 1
                        continue
                    cost = self._cost(reply)
                    self.budget.add(reply.tokens_in + reply.tokens_out, cost)
                    r = results[i]
                    r["requests"] += 1
                    r["tokens_in"] += reply.tokens_in
                    r["tokens_out"] += reply.tokens_out
                    r["cost_usd"] += cost
                    if self._accept(i, reply, parse, results) and self.cache is not None and i not in stored:
                        self._store(keys[i], reply)
            # A transport failure already had the client's own retries; only malformed replies are re-asked.
            pending = [i for i in pending if results[i]["value"] is None and results[i]["error"]
                       and results[i]["error"].startswith("ParseError")]
        return results

    def _store(self, key: str, reply: Reply) -> None:
        self.cache.put(key, {"text": reply.text, "tokens_in": reply.tokens_in, "tokens_out": reply.tokens_out})

    @staticmethod
    def _parses(reply, parse, i: int) -> bool:
        if isinstance(reply, Exception):
            return False
        try:
            parse(reply.text, i)
            return True
        except ParseError:
            return False

    @staticmethod
    def _accept(i: int, reply: Reply, parse, results: list[dict]) -> bool:
        results[i]["raw"] = reply.text
        try:
            results[i]["value"] = parse(reply.text, i)
            results[i]["error"] = None
            return True
        except ParseError as e:
            results[i]["error"] = f"ParseError: {e.args[0]}"
            if len(e.args) > 1:
                results[i]["partial"] = e.args[1]
            return False

    def _judgment(self, prompt: Prompt, candidate: int, r: dict, **fields) -> Judgment:
        usage = {k: r[k] for k in USAGE}
        return Judgment(prompt_id=prompt.id, candidate=candidate, judge=self.name, raw=r["raw"], **usage, **fields)

    # -- protocols ---------------------------------------------------------------------
    #
    # Each protocol turns one prompt's candidates into requests (`_requests_<protocol>`: the
    # requests and the parser of their replies) and the answers to them into judgments
    # (`_judgments_<protocol>`). `score_batch` asks the requests of all its prompts in one
    # `_ask`, so a local backend batches them whatever the prompt boundaries; usage stays per
    # request, hence per prompt, exactly as when each prompt is judged alone.

    def score(self, prompt: Prompt, candidates: list[str]) -> list[Judgment]:
        return self.score_batch([(prompt, candidates)])[0]

    def score_batch(self, items: list[tuple[Prompt, list[str]]]) -> list[list[Judgment]]:
        """`score` of each (prompt, candidates) item, in order, with every item's requests asked together."""
        make = getattr(self, f"_requests_{self.protocol}")
        build = getattr(self, f"_judgments_{self.protocol}")
        reqs, parsers, spans = [], [], []
        for prompt, candidates in items:
            r, parse = make(prompt, candidates)
            spans.append((len(reqs), len(reqs) + len(r)))
            reqs += r
            parsers += [parse] * len(r)
        results = self._ask(reqs, lambda text, i: parsers[i](text))
        return [build(prompt, candidates, results[a:b]) for (prompt, candidates), (a, b) in zip(items, spans)]

    def request_texts(self, prompt: Prompt, candidates: list[str]) -> list[str]:
        """The texts this judge sends for one prompt's candidates (what `nash plan` counts)."""
        reqs, _ = getattr(self, f"_requests_{self.protocol}")(prompt, candidates)
        return [text for text, _ in reqs]

    def prompt_requests(self, k: int) -> int:
        """Requests one prompt of `k` candidates makes (before re-asks)."""
        return {"pointwise": k * self.cfg.repeats, "batched": 1, "pairwise": k * (k - 1)}[self.protocol]

    def _requests_pointwise(self, prompt, candidates):
        low, high = self.SCALES["pointwise"]
        reqs = [(self.template.safe_substitute(instruction=prompt.text, response=c), rep)
                for c in candidates for rep in range(self.cfg.repeats)]
        return reqs, lambda text: parse_score(text, low, high)

    def _judgments_pointwise(self, prompt, candidates, results):
        out = []
        for k in range(len(candidates)):
            rs = results[k * self.cfg.repeats : (k + 1) * self.cfg.repeats]
            merged = {key: sum(r[key] for r in rs) for key in USAGE}
            merged["raw"] = rs[-1]["raw"]
            values = [r["value"] for r in rs if r["value"] is not None]
            if values:
                out.append(self._judgment(prompt, k, merged, outcome="scored", score=sum(values) / len(values),
                                          details={"scores": values}))
            else:
                out.append(self._judgment(prompt, k, merged, outcome="failed", error=rs[-1]["error"]))
        return out

    def _requests_batched(self, prompt, candidates):
        low, high = self.SCALES["batched"]
        ids = candidate_ids(len(candidates))
        block = "\n\n".join(f"[Candidate {cid}]\n{text}" for cid, text in zip(ids, candidates))
        text = self.template.safe_substitute(instruction=prompt.text, candidates=block)
        return [(text, 0)], lambda t: parse_batched(t, ids, low, high)

    def _judgments_batched(self, prompt, candidates, results):
        (r,) = results
        ids = candidate_ids(len(candidates))
        scores = r["value"] or r.get("partial") or {}
        out = []
        for k, cid in enumerate(ids):
            # The one request's usage and its reply are recorded on candidate 0, so sums stay exact and
            # judgments.jsonl holds each reply once; a candidate without a score keeps the reply too.
            usage = r if k == 0 else {**r, **dict.fromkeys(USAGE, 0), "raw": r["raw"] if cid not in scores else None}
            if cid in scores:
                out.append(self._judgment(prompt, k, usage, outcome="scored", score=scores[cid], details={"id": cid}))
            else:
                out.append(self._judgment(prompt, k, usage, outcome="failed", details={"id": cid},
                                          error=r["error"] or "missing score"))
        return out

    def _compare_requests(self, prompt, pairs: list[tuple[str, str]]) -> list[tuple[str, int]]:
        reqs = []
        for a, b in pairs:
            reqs.append((self.template.safe_substitute(instruction=prompt.text, output_a=a, output_b=b), 0))
            reqs.append((self.template.safe_substitute(instruction=prompt.text, output_a=b, output_b=a), 0))
        return reqs

    @staticmethod
    def _agree(first: str | None, second: str | None) -> str | None:
        """'a', 'b' or 'tie' from the verdicts of both orders (second one swapped back)."""
        if first is None or second is None:
            return None
        second = {"a": "b", "b": "a", "tie": "tie"}[second]
        return first if first == second else "tie"

    def _parse_verdict(self, text: str, _i: int = 0):
        return parse_probability(text) if self.weighted == "pairwise" else parse_preference(text)

    def compare(self, prompt: Prompt, a: str, b: str) -> Judgment:
        """Candidate 0 (`a`) against candidate 1 (`b`), asked in both orders."""
        r1, r2 = self._ask(self._compare_requests(prompt, [(a, b)]), self._parse_verdict)
        return self._pair_judgment(prompt, 0, 1, r1, r2)

    def _pair_judgment(self, prompt, i, j, r1, r2) -> Judgment:
        usage = {k: r1[k] + r2[k] for k in USAGE}
        usage["raw"] = f"{r1['raw']}\n---\n{r2['raw']}" if r1["raw"] or r2["raw"] else None
        details = {"orders": [r1["value"], r2["value"]]}
        if self.weighted == "pairwise" and r1["value"] is not None and r2["value"] is not None:
            # P(a wins), averaged over both orders (the second asked with a and b swapped).
            p_a = (r1["value"] + 1.0 - r2["value"]) / 2
            details["p_a"] = p_a
            verdict = "a" if p_a > 0.5 else "b" if p_a < 0.5 else "tie"
        else:
            verdict = self._agree(r1["value"], r2["value"])
        if verdict is None:
            return self._judgment(prompt, i, usage, outcome="failed", other=j, details=details,
                                  error=r1["error"] or r2["error"])
        if verdict == "tie":
            return self._judgment(prompt, i, usage, outcome="tie", other=j, details=details)
        return self._judgment(prompt, i, usage, outcome="preferred", other=j, winner=i if verdict == "a" else j,
                              details=details)

    def _requests_pairwise(self, prompt, candidates):
        pairs = [(candidates[i], candidates[j]) for i, j in combinations(range(len(candidates)), 2)]
        return self._compare_requests(prompt, pairs), self._parse_verdict

    def _judgments_pairwise(self, prompt, candidates, results):
        index_pairs = list(combinations(range(len(candidates)), 2))
        comparisons = [self._pair_judgment(prompt, i, j, results[2 * n], results[2 * n + 1])
                       for n, (i, j) in enumerate(index_pairs)]
        out = []
        for k in range(len(candidates)):
            mine = [c for c in comparisons if k in (c.candidate, c.other)]
            usage = {key: sum(getattr(c, key) for c in comparisons if c.candidate == k)
                     for key in USAGE}
            usage["raw"] = None
            decided = [c for c in mine if c.outcome != "failed"]
            record = [{"other": c.other if c.candidate == k else c.candidate, "outcome": c.outcome,
                       "won": c.winner == k if c.outcome == "preferred" else None} for c in mine]
            if not decided:
                out.append(self._judgment(prompt, k, usage, outcome="failed", details={"comparisons": record},
                                          error="every comparison failed"))
                continue
            wins = sum(c.winner == k for c in decided) + 0.5 * sum(c.outcome == "tie" for c in decided)
            out.append(self._judgment(prompt, k, usage, outcome="scored", score=wins / len(decided),
                                      details={"comparisons": record}))
        return out
