"""Command line front end (argparse): parses, dispatches, reports errors. No logic lives here."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from hydrabench.errors import SpecError

if TYPE_CHECKING:  # the CLI imports its commands' modules lazily, to start fast
    from hydrabench.pipeline.sweep import Sweep
    from hydrabench.records.store import RunRecord


def _heads(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:  # argparse would name the function (`invalid _heads value`)
        raise argparse.ArgumentTypeError(f"must be an integer or 'auto', got {value!r}") from None


# dest → (spec section, type) of the hyper-parameter flags.
HYPERPARAMETERS: dict[str, tuple[str, Any]] = {
    "rank": ("adapter", int), "alpha": ("adapter", float), "dropout": ("adapter", float),
    "num_splits": ("adapter", int), "num_heads": ("adapter", _heads),
    "balance_loss_coef": ("adapter", float), "blc_weight": ("adapter", float),
    "blc_alpha": ("adapter", float), "top_k": ("adapter", int), "sparsity": ("adapter", float),
    "lr": ("train", float),
    "epochs": ("train", int), "max_steps": ("train", int), "batch_size": ("train", int),
    "seq_len": ("train", int), "checkpoint_every": ("train", int), "limit": ("eval", int),
    "backend": ("eval", str), "gen_kwargs": ("eval", str)}


def _add_include_path(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include-path", dest="include_path", action="append", default=[],
                   metavar="DIR", help="a folder of your own lm-eval task YAML (table specs in "
                   "its tables/), beside the shipped ones, as lm-eval's --include_path; "
                   "repeatable")


def _add_setting(group: argparse._ArgumentGroup, dest: str) -> None:
    """The flag of one run setting, its help from the settings dataclass's field metadata."""
    from hydrabench.config.spec import AdapterSettings, EvalSettings, TrainSettings, setting_help

    section, kind = HYPERPARAMETERS[dest]
    settings = {"adapter": AdapterSettings, "train": TrainSettings, "eval": EvalSettings}[section]
    group.add_argument("--" + dest.replace("_", "-"), dest=dest, type=kind, default=None,
                       help=f"{setting_help(settings, dest)} (default: the profile's)")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="tiny", help=PROFILE_HELP)
    _add_include_path(p)
    p.add_argument("--seed", type=int, default=None, help="default: the profile's, else 0")
    p.add_argument("--model", help="base model: a local directory or hub id (default: profile's)")
    p.add_argument("--force", action="store_true",
                   help="score again even if a finished record exists (reuses the artifact)")
    p.add_argument("--retrain", action="store_true",
                   help="train and score again even if a trained artifact and record exist")
    _add_code_flags(p)
    hp = p.add_argument_group("hyper-parameters (override the profile, validated the same way)")
    for dest in HYPERPARAMETERS:
        _add_setting(hp, dest)
    hp.add_argument("--target-modules", default=None,
                    help="comma-separated module names, e.g. q_proj,v_proj")
    p.add_argument("--merge-gap", action="store_true",
                   help="also score the method's approximate merges (HydraLoRA's family: uniform, "
                   "router-mean) and record the gap")


def _add_code_flags(p: argparse.ArgumentParser) -> None:
    """The two opt-ins to code that is not the package's: a model repository's, a model's."""
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the model repository's own code (off by default)")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run model-written code for code tasks (sandboxed); off by default")


def _add_table_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", help="a table spec (`hydrabench list tables`): table1, table2, ...")
    p.add_argument("--profile", default="tiny", help=PROFILE_HELP)
    _add_include_path(p)
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds (default: the table's `seeds:`, else 0)")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="also run the code columns (model-written code, sandboxed)")
    _add_jobs(p)


def _add_jobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once on this machine's CPU, each in its own process with a "
                        "share of the cores (default: 1, in this process); CPU profiles only")


def _check_jobs(args: argparse.Namespace) -> None:
    """--jobs, refused before the matrix is planned (planning fingerprints the base model)."""
    from hydrabench.config.profiles import load_profile
    from hydrabench.pipeline.sweep import check_parallel

    if args.jobs > 1 and getattr(args, "executor", "local") == "slurm":
        raise SpecError("--jobs is for --executor local: on Slurm every run is a job of its own")
    profile = load_profile(args.profile)
    check_parallel(args.jobs, profile.device, profile.eval.get("backend", "hf"),
                   f"profile {args.profile}")


