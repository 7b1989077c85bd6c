"""`nash`: run rounds, show their status.

    nash run CONFIG [--iterations N] [--runs-dir DIR] [--set dotted.key=value ...]
    nash status [RUN] [--runs-dir DIR]
    nash eval RUN [--iteration N] [--against reference|iter_M] [--runs-dir DIR]
    nash serve CONFIG (--cron "0 2 * * *" | --interval SECONDS) [--iterations N] [--runs-dir DIR] [--set ...]
    nash deploy CONFIG [--cron ... | --interval SECONDS] [--iterations N] [--runs-dir DIR] [--set ...]
    nash samples RUN [--iteration N] [-n 6] [--runs-dir DIR]
    nash rollback RUN --to N [--runs-dir DIR]
    nash rejudge RUN [--iteration N] [--runs-dir DIR]

User mistakes (bad config, missing files) print one `nash: error:` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nash.config import ConfigError, load_config
from nash.errors import UserError
from nash.registry import RunDir
from nash.report import decisions_text, format_table, headlines, iteration_row
from nash.runlock import run_lock

# The temporary server would otherwise try to send usage telemetry, which fails offline
# and races the server's own SQLite writes at start-up.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The first start creates and migrates Prefect's SQLite database, which takes longer than
# Prefect's 20 s default on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

def _runs_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("NASH_RUNS_DIR", "runs"))


def _config(args):
    overrides = list(args.set or [])
    if getattr(args, "iterations", None) is not None:
        overrides.append(f"run.iterations={args.iterations}")
    return load_config(args.config, overrides)


def _open_run(args, cfg, plan: bool = False):
    """The run directory, once everything that can fail before the first paid stage has been checked;
    with `plan`, the next iteration's plan is printed and its judging cost held against the budget."""
    from nash.iteration import give_back_memory
    from nash.preflight import preflight

    run = RunDir(_runs_dir(args.runs_dir) / cfg.run.name)
    run.check_config(cfg)
    preflight(cfg, run)
    if plan:
        from nash import plan as planning

        p = planning.plan_iteration(cfg, run)
        print(f"nash: {planning.summary(p)}", file=sys.stderr)
        note = planning.check_budget(p, getattr(args, "over_budget", False))
        if note:
            print(f"nash: {note}", file=sys.stderr)
    give_back_memory()  # the preflight read every prompt of the source
    return RunDir.create(_runs_dir(args.runs_dir), cfg)


def cmd_plan(args) -> int:
    """What the next iteration of a config will cost, before anything is paid."""
    from nash import plan as planning

    cfg = _config(args)
    run = RunDir(_runs_dir(args.runs_dir) / cfg.run.name)
    if run.config_path.is_file():
        run.check_config(cfg)
    p = planning.plan_iteration(cfg, run, args.prompts, args.tokens_per_second)
    print(planning.to_json(p) if args.json else planning.markdown(p), end="")
    return 0


