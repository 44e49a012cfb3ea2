"""Command line front end (argparse): parses, dispatches, reports errors. No logic lives here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from hydrabench.spec import SpecError


def _heads(value: str) -> int | str:
    return value if value == "auto" else int(value)


# dest → (spec section, type) of the hyper-parameter flags.
HYPERPARAMETERS: dict[str, tuple[str, Any]] = {
    "rank": ("adapter", int), "alpha": ("adapter", float), "dropout": ("adapter", float),
    "num_splits": ("adapter", int), "num_heads": ("adapter", _heads), "lr": ("train", float),
    "epochs": ("train", int), "max_steps": ("train", int), "batch_size": ("train", int),
    "seq_len": ("train", int), "limit": ("eval", int)}


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="tiny", help="profile name (default: tiny, offline CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="base model: a local directory or hub id (default: profile's)")
    p.add_argument("--force", action="store_true", help="rerun even if a finished record exists")
    hp = p.add_argument_group("hyper-parameters (override the profile, validated the same way)")
    for dest, (_, kind) in HYPERPARAMETERS.items():
        hp.add_argument("--" + dest.replace("_", "-"), dest=dest, type=kind, default=None)
    hp.add_argument("--target-modules", default=None,
                    help="comma-separated module names, e.g. q_proj,v_proj")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run model-written code for code tasks (sandboxed); off by default")


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"train": {}, "adapter": {}, "eval": {}}
    for dest, (section, _) in HYPERPARAMETERS.items():
        if getattr(args, dest) is not None:
            out[section][dest] = getattr(args, dest)
    if args.target_modules:
        out["adapter"]["target_modules"] = [m.strip() for m in args.target_modules.split(",")]
    if args.allow_code_execution:
        out["eval"]["allow_code_execution"] = True
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hydrabench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train (or load) a method on a task column and evaluate it")
    run.add_argument("--method", required=True)
    run.add_argument("--task", required=True, help="a table column: general, medical, law, ...")
    _add_run_options(run)

    repro = sub.add_parser("reproduce", help="run every cell of a paper table, then report it")
    repro.add_argument("table")
    repro.add_argument("--profile", default="tiny")
    repro.add_argument("--seeds", default="0", help="comma-separated seeds")

    report = sub.add_parser("report", help="write reports/<table>.md/.csv/.tex from records")
    report.add_argument("table")
    report.add_argument("--profile", default="tiny")
    report.add_argument("--seeds", default="0")

    lister = sub.add_parser("list", help="list methods, tasks, profiles or tables")
    lister.add_argument("what", choices=["methods", "tasks", "profiles", "tables"])
    lister.add_argument("--profile", default="tiny")
    return parser


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise SpecError(f"--seeds must be comma-separated integers, got {text!r}") from None


def _cmd_run(args: argparse.Namespace) -> None:
    from hydrabench.methods import METHODS
    from hydrabench.runner import execute
    from hydrabench.spec import resolve_spec

    spec = resolve_spec(args.method, args.task, args.profile, args.seed, args.model,
                        _overrides(args), valid_methods=list(METHODS))
    record = execute(spec, force=args.force)
    for task, metrics in record["metrics"].items():
        print(f"{task:24s} {metrics['primary']:28s} {metrics['value']:.4f}  (n={metrics['n']})")
    print(f"record: results/runs/{record['run_id']}/record.json")


def _cmd_reproduce(args: argparse.Namespace) -> None:
    from hydrabench.methods import METHODS
    from hydrabench.report import write_table_report
    from hydrabench.runner import execute, log
    from hydrabench.tables import load_table

    table = load_table(args.table)
    seeds = _seeds(args.seeds)
    runs = table.run_specs(args.profile, seeds)
    for i, (row, _, spec) in enumerate(runs, start=1):
        if row.method not in METHODS:
            log(f"[{i}/{len(runs)}] {row.label}: method {row.method!r} not implemented, left empty")
            continue
        log(f"[{i}/{len(runs)}] {row.label} → {spec.run_id}")
        execute(spec)
    for path in write_table_report(table, args.profile, seeds):
        print(path)


def _cmd_report(args: argparse.Namespace) -> None:
    from hydrabench.report import write_table_report
    from hydrabench.tables import load_table

    for path in write_table_report(load_table(args.table), args.profile, _seeds(args.seeds)):
        print(path)


def _cmd_list(args: argparse.Namespace) -> None:
    if args.what == "methods":
        from hydrabench.methods import METHODS

        for m in METHODS.values():
            print(f"{m.name:20s} {m.description}{'' if m.mergeable else '  [hf backend only]'}")
    elif args.what == "tasks":
        from hydrabench.spec import load_profile

        for name, task in load_profile(args.profile)["tasks"].items():
            print(f"{name:10s} corpus={task['corpus']:40s} eval={','.join(task['eval'])}")
    elif args.what == "profiles":
        from hydrabench.spec import load_profile, profile_names

        for name in profile_names():
            print(f"{name:10s} {load_profile(name).get('description', '')}")
    else:
        from hydrabench.tables import load_table, table_names

        for name in table_names():
            print(f"{name:10s} {load_table(name).title}")


COMMANDS = {"run": _cmd_run, "reproduce": _cmd_reproduce, "report": _cmd_report,
            "list": _cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except SpecError as err:
        print(f"hydrabench: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