PROFILE_HELP = "a shipped profile (default: tiny, offline CPU) or your own .yaml file"
# The hyper-parameters `sweep` can override in every run of the matrix.
SWEEP_OVERRIDES = ("max_steps", "limit")


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"train": {}, "adapter": {}, "eval": {}}
    for dest, (section, _) in HYPERPARAMETERS.items():
        if getattr(args, dest) is not None:
            out[section][dest] = getattr(args, dest)
    if args.target_modules:
        out["adapter"]["target_modules"] = [m.strip() for m in args.target_modules.split(",")]
    if args.allow_code_execution:
        out["eval"]["allow_code_execution"] = True
    if args.merge_gap:
        out["eval"]["merge_gap"] = True
    return out


RUN_EXAMPLES = """examples:
  hydrabench run --method hydralora --task medical
  hydrabench run --method lora --task general --rank 16 --seed 1
  hydrabench run --method hydralora --task bbh --profile paper --backend vllm"""
EVAL_EXAMPLES = """examples:
  hydrabench eval --model builtin:tiny --task tiny_facts --limit 20
  hydrabench eval --run RUN_ID --task medical
  hydrabench eval --model ./my-model --task lm-eval:arc_easy --backend vllm"""
REPRODUCE_EXAMPLES = """examples:
  hydrabench reproduce table1
  hydrabench reproduce table2 --seeds 0,1,2
  hydrabench reproduce table1 --profile paper"""