def _sigterm_as_interrupt() -> None:
    """SIGTERM (a scheduler's time limit, `kill`) unwinds like Ctrl-C: child runs on work pools are
    cancelled and child processes stopped, instead of the process vanishing."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def cmd_run(args) -> int:
    _sigterm_as_interrupt()
    cfg = _config(args)
    # The lock first: a second writer is refused before anything is loaded or converted.
    with run_lock(_runs_dir(args.runs_dir) / cfg.run.name, "nash run"):
        return _run_locked(cfg, _open_run(args, cfg, plan=True))


def _tie_temporary_server() -> None:
    """Prefect's temporary API server dies with this process, SIGKILL included.

    Prefect starts it with `subprocess.Popen` and stops it on a clean exit only; killed, `nash
    run` left it running. Its Popen goes through nash.lifeline (PR_SET_PDEATHSIG, then exec).
    """
    import subprocess
    import types

    from prefect.server.api import server as api

    class Tied(types.ModuleType):
        def __getattr__(self, name):
            return getattr(subprocess, name)

        @staticmethod
        def Popen(args, **kwargs):  # noqa: N802  (stands in for subprocess.Popen)
            return subprocess.Popen([sys.executable, "-m", "nash.lifeline", *args], **kwargs)

    if isinstance(getattr(api, "subprocess", None), types.ModuleType):
        api.subprocess = Tied("subprocess")


def _run_locked(cfg, run: RunDir) -> int:
    print(f"nash: run {run.name!r} in {run.path} ({cfg.run.iterations} iteration(s))", file=sys.stderr)
    # Prefect is imported only for commands that run flows.
    from nash.flows.deploy import check_deployed
    from nash.flows.round import round_flow

    check_deployed(run)
    _tie_temporary_server()

    try:
        round_flow(run_dir=str(run.path), iterations=cfg.run.iterations)
    except Exception:
        failed = [it for it in run.iterations() if it.status == "failed"]
        if not failed:
            raise
        print_status(run)
        print(f"nash: error: {failed[-1].path.name} failed at {failed[-1].manifest().get('error')}\n"
              f"  the stages before it are kept; fix the cause and run the same command to resume "
              f"(traceback: {failed[-1].manifest_path})", file=sys.stderr)
        return 1
    print_status(run)
    return 0


def cmd_serve(args) -> int:
    if args.interval is not None and args.interval <= 0:
        raise ConfigError(f"--interval: expected a number of seconds > 0, got {args.interval:g}")
    cfg = _config(args)
    run = _open_run(args, cfg)
    from prefect import serve

    from nash.flows.round import round_deployment

    deployment = round_deployment(str(run.path), cfg.run.iterations, args.cron, args.interval)
    when = f"cron {args.cron!r}" if args.cron else f"every {args.interval:g} s"
    print(f"nash: serving {deployment.name}: {cfg.run.iterations} iteration(s) of {run.name} on {when}; "
          "Ctrl-C stops", file=sys.stderr)
    serve(deployment)
    return 0


def cmd_deploy(args) -> int:
    """Register the stages mapped to work pools (and the round, with stages.round) on the Prefect server."""
    if args.interval is not None and args.interval <= 0:
        raise ConfigError(f"--interval: expected a number of seconds > 0, got {args.interval:g}")
    cfg = _config(args)
    with run_lock(_runs_dir(args.runs_dir) / cfg.run.name, "nash deploy"):
        run = _open_run(args, cfg)
    from nash.flows.deploy import deploy

    for line in deploy(run, cfg.run.iterations, args.cron, args.interval):
        print(f"nash: {line}", file=sys.stderr)
    print(f"nash: start workers with `prefect worker start --pool POOL` where the run directory {run.path} is "
          f"mounted; then `nash run {args.config}` (same --set) drives a round", file=sys.stderr)
    return 0


def print_status(run: RunDir) -> None:
    rows = [iteration_row(it.manifest()) for it in run.iterations()]
    print(f"run {run.name}  ({run.path})")
    print(format_table(rows) if rows else "  no iterations yet")
    decisions = decisions_text(headlines(run))
    if decisions:
        print(decisions)
    if rows:
        promoted = json.loads(run.promoted_path.read_text()) if run.promoted_path.is_file() else None
        shown = f"iter_{promoted['iteration']:03d} ({promoted['policy']})" if promoted else "none yet (π_0)"
        print(f"  promoted: {shown}; the next iteration trains from {_next_parent(run)}")


def _next_parent(run: RunDir) -> str:
    rule = run.config().train.parent
    parent = run.parent_of_next(rule)
    return f"{parent.path.name if parent else 'π_0'} (train.parent {rule})"


def _find_run(args) -> RunDir:
    path = Path(args.run) if Path(args.run, "run.json").is_file() else _runs_dir(args.runs_dir) / args.run
    run = RunDir(path)
    run.config()  # raises a clear error when this is not a run
    return run


def cmd_eval(args) -> int:
    """The evaluation table of a run; with --against iter_M, annotate against that iteration's answers."""
    run = _find_run(args)
    from nash.flows.stage import device_slot

    # The evaluate stage's device slot: a manual evaluation and a scheduled round's stages never share a GPU.
    with run_lock(run.path, "nash eval"), device_slot(run.config(), "evaluate"):  # it writes annotations and the plot
        return _eval_locked(args, run)


def _eval_locked(args, run: RunDir) -> int:
    from nash import evaluation, report
    from nash.judges import close_judge
    from nash.records import write_json

    its = [it for it in run.iterations() if it.complete and (args.iteration is None or it.index == args.iteration)]
    if args.iteration is not None and not its:
        raise UserError(f"--iteration {args.iteration}: no complete iteration {args.iteration} in {run.path}")
    heads = []
    judge = None
    try:
        for it in its:
            head = json.loads(it.metrics.read_text()).get("headline")
            if head is None:
                print(f"nash: {it.path.name} was evaluated before win rates were recorded; skipped", file=sys.stderr)
                continue
            if args.against != "reference":
                if args.against == it.path.name:
                    continue
                if judge is None:
                    judge = evaluation.eval_judge(run.config(), it.precision(), run.path / "judge_server")
                r = evaluation.compare_iteration(it, args.against, judge_=judge)
                write_json(it.eval_dir / f"vs_{args.against}" / "summary.json", r)
                head = {**head, **report.comparison_headline(r)}
            heads.append(head)
    finally:
        if judge is not None:
            close_judge(judge)
    print(f"run {run.name}  ({run.path})")
    print(report.format_table(report.table_rows(heads)))
    if args.against == "reference" and heads:
        print(report.decisions_text(heads))
    if args.against == "reference" and args.iteration is None and heads:
        plot = report.plot_run(run, heads, title=f"{run.name}: vs {heads[-1]['against']}")
        print(f"plot: {plot}")
    return 0


