"""The run directory: `run.json` plus one versioned directory per iteration.

An iteration directory is complete only when its manifest says so. Readers (the next
iteration, `nash status`) never trust a partial one; a re-run resumes it stage by stage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from nash.config import UNHASHED, UNHASHED_SECTIONS, Config, ConfigError, validate_config
from nash.records import fsync_dir, write_json

PACKAGES = ("nash", "torch", "transformers", "trl", "datasets", "accelerate", "prefect", "pydantic")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class IterationDir:
    def __init__(self, run: RunDir, index: int):
        self.run = run
        self.index = index
        self.path = run.path / f"iter_{index:03d}"

    samples = property(lambda self: self.path / "samples.jsonl")
    judgments = property(lambda self: self.path / "judgments.jsonl")
    pairs = property(lambda self: self.path / "pairs.jsonl")
    policy = property(lambda self: self.path / "policy")
    metrics = property(lambda self: self.path / "metrics.json")
    eval_dir = property(lambda self: self.path / "eval")
    manifest_path = property(lambda self: self.path / "manifest.json")

    @classmethod
    def from_path(cls, path: str | Path) -> IterationDir:
        path = Path(path)
        try:
            index = int(path.name.removeprefix("iter_"))
        except ValueError:
            raise ValueError(f"{path}: not an iteration directory (expected iter_NNN)") from None
        return cls(RunDir(path.parent), index)

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {}
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        m = self.manifest()
        m.update(fields)
        write_json(self.manifest_path, m)
        return m

    def precision(self):
        """The precision recorded when the iteration opened; resolved again on a different kind of device."""
        from nash.precision import Precision, default_device, for_config

        rec = self.manifest().get("precision")
        if rec and rec.get("device") == default_device():
            return Precision.from_record(rec)
        return for_config(self.run.config())

    @property
    def status(self) -> str:
        return self.manifest().get("status", "missing")

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def rolled_back(self) -> bool:
        return self.status == "rolled_back"

    @property
    def weights_on_disk(self) -> bool:
        return (self.policy / "config.json").is_file()

    def file_hashes(self) -> dict[str, str]:
        files = [self.samples, self.judgments, self.pairs, self.metrics]
        files += sorted(p for p in self.policy.glob("*") if p.is_file())
        return {str(p.relative_to(self.path)): sha256_file(p) for p in files if p.is_file()}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    name = property(lambda self: self.path.name)
    config_path = property(lambda self: self.path / "run.json")
    baseline_dir = property(lambda self: self.path / "baseline")
    eval_prompts = property(lambda self: self.path / "eval_prompts.jsonl")
    plot_path = property(lambda self: self.path / "eval_plot.png")
    promoted_path = property(lambda self: self.path / "promoted.json")

    @classmethod
    def create(cls, runs_dir: str | Path, cfg: Config) -> RunDir:
        """Create the run, or reopen it when its resolved config is the same."""
        run = cls(Path(runs_dir) / cfg.run.name)
        run.check_config(cfg)
        if run.config_path.is_file():
            stored = run.config()
            # What a command may change on an existing run: how many policies disk keeps, where stages run,
            # where figures are logged.
            if (stored.run.keep_policies != cfg.run.keep_policies or stored.stages != cfg.stages
                    or stored.tracking != cfg.tracking):
                data = json.loads(run.config_path.read_text(encoding="utf-8"))
                data["config"]["run"]["keep_policies"] = cfg.run.keep_policies
                data["config"]["stages"] = cfg.stages.model_dump(mode="json")
                data["config"]["tracking"] = cfg.tracking.model_dump(mode="json")
                write_json(run.config_path, data)
            return run
        run.path.mkdir(parents=True, exist_ok=True)
        write_json(run.config_path, {"config_hash": cfg.hash(), "created_at": now(), "config": cfg.model_dump(mode="json")})
        return run

    def check_config(self, cfg: Config) -> None:
        """An existing run continues only with the config it was created with (but for UNHASHED keys)."""
        if not self.config_path.is_file():
            return
        stored = self.config()
        if stored.hash() != cfg.hash():
            old, new = stored.model_dump(mode="json"), cfg.model_dump(mode="json")
            diff = [
                f"{s}.{k}" for s in new for k in new[s]
                if not (s == "run" and k in UNHASHED) and s not in UNHASHED_SECTIONS and old[s].get(k) != new[s][k]
            ]
            raise ConfigError(
                f"run {cfg.run.name!r} already exists in {self.path} with a different config "
                f"({', '.join(diff)}); set run.name to start a new run"
            )

    def config(self) -> Config:
        if not self.config_path.is_file():
            raise ConfigError(f"{self.path}: not a run directory (no run.json)")
        return validate_config(json.loads(self.config_path.read_text(encoding="utf-8"))["config"])

    def iterations(self) -> list[IterationDir]:
        found = []
        for p in sorted(self.path.glob("iter_[0-9][0-9][0-9]")):
            found.append(IterationDir(self, int(p.name[5:])))
        return found

    def lineage(self, before: int | None = None) -> list[IterationDir]:
        """Complete iterations, oldest first: each one's parent is the one before it (rolled-back ones are out)."""
        return [it for it in self.iterations() if it.complete and (before is None or it.index < before)]

    def last_complete(self) -> IterationDir | None:
        done = self.lineage()
        return done[-1] if done else None

    def promoted(self, before: int | None = None) -> IterationDir | None:
        """The promoted policy's iteration (of those before `before`); None: π_0."""
        for it in reversed(self.lineage(before)):
            if it.metrics.is_file() and json.loads(it.metrics.read_text()).get("headline", {}).get("promoted"):
                return it
        return None

    def parent_of_next(self, rule: str, before: int | None = None) -> IterationDir | None:
        """What the next iteration trains from (`train.parent`): the promoted policy or the last complete
        iteration; None: π_0."""
        if rule == "last":
            done = self.lineage(before)
            return done[-1] if done else None
        return self.promoted(before)

    def next_iteration(self) -> IterationDir:
        """The unfinished last iteration if there is one, else a new one after every iteration directory.

        After a rollback the new one takes the next index, and so the next fresh prompt partition.
        """
        its = self.iterations()
        if its and not its[-1].complete and not its[-1].rolled_back:
            return its[-1]
        return IterationDir(self, its[-1].index + 1 if its else 1)

    def rollback(self, to: int) -> list[IterationDir]:
        """Set aside every iteration after `to`; return them. Their files stay; their manifests say so."""
        if to != 0:
            target = IterationDir(self, to)
            if not target.complete:
                raise ConfigError(f"--to {to}: iteration {to} of {self.name} is not a complete iteration "
                                  f"(status: {target.status})")
            if not target.weights_on_disk:
                kept = [str(it.index) for it in self.lineage() if it.weights_on_disk]
                raise ConfigError(
                    f"--to {to}: the weights of iteration {to} were deleted by run.keep_policies on "
                    f"{target.manifest().get('policy_deleted_at')}; iterations with weights on disk: "
                    f"{', '.join(['0'] + kept)}")
        later = [it for it in self.iterations() if it.index > to and not it.rolled_back]
        for it in later:
            it.update_manifest(status="rolled_back", rolled_back={"from_status": it.status, "to": to, "at": now()})
        promoted = self.promoted()
        if promoted:
            self.record_promotion(json.loads(promoted.metrics.read_text())["headline"], promoted.policy)
        else:
            self.promoted_path.unlink(missing_ok=True)
        return later

    def record_promotion(self, head: dict, policy: Path) -> None:
        write_json(self.promoted_path, {"iteration": head["iteration"], "policy": str(policy), "headline": head})

    def prune_policies(self, keep: str | int) -> list[IterationDir]:
        """Delete the weights `run.keep_policies` does not keep; their manifests, hashes and records stay."""
        if keep == "all":
            return []
        keep_index = {it.index for it in self.lineage()[-keep:]}
        if self.promoted_path.is_file():
            keep_index.add(json.loads(self.promoted_path.read_text())["iteration"])
        pruned = []
        for it in self.iterations():
            doomed = it.path / "policy.deleting"
            if it.index not in keep_index and (it.complete or it.rolled_back) and it.weights_on_disk:
                it.policy.rename(doomed)  # absent at once; the files go next
                fsync_dir(it.path)
                it.update_manifest(policy_deleted_at=now())
                pruned.append(it)
            if doomed.exists():
                shutil.rmtree(doomed)
        return pruned