SWEEP_EXAMPLES = """examples:
  hydrabench sweep table2 --profile paper --executor slurm
  hydrabench sweep table2 --profile paper --status
  hydrabench sweep table1 --max-steps 5 --limit 10"""


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a flag's type, a missing argument) as one line, like every other
    bad input; the usage block is one --help away."""

    def error(self, message: str) -> NoReturn:
        raise SpecError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hydrabench", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train (or load) a method on a task column and evaluate it",
                         epilog=RUN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--method", required=True,
                     help="a method (`hydrabench list methods`): lora, hydralora, ...")
    run.add_argument("--task", required=True, help="a table column: general, medical, law, ...")
    _add_run_options(run)
    run.add_argument("--dry-run", action="store_true",
                     help="check the inputs, print the plan and one training example as the "
                          "trainer sees it (prompt and target); train and write nothing")

    repro = sub.add_parser("reproduce", help="run every cell of a paper table, then report it",
                           epilog=REPRODUCE_EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_table_options(repro)

    sweep = sub.add_parser("sweep", help="run a table's matrix (rows × tasks × seeds) here or "
                           "as a Slurm job array; --status shows where each run stands",
                           epilog=SWEEP_EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_table_options(sweep)
    sweep.add_argument("--executor", choices=["local", "slurm"], default="local",
                       help="local: one run after another here; slurm: one job per run to do, "
                       "resources from the profile's slurm: section")
    sweep.add_argument("--status", action="store_true",
                       help="only show each run's state: done, running, pending or failed")
    sweep.add_argument("--wait", action="store_true",
                       help="slurm: block until the jobs have left the queue, then show --status")
    sweep.add_argument("--rows", default=None,
                       help="comma-separated row numbers (1-based, as --status lists them)")
    shrink = sweep.add_argument_group("shrink every run, e.g. for a quick check (this changes "
                                      "run ids: pass the same to --status)")
    for dest in SWEEP_OVERRIDES:
        _add_setting(shrink, dest)

    report = sub.add_parser("report", help="write reports/<table>.md/.csv/.tex (figures: also "
                            ".png/.pdf) from records")
    report.add_argument("table", help="a table or figure (`hydrabench list tables`), or all")
    report.add_argument("--profile", default="tiny")
    _add_include_path(report)
    report.add_argument("--seeds", default=None,
                        help="comma-separated (default: every seed the table's records have)")
    report.add_argument("--delta-vs", dest="reference", metavar="ROW", default=None,
                        help='a row label of the table, e.g. "LoRA (r=8)": add a column per '
                        "score of the paired difference to that row, with its 95%% interval")

    ev = sub.add_parser("eval", help="score any causal LM (or a run's artifact) without training",
                        epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a local model directory or a hub id")
    source.add_argument("--run", dest="run_id", help="a finished run whose artifact to score")
    ev.add_argument("--task", required=True,
                    help="a column (general, medical, ...) or any single lm-eval task name; "
                         "lm-eval:NAME for lm-eval's task where a column has that name")
    ev.add_argument("--profile", default="tiny", help=PROFILE_HELP)
    _add_include_path(ev)
    ev.add_argument("--limit", type=int, default=None,
                    help="score only the first N items of the task (a quick check)")
    ev.add_argument("--num-fewshot", type=int, default=None,
                    help="few-shot examples per prompt (default: the task's own)")
    ev.add_argument("--seed", type=int, default=0,
                    help="seed of lm-eval's sampling and few-shot choice (default: 0)")
    ev.add_argument("--force", action="store_true",
                    help="score again even if a finished record exists")
    _add_code_flags(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ev.add_argument("--gen-kwargs", default=None,
                    help="lm-eval's --gen_kwargs over each generation task's own, e.g. "
                         "max_gen_toks=128 where a task's budget exceeds the model's context")
    ev.add_argument("--backend", choices=["hf", "vllm"], default=None,
                    help="hf (default) or vllm (a real server; HydraLoRA-family, molora and "
                         "flylora runs through hydrabench's vLLM plugin)")

    export = sub.add_parser("export", help="write a standalone checkpoint of a run for vLLM "
                            "(merged, or base + adapter for hydrabench's plugin)")
    export.add_argument("run_id")
    export.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run the model repository's own code, for a run "
                        "made with it (off by default; never taken from the record)")
    export.add_argument("--merge", choices=["exact", "uniform", "router-mean"], default=None,
                        help="exact (default): merged weights, or for the methods without an "
                             "exact merge (HydraLoRA's family, molora, flylora) the base "
                             "checkpoint + adapter served by hydrabench's vLLM plugin; "
                             "HydraLoRA's approximate merges: uniform (g = 1/N), router-mean "
                             "(mean gate)")

    claims = sub.add_parser("claims", help="the paper's claims as tests: run what they need, "
                            "then a verdict per claim (reports/claims.md, .csv, .tex)")
    claims.add_argument("file", nargs="?", default="hydralora",
                        help="a claims name (tasks/claims, an --include-path's claims/) or a "
                        ".yaml file (default: hydralora)")
    claims.add_argument("--profile", default="tiny")
    _add_include_path(claims)
    claims.add_argument("--seeds", default=None, help="comma-separated (default: the file's)")
    claims.add_argument("--report-only", action="store_true",
                        help="run nothing: verdicts from the records there are")
    claims.add_argument("--allow-code-execution", action="store_true",
                        help="also run claims on code columns (model-written code, sandboxed)")
    _add_jobs(claims)
    claims.add_argument("--executor", choices=["local", "slurm"], default="local",
                        help="local: the runs here; slurm: each table's runs as a job array, "
                        "as `sweep --executor slurm` submits them")
    claims.add_argument("--wait", action="store_true",
                        help="slurm: block until the jobs have left the queue, then write the "
                        "report")

    compare = sub.add_parser("compare", help="paired difference of two runs on the items both "
                             "scored: bootstrap 95%% CI and McNemar's exact p per task")
    compare.add_argument("run_a")
    compare.add_argument("run_b")

    proto = sub.add_parser("protocols", help="MMLU under lm-eval's and OpenCompass's protocols "
                           "side by side, paired differences and published anchors")
    proto_source = proto.add_mutually_exclusive_group(required=True)
    proto_source.add_argument("--model", help="a local model directory or a hub id")
    proto_source.add_argument("--run", dest="run_id", help="a finished run whose artifact to score")
    proto.add_argument("--benchmark", default="mmlu")
    proto.add_argument("--trust-remote-code", action="store_true",
                       help="let transformers run the model repository's own code (off by "
                       "default; never taken from a run's record)")
    proto.add_argument("--limit", type=int, default=None, help="items per subject")
    proto.add_argument("--protocols", default=None,
                       help="comma-separated (default: all): lm-eval-0shot, lm-eval-5shot, "
                       "opencompass-ppl-0shot, opencompass-ppl-5shot")

    prof = sub.add_parser("profile", help="show a resolved profile")
    prof.add_argument("action", choices=["show"])
    prof.add_argument("name")

    sub.add_parser("doctor", help="print the environment and what will fail for which profile")

    show = sub.add_parser("show", help="a finished run: its scores, training and files")
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true", help="print the whole record as JSON")

    lister = sub.add_parser("list", help="list methods, tasks, profiles, tables or finished runs")
    lister.add_argument("what", choices=["methods", "tasks", "profiles", "tables", "runs"])
    lister.add_argument("--profile", default="tiny")
    lister.add_argument("--method", default=None, help="runs: only this method's")
    lister.add_argument("--task", default=None, help="runs: only this column's")
    _add_include_path(lister)
    return parser


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise SpecError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _seeds(text: str) -> tuple[int, ...]:
    return _ints(text, "--seeds")


def _one_column(task: str) -> str:
    """A run scores one column (the mean of its tasks): a list, as lm-eval's --tasks takes, is
    refused before any work rather than taken as a task (or run id) with a comma in it."""
    if "," in task:
        raise SpecError(f"--task takes one column per run, got {task!r}: run each on its own, "
                        "or score them together as one lm-eval group (lm-eval:GROUP, or your "
                        "own group YAML via --include-path)")
    return task


def _cmd_run(args: argparse.Namespace) -> None:
    from hydrabench.methods import get_method
    from hydrabench.pipeline.resolve import resolve_spec
    from hydrabench.pipeline.run import execute

    spec = resolve_spec(args.method, _one_column(args.task), args.profile, args.seed, args.model,
                        _overrides(args),
                        trust_remote_code=args.trust_remote_code, runs_here=True)
    if args.dry_run:
        _dry_run(spec, force=args.force or args.retrain, retrain=args.retrain)
        return
    record = execute(spec, force=args.force, retrain=args.retrain)
    if record:  # None on the worker processes of a torchrun launch
        from hydrabench.records.store import RunStore, base_record

        base = base_record(RunStore(), record) if get_method(spec.method).trains else None
        _print_metrics(record, base)


def _dry_run(spec, *, force: bool, retrain: bool) -> None:
    """`run --dry-run`: the checks and the plan line, and one training example as the trainer
    sees it; nothing trained, nothing written."""
    from hydrabench.pipeline.run import describe, plan_run, training_example
    from hydrabench.progress import log
    from hydrabench.records.store import RunStore

    store = RunStore()
    if not force and store.has(spec.run_id):
        log(f"{spec.run_id}: finished record found, skipping (use --force to rerun)")
        return
    plan = plan_run(spec, store, retrain=retrain)
    log(describe(plan, store))
    example = training_example(plan)
    if example is not None:
        print(example)


def _eval_spec(args: argparse.Namespace):
    from hydrabench.pipeline.resolve import resolve_spec, retarget

    _one_column(args.task)
    overrides = {"eval": {"limit": args.limit, "num_fewshot": args.num_fewshot,
                          "allow_code_execution": args.allow_code_execution}}
    for flag in ("backend", "gen_kwargs"):
        if getattr(args, flag) is not None:
            overrides["eval"][flag] = getattr(args, flag)
    if args.run_id is None:
        return resolve_spec("base", args.task, args.profile, args.seed, args.model, overrides,
                            lm_eval_task_ok=True, trust_remote_code=args.trust_remote_code,
                            runs_here=True)
    from hydrabench.config.includes import recorded_folders, refuse_folders_not_named
    from hydrabench.records.store import RunStore
    from hydrabench.serving.export import checked_run

    # The record is data: code (remote code, task folders) only as this command line allows.
    store = RunStore()
    trained, _ = checked_run(args.run_id, store, args.trust_remote_code)
    record = store.load(args.run_id)
    return refuse_folders_not_named(args.run_id, recorded_folders(record.profile, trained),
                                    lambda: retarget(trained, args.task, overrides["eval"]))


def _cmd_eval(args: argparse.Namespace) -> None:
    import json

    from hydrabench.pipeline.run import execute

    record = execute(_eval_spec(args), force=args.force)
    if record is None:  # a worker process of a torchrun launch: rank 0 reports
        return
    if args.json:
        from hydrabench.records.store import RunStore

        print(json.dumps({
            "run_id": record.run_id, "record": str(RunStore().record_path(record.run_id)),
            "tasks": {task: {"primary": m.primary, "value": m.value, "stderr": m.stderr,
                             "n": m.n, "metrics": m.metrics}
                      for task, m in record.metrics.items()}}))
    else:
        _print_metrics(record)


def _print_metrics(record: RunRecord, base: RunRecord | None = None) -> None:
    """Value ± stderr (n) per task, and the base model's value beside it from its record."""
    for task, metrics in record.metrics.items():
        stderr = metrics.stderr.get(metrics.primary)
        spread = f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
        baseline = f"  base {base.metrics[task].value:.4f}" if base else ""
        print(f"{task:24s} {metrics.primary:28s} {metrics.value:.4f}{spread}  "
              f"(n={metrics.n}){baseline}")
    from hydrabench.records.store import RunStore

    print(f"record: {RunStore().record_path(record.run_id)}")