def cmd_samples(args) -> int:
    """Held-out answers of π_0, the previous and the chosen iteration (default: the last complete) side by side."""
    from nash import evaluation, report

    run = _find_run(args)
    its = [it for it in run.iterations() if it.complete and (args.iteration is None or it.index == args.iteration)]
    if not its:
        which = f"iteration {args.iteration}" if args.iteration is not None else "iteration"
        raise UserError(f"no complete {which} in {run.path}")
    rows = evaluation.answers_side_by_side(its[-1], args.n)
    print(f"run {run.name}: {its[-1].path.name}, {len(rows)} held-out prompts, greedy answers")
    print(report.samples_text(rows))
    return 0


def cmd_rollback(args) -> int:
    """Set aside the iterations after --to N: the next one starts from N's policy on fresh prompts."""
    run = _find_run(args)
    with run_lock(run.path, "nash rollback"):
        later = run.rollback(args.to)
    names = ", ".join(it.path.name for it in later) or "nothing"
    print(f"nash: rolled back {run.name} to iteration {args.to}: set aside {names} (kept on disk); "
          f"the next iteration starts from {'π_0' if args.to == 0 else f'iter_{args.to:03d}'}'s policy",
          file=sys.stderr)
    print_status(run)
    return 0


def cmd_rejudge(args) -> int:
    """Ask the judge again for the failed judgments of the unfinished iteration, without repaying the others."""
    from nash import iteration

    run = _find_run(args)
    with run_lock(run.path, "nash rejudge"):
        its = [it for it in run.iterations() if not it.rolled_back
               and (args.iteration is None or it.index == args.iteration)]
        if not its:
            raise UserError(f"no iteration to rejudge in {run.path}")
        it = its[-1]
        n = iteration.reopen_failed_judgments(it)
        if n:
            iteration.judge(str(it.path))
        counts = it.manifest().get("judge_outcomes", {})
    print(f"nash: {it.path.name}: asked again for {n} failed judgment(s); now {counts.get('failed', 0)} failed. "
          f"`nash run` continues the iteration from its judgments", file=sys.stderr)
    return 0


def cmd_distill(args) -> int:
    """Train a reward model on the run's own judgments; print its held-out agreement with the teacher."""
    from nash import distill

    run = _find_run(args)
    with run_lock(run.path, "nash distill"):
        out = distill.distill(run, args.iterations, overrides=args.set or [])
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    print("\n".join(distill.summary_lines(report)))
    print(f"model: {out / 'model'}  (judge.kind cascade, student.model distill:latest or distill:{out.name})")
    return 0


def cmd_push(args) -> int:
    """Upload a policy and its model card to the Hugging Face Hub, a branch per iteration."""
    from nash.card import push
    from nash.registry import IterationDir

    run = _find_run(args)
    if args.iteration is not None:
        it = IterationDir(run, args.iteration)
    else:
        it = run.promoted() or run.last_complete()
    if it is None or not it.complete:
        raise UserError(f"nash push: no complete iteration {args.iteration or ''} in {run.path}".replace("  ", " "))
    out = push(it, args.repo_id, private=not args.public, revision=args.revision, dry_run=args.dry_run)
    what = "would upload" if args.dry_run else "uploaded"
    print(f"nash: {what} {it.path.name} of {run.name} to {out['repo_id']}@{out['revision']} "
          f"({'private' if out['private'] else 'public'}): " + ", ".join(f"{k} ({v:,} B)" for k, v in out["files"].items()))
    if out.get("url"):
        print(out["url"])
    return 0