def _table_seeds(args: argparse.Namespace) -> tuple[int, ...]:
    """--seeds, else the table spec's `seeds:` (0 unless it names more)."""
    from hydrabench.config.tables import load_table

    return _seeds(args.seeds) if args.seeds else load_table(args.table).seeds


def _plan_sweep(args: argparse.Namespace, overrides: dict[str, dict[str, Any]] | None = None,
                rows: list[int] | None = None) -> Sweep:
    from hydrabench.config.tables import load_table
    from hydrabench.pipeline.run import execute
    from hydrabench.pipeline.sweep import plan_sweep

    return plan_sweep(load_table(args.table), args.profile, _table_seeds(args), execute,
                      overrides=overrides, rows=rows,
                      allow_code_execution=args.allow_code_execution)


def _cmd_reproduce(args: argparse.Namespace) -> None:
    from hydrabench.reports import write_report

    _check_jobs(args)
    _plan_sweep(args).run_local(args.jobs)
    for path in write_report(args.table, args.profile, _table_seeds(args)):
        print(path)


def _cmd_sweep(args: argparse.Namespace) -> None:
    from hydrabench.pipeline.sweep import check_slurm_installed, format_status

    _check_jobs(args)
    if args.executor == "slurm" and not args.status:
        check_slurm_installed()  # before planning the matrix (a minute for a whole table)
    overrides: dict[str, dict[str, Any]] = {}
    for dest in SWEEP_OVERRIDES:
        if getattr(args, dest) is not None:
            overrides.setdefault(HYPERPARAMETERS[dest][0], {})[dest] = getattr(args, dest)
    sweep = _plan_sweep(args, overrides, list(_ints(args.rows, "--rows")) if args.rows else None)
    if args.status:
        print(format_status(sweep.status()))
    elif args.executor == "local":
        sweep.run_local(args.jobs)
    else:
        sweep.submit_slurm()
        if args.wait:
            statuses = sweep.wait()
            print(format_status(statuses))
            failed = sum(s.state == "failed" for s in statuses)
            if failed:
                raise SpecError(f"{failed} run(s) failed; their logs are named above")