def _iterations(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: iteration numbers separated by commas, e.g. 1,2") from None


def cmd_status(args) -> int:
    runs_dir = _runs_dir(args.runs_dir)
    if args.run:
        print_status(_find_run(args))
        return 0
    runs = sorted(p.parent for p in runs_dir.glob("*/run.json"))
    if not runs:
        print(f"no runs in {runs_dir}")
    for p in runs:
        its = RunDir(p).iterations()
        complete = sum(it.complete for it in its)
        print(f"{p.name}: {complete} complete iteration(s) of {len(its)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nash", description="Iterative self-improvement rounds for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run iterations of a config")
    run.add_argument("config", help="YAML config file")
    run.add_argument("--iterations", type=int, help="iterations to run now (default: run.iterations)")
    run.add_argument("--runs-dir", help="parent of run directories (default: ./runs or $NASH_RUNS_DIR)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--over-budget", action="store_true",
                     help="start even if the plan puts judging over judge.budget_usd (judging stops at the budget)")
    run.set_defaults(func=cmd_run)
    plan = sub.add_parser("plan", help="what the next iteration of a config will cost")
    plan.add_argument("config", help="YAML config file")
    plan.add_argument("--prompts", type=int, help="prompts in the iteration (default: prompts.partition_size)")
    plan.add_argument("--tokens-per-second", type=float, help="sampling throughput for GPU-hours (default: the "
                      "run's last measured)")
    plan.add_argument("--runs-dir")
    plan.add_argument("--set", action="append", metavar="KEY=VALUE")
    plan.add_argument("--json", action="store_true", help="the plan as JSON")
    plan.set_defaults(func=cmd_plan)
    serve = sub.add_parser("serve", help="serve scheduled rounds of a config as a Prefect deployment")
    serve.add_argument("config")
    when = serve.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='schedule, e.g. "0 2 * * *" for 02:00 every night')
    when.add_argument("--interval", type=float, metavar="SECONDS", help="schedule: a round every SECONDS")
    serve.add_argument("--iterations", type=int, help="iterations per scheduled round (default: run.iterations)")
    serve.add_argument("--runs-dir")
    serve.add_argument("--set", action="append", metavar="KEY=VALUE")
    serve.set_defaults(func=cmd_serve)
    dep = sub.add_parser("deploy", help="register the stages mapped to work pools (config section stages) "
                         "as Prefect deployments")
    dep.add_argument("config")
    when = dep.add_mutually_exclusive_group()
    when.add_argument("--cron", help="with stages.round: schedule the round, e.g. \"0 2 * * *\"")
    when.add_argument("--interval", type=float, metavar="SECONDS", help="with stages.round: a round every SECONDS")
    dep.add_argument("--iterations", type=int, help="iterations per round of the round deployment")
    dep.add_argument("--runs-dir")
    dep.add_argument("--set", action="append", metavar="KEY=VALUE")
    dep.set_defaults(func=cmd_deploy)
    status = sub.add_parser("status", help="iterations of a run, their status and metrics")
    status.add_argument("run", nargs="?", help="run name or directory (default: list all runs)")
    status.add_argument("--runs-dir")
    status.set_defaults(func=cmd_status)
    ev = sub.add_parser("eval", help="win rate, LC win rate, length and drift of every iteration of a run")
    ev.add_argument("run", help="run name or directory")
    ev.add_argument("--iteration", type=int, help="only this iteration")
    ev.add_argument("--against", default="reference",
                    help="reference (the run's reference outputs, default) or iter_M (that iteration's answers)")
    ev.add_argument("--runs-dir")
    ev.set_defaults(func=cmd_eval)
    rb = sub.add_parser("rollback", help="set aside the iterations after N; the next starts from N's policy")
    rb.add_argument("run", help="run name or directory")
    rb.add_argument("--to", type=int, required=True, metavar="N", help="the last iteration to keep (0: π_0)")
    rb.add_argument("--runs-dir")
    rb.set_defaults(func=cmd_rollback)
    rj = sub.add_parser("rejudge", help="ask the judge again for the failed judgments of the unfinished iteration")
    rj.add_argument("run", help="run name or directory")
    rj.add_argument("--iteration", type=int, help="this iteration (default: the last)")
    rj.add_argument("--runs-dir")
    rj.set_defaults(func=cmd_rejudge)
    dist = sub.add_parser("distill", help="train a reward model on the run's own judgments (for judge.kind cascade)")
    dist.add_argument("run", help="run name or directory")
    dist.add_argument("--iterations", type=_iterations, help="iterations to learn from, e.g. 1,2 (default: every "
                      "complete one)")
    dist.add_argument("--set", action="append", metavar="distill.KEY=VALUE",
                      help="a distill key for this version only, e.g. distill.epochs=1 (repeatable)")
    dist.add_argument("--runs-dir")
    dist.set_defaults(func=cmd_distill)

    push = sub.add_parser("push", help="upload a policy and its model card to the Hugging Face Hub")
    push.add_argument("run", help="run name or directory")
    push.add_argument("--iteration", type=int, help="this iteration (default: the promoted one, else the last)")
    push.add_argument("--repo-id", required=True, help="the Hub repository, e.g. my-org/my-policy")
    push.add_argument("--revision", help="branch (default: iter_NNN, one per iteration)")
    push.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    push.add_argument("--dry-run", action="store_true", help="print what would be uploaded; no network")
    push.add_argument("--runs-dir")
    push.set_defaults(func=cmd_push)

    samples = sub.add_parser("samples", help="held-out answers of π_0, the previous and an iteration, side by side")
    samples.add_argument("run", help="run name or directory")
    samples.add_argument("--iteration", type=int, help="this iteration (default: the last complete one)")
    samples.add_argument("-n", type=int, default=6, help="prompts to show (default 6)")
    samples.add_argument("--runs-dir")
    samples.set_defaults(func=cmd_samples)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"nash: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