def _cmd_report(args: argparse.Namespace) -> None:
    from hydrabench.config.tables import table_names
    from hydrabench.reports import write_report

    if args.reference is not None and args.table == "all":
        raise SpecError("--delta-vs names a row of one table; give that table, not all")
    from hydrabench.reports.figures import NoFigureData

    for name in table_names() if args.table == "all" else [args.table]:
        try:
            paths = write_report(name, args.profile, _seeds(args.seeds) if args.seeds else None,
                                 reference=args.reference, say=_say)
        except NoFigureData as err:
            if args.table != "all":
                raise
            _say(f"skipped {err}")  # `all` writes what there is data for
            continue
        for path in paths:
            print(path)


def _say(line: str) -> None:
    """A report's note to the person running it (seeds left out), on stderr."""
    print(f"hydrabench: {line}", file=sys.stderr)


def _cmd_claims(args: argparse.Namespace) -> None:
    from hydrabench.pipeline.sweep import check_slurm_installed
    from hydrabench.reports.claims import run_claims

    _check_jobs(args)
    if args.executor == "slurm" and not args.report_only:
        check_slurm_installed()  # before planning the runs
    for path in run_claims(args.file, args.profile, _seeds(args.seeds) if args.seeds else None,
                           report_only=args.report_only,
                           allow_code_execution=args.allow_code_execution, jobs=args.jobs,
                           executor=args.executor, wait=args.wait):
        print(path)


def _cmd_export(args: argparse.Namespace) -> None:
    from hydrabench.serving.export import export_run

    print(export_run(args.run_id, args.merge, trust_remote_code=args.trust_remote_code))


def _cmd_compare(args: argparse.Namespace) -> None:
    from hydrabench.evaluation.significance import compare_runs, format_comparisons

    print(format_comparisons(args.run_a, args.run_b, compare_runs(args.run_a, args.run_b)))


def _cmd_protocols(args: argparse.Namespace) -> None:
    from hydrabench.reports.protocols import run_protocols

    names = [n.strip() for n in args.protocols.split(",")] if args.protocols else None
    for path in run_protocols(model=args.model, run_id=args.run_id, benchmark=args.benchmark,
                              limit=args.limit, names=names,
                              trust_remote_code=args.trust_remote_code):
        print(path)


def _cmd_profile(args: argparse.Namespace) -> None:
    import yaml

    from hydrabench.config.profiles import load_profile

    print(yaml.safe_dump(load_profile(args.name).to_dict(), sort_keys=False, allow_unicode=True),
          end="")


def _cmd_doctor(args: argparse.Namespace) -> None:
    from hydrabench.doctor import report

    print("\n".join(report()))


def _cmd_list(args: argparse.Namespace) -> None:
    if args.what != "runs" and (args.method or args.task):
        raise SpecError("--method and --task filter `list runs` only")
    if args.what == "methods":
        from hydrabench.methods import METHODS

        for m in METHODS.values():
            serving = ("" if m.mergeable else "  [vllm: unmerged, by the plugin]"
                       if m.served_by_plugin else "  [hf backend only]")
            print(f"{m.name:20s} {m.description}{serving}")
    elif args.what == "tasks":
        from hydrabench.config.profiles import load_profile

        for name, task in load_profile(args.profile).tasks.items():
            print(f"{name:10s} corpus={task.corpus:40s} eval={','.join(task.eval)}")
    elif args.what == "profiles":
        from hydrabench.config.profiles import load_profile, profile_names

        for name in profile_names():
            print(f"{name:10s} {load_profile(name).description}")
    elif args.what == "runs":
        from hydrabench.records.store import RunStore, matching_runs, run_lines

        records = matching_runs(RunStore().records(), args.method, args.task)
        print("\n".join(run_lines(records)) if records else "no finished runs"
              + (" matching --method/--task" if args.method or args.task else ""))
    else:
        from hydrabench.config.tables import load_table, table_names

        for name in table_names():
            print(f"{name:10s} {load_table(name).title}")


def _cmd_show(args: argparse.Namespace) -> None:
    import json

    from hydrabench.records.store import RunStore, describe_run

    store = RunStore()
    record = store.load(args.run_id)
    print(json.dumps(record.to_dict(), indent=2) if args.json
          else "\n".join(describe_run(record, store.record_path(args.run_id))))


def _use_included_folders(args: argparse.Namespace) -> None:
    """This command's own task folders: --include-path's and the profile's include_path, each
    checked before any work (a process running main again starts from none)."""
    from hydrabench.config.includes import include, use_only

    use_only(getattr(args, "include_path", []), "--include-path")
    if hasattr(args, "include_path"):
        from hydrabench.config.profiles import load_profile

        include(load_profile(args.profile).include_path, f"profile {args.profile}: include_path")


def _version() -> str:
    from importlib import metadata

    return metadata.version("hydrabench")


COMMANDS = {"run": _cmd_run, "eval": _cmd_eval, "reproduce": _cmd_reproduce,
            "sweep": _cmd_sweep, "report": _cmd_report, "export": _cmd_export,
            "doctor": _cmd_doctor, "profile": _cmd_profile, "show": _cmd_show,
            "compare": _cmd_compare, "protocols": _cmd_protocols, "claims": _cmd_claims,
            "list": _cmd_list}

UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _use_included_folders(args)
        COMMANDS[args.command](args)
    except SpecError as err:
        print(f"hydrabench: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a folder hydrabench must write to refuses it (read-only, full)
        if err.errno not in UNWRITABLE or err.filename is None:
            raise
        print(f"hydrabench: error: cannot write {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; the shell's 128 + SIGINT
        print("hydrabench: interrupted; finished runs and trained artifacts are kept (a rerun "
              "resumes a training from its last checkpoint)", file=sys.stderr)
        return 130
    finally:
        from hydrabench.training import distributed
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
