"""The `moce` command: run an experiment's pipeline, change k, compare k, use and evaluate the trained models.

Every command takes `--experiment NAME|PATH` (default: $MOCE_EXPERIMENT, else `demo`). A name is a file in
configs/experiments/; a path is any experiment file (copy configs/experiments/demo.yaml to start your own).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moce_model.experiment import Experiment

# The library (and torch with it) is imported only once a command runs, so that `moce --help` answers at once.

# The UI page of the whole asset graph (Dagster's global asset lineage), printed where the UI is offered.
ASSET_GRAPH_PATH = "/asset-groups"
EPILOG = """\
examples:
  moce run                                  the demo, end to end (what `make demo` does)
  moce run --experiment my_data.yaml        your own experiment file (start from configs/experiments/demo.yaml)
  moce run --select 'group:data or group:embedding or group:clustering'
                                            only the data half: sources -> embeddings -> clusters
  moce set-k 5 && moce run                  use 5 clusters; re-runs only what depends on k
  moce sweep --ks 2,3,4,6                   train and evaluate `moce` at each k, one comparison table
  moce study --experiment realmix           every variant over 3 seeds on held-out real data, one table
  moce generate "What is 17 * 6?"           answer with the trained `moce` model, routed by cluster
  moce eval                                 evaluate the trained models on the demo benchmarks
  moce ui                                   the Dagster UI on http://127.0.0.1:3000
  moce doctor                               check the experiment's Dagster instance, repair what it can

run, sweep and study submit their runs to the experiment's Dagster run queue (as the UI does), with a daemon
(`dagster dev`) they start and stop; see docs/orchestration.md.

One experiment, one writer: run, set-k, sweep, study, ui and doctor hold the experiment's lock
(<storage_root>/.moce.lock) while they run; a second one waits for the first, saying which process and command
holds it, or with --no-wait exits with status 75 at once.

Artifacts go to the experiment's storage_root (.moce_data/<experiment> by default); Dagster's run history
goes to <storage_root>/dagster_home unless DAGSTER_HOME is set.
"""


def _select_experiment(name: str | None) -> Experiment:
    """Load the experiment and make it the one the Definitions (and any `dagster` process started from here)
    load: they read MOCE_EXPERIMENT."""
    from moce_model.experiment import (
        EXPERIMENT_ENV,
        experiment_path,
        load_experiment,
        selected_experiment,
    )

    chosen = name or selected_experiment()
    experiment = load_experiment(chosen)
    os.environ[EXPERIMENT_ENV] = str(experiment_path(chosen))
    return experiment


def _definitions(experiment: Experiment):
    from pipelines.definitions import build_definitions

    return build_definitions(experiment)


def cmd_run(args: argparse.Namespace, experiment: Experiment) -> int:
    import dagster as dg

    from pipelines.instance import experiment_instance
    from pipelines.queue import RunQueue, workspace_file
    from pipelines.runner import how_to_run, materialize_unsynced

    defs = _definitions(experiment)
    selection = None
    if args.select:
        try:
            selection = dg.AssetSelection.from_string(args.select)
            selected = selection.resolve(defs.resolve_asset_graph())
        except Exception as err:  # Dagster raises several error types for a bad selection string
            raise SystemExit(f"moce run: --select {args.select!r}: {err}") from None
        if not selected:
            raise SystemExit(f"moce run: --select {args.select!r} selects no asset of experiment {experiment.name!r}")
    if not args.dry_run and _evaluates(defs, selection):
        experiment.check_devices()  # now, not after hours of training
    instance = experiment_instance(experiment)
    print(f"experiment={experiment.name} storage={experiment.storage_root} DAGSTER_HOME={instance.root_directory}")
    if experiment.description:
        print(experiment.description)
    with RunQueue(instance, workspace=workspace_file()) as queue:
        ok = materialize_unsynced(defs, instance, selection, queue=queue, dry_run=args.dry_run)
    report = experiment.storage_root / "report" / "benchmark_report.md"
    if ok and report.exists():
        print(f"\nbenchmark report: {report}")
    print(f"explore the lineage, plots and metadata: {how_to_run('ui')}  "
          f"(then open http://127.0.0.1:3000{ASSET_GRAPH_PATH})")
    return 0 if ok else 1


def _evaluates(defs, selection) -> bool:
    """Whether the run of `selection` (None: the whole pipeline) holds an evaluation step."""
    from pipelines.definitions import PIPELINE

    graph = defs.resolve_asset_graph()
    return any(graph.get(key).group_name == "evaluation" for key in (selection or PIPELINE).resolve(graph))


def cmd_set_k(args: argparse.Namespace, experiment: Experiment) -> int:
    import dagster as dg

    from pipelines.instance import experiment_instance

    if args.k < 2:
        raise SystemExit(f"moce set-k: k={args.k}: need at least 2 clusters")
    instance = experiment_instance(experiment)
    result = _definitions(experiment).resolve_job_def("demo_pipeline").execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey("selected_k")],
        run_config={"ops": {"selected_k": {"config": {"k": args.k}}}},
        raise_on_error=False,
    )
    if not result.success:
        print("selected_k FAILED; see the errors above (is the data half materialized? `moce run`)", file=sys.stderr)
        return 1
    print(f"selected_k = {args.k}. `moce run` now re-runs what depends on k (and nothing else). To keep this k "
          f"when the elbow curve is recomputed, set clustering.k in the experiment file.")
    return 0


def cmd_sweep(args: argparse.Namespace, experiment: Experiment) -> int:
    from pipelines.instance import experiment_instance
    from pipelines.queue import RunQueue, threads_per_run, workspace_file
    from pipelines.sweep import run_sweep

    try:
        ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    except ValueError:
        raise SystemExit(f"moce sweep: --ks {args.ks!r}: expected numbers separated by commas, e.g. 2,3,4") from None
    if not ks or min(ks) < 2:
        raise SystemExit(f"moce sweep: --ks {args.ks!r}: every k must be at least 2")
    if args.max_steps is not None and args.max_steps < 1:
        raise SystemExit(f"moce sweep: --max-steps {args.max_steps}: need at least 1 training step")
    instance = experiment_instance(experiment, run_slots=args.workers)
    print(f"experiment={experiment.name} storage={experiment.storage_root} DAGSTER_HOME={instance.root_directory}")
    with RunQueue(instance, workspace=workspace_file(), environment=threads_per_run(instance, len(ks))) as queue:
        return 0 if run_sweep(_definitions(experiment), instance, queue, ks, max_steps=args.max_steps) else 1


def cmd_study(args: argparse.Namespace, experiment: Experiment) -> int:
    from pipelines.instance import experiment_instance
    from pipelines.queue import RunQueue, workspace_file
    from pipelines.study import run_study

    instance = experiment_instance(experiment, run_slots=args.workers)
    with RunQueue(instance, workspace=workspace_file()) as queue:
        return run_study(experiment, instance, queue, runs=[key for key in args.runs.split(",") if key],
                         rerun=args.rerun, conditions=not args.no_conditions)


def _merged_model_dir(experiment: Experiment, variant: str) -> Path:
    return experiment.storage_root / "artifacts" / "merged_model" / variant


def cmd_generate(args: argparse.Namespace, experiment: Experiment) -> int:
    from moce_model.generate import main as generate_main

    model = args.model or _merged_model_dir(experiment, args.variant)
    if not Path(model).is_dir():
        raise SystemExit(f"moce generate: no model at {model}: train it first (`moce run`) or give --model DIR")
    prompt_format = args.prompt_format or experiment.base_model.prompt_format
    return generate_main(["--model", str(model), "--max-new-tokens", str(args.max_new_tokens),
                          "--prompt-format", prompt_format, *args.prompts])


def cmd_eval(args: argparse.Namespace, experiment: Experiment) -> int:
    from moce_model.evaluation.__main__ import main as evaluate_main

    if experiment.evaluation.benchmarks != "demo":
        raise SystemExit(f"moce eval runs the demo benchmarks; experiment {experiment.name!r} uses "
                         f"{experiment.evaluation.benchmarks!r} ones: materialize benchmark_results with `moce run`")
    models = args.model or [f"{variant}={_merged_model_dir(experiment, variant)}" for variant in experiment.variants
                            if _merged_model_dir(experiment, variant).is_dir()]
    if not models:
        raise SystemExit(f"moce eval: no trained model in {experiment.storage_root / 'artifacts' / 'merged_model'}: "
                         f"run `moce run` first or give --model VARIANT=DIR")
    settings = experiment.evaluation

    def count(value: int | None) -> str:
        return "all" if value is None else str(value)

    argv = ["--n-per-domain", str(settings.generation_items_per_domain),
            "--n-loss-per-domain", str(settings.loss_items_per_domain),
            "--humaneval-items", count(settings.humaneval_items), "--gsm8k-items", count(settings.gsm8k_items),
            "--seed", str(experiment.seed), "--prompt-format", experiment.base_model.prompt_format,
            "--device", settings.device, "--dtype", settings.dtype]
    for model in models:
        argv += ["--model", model]
    return evaluate_main([*argv, *(["--show-items"] if args.show_items else []), *args.evaluation_args])


def cmd_ui(args: argparse.Namespace, experiment: Experiment) -> int:
    from moce_model.experiment import REPO_ROOT
    from pipelines.instance import experiment_instance, held_lock_descriptors

    experiment_instance(experiment)
    os.chdir(REPO_ROOT)
    command = [sys.executable, "-m", "dagster", "dev", "-h", args.host, "-p", str(args.port), "-w", "workspace.yaml"]
    print(f"experiment={experiment.name} DAGSTER_HOME={os.environ['DAGSTER_HOME']}: {' '.join(command[2:])}")
    print(f"the asset graph: http://{args.host}:{args.port}{ASSET_GRAPH_PATH}")
    sys.stdout.flush()
    # `dagster dev` launches runs on this instance: it keeps the experiment's lock (the same open file) until it ends.
    for descriptor in held_lock_descriptors():
        os.set_inheritable(descriptor, True)
    os.execv(sys.executable, command)
    return 0  # not reached


def cmd_doctor(args: argparse.Namespace, experiment: Experiment) -> int:
    from pipelines.instance import (
        InstanceDamaged,
        experiment_instance,
        repair_alembic_versions,
    )

    home = Path(os.environ.get("DAGSTER_HOME") or experiment.storage_root / "dagster_home")
    if not home.is_dir():
        print(f"experiment={experiment.name}: no Dagster instance yet at {home}: nothing to check")
        return 0
    print(f"experiment={experiment.name} DAGSTER_HOME={home}")
    try:
        found = repair_alembic_versions(home, dry_run=args.dry_run)
    except InstanceDamaged as error:
        print(f"moce doctor: {error}", file=sys.stderr)
        return 1
    for line in found:
        print(f"  {line}")
    if not found:
        print("  every SQLite storage has one alembic_version row")
    if args.dry_run:
        return 1 if found else 0
    try:
        instance = experiment_instance(experiment)
        runs = instance.get_runs_count()
        instance.all_instigator_state()  # reads the schedule storage, where the duplicate rows were seen
    except Exception as error:  # whatever stops the instance from opening is the finding
        print(f"moce doctor: the instance still does not open: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"the instance opens: {runs} runs in its history")
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The `moce` command's parser. Long: one block per subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--experiment", "-e", metavar="NAME|PATH",
                        help="experiment name in configs/experiments/ or path of an experiment file "
                             "(default: $MOCE_EXPERIMENT, else demo)")
    writer = argparse.ArgumentParser(add_help=False, parents=[common])
    writer.add_argument("--no-wait", action="store_true",
                        help="when another command holds the experiment, exit at once (status 75) instead of waiting")
    writer.set_defaults(writes=True)
    queued = argparse.ArgumentParser(add_help=False, parents=[writer])
    queued.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                        help="at most N runs (and N training steps) at once: written to the instance's run queue "
                             "limits (dagster.yaml), which the UI's runs share (default: the file's, first written "
                             "as one per core or GPU; MOCE_RUN_SLOTS)")
    parser = argparse.ArgumentParser(prog="moce", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", parents=[writer], help="materialize what is missing or stale",
                              description="Materialize every asset of the experiment that is missing or stale (new "
                                          "code, new inputs), and everything downstream of it. Nothing changed: "
                                          "nothing runs.")
    run.add_argument("--select", metavar="SELECTION",
                     help="only these assets, in Dagster's selection syntax, e.g. 'group:clustering', "
                          "'key:selected_k+' (it and downstream), 'group:data or group:embedding or group:clustering'")
    run.add_argument("--dry-run", action="store_true", help="print what would run and why, run nothing")
    run.set_defaults(handler=cmd_run)

    set_k = commands.add_parser("set-k", parents=[writer], help="choose the number of clusters k",
                                description="Materialize selected_k with this k instead of the elbow's knee; then "
                                            "`moce run` re-runs exactly what depends on k.")
    set_k.add_argument("k", type=int, help="number of clusters (= expert groups), at least 2")
    set_k.set_defaults(handler=cmd_set_k)

    sweep = commands.add_parser("sweep", parents=[queued], help="train and evaluate `moce` at several k",
                                description="For each k, one run of the k_sweep job (a partition of its assets): "
                                            "fit the centroids, train `moce`, merge it and check the merged model "
                                            "against the unmerged one, evaluate. Then one table with every "
                                            "benchmark at every materialized k (asset k_sweep/comparison). What "
                                            "the sweep reads (instructions, embeddings, base model) is "
                                            "materialized first when missing or stale; nothing that depends on "
                                            "the main graph's k is touched.")
    sweep.add_argument("--ks", required=True, help="the k values, comma separated, e.g. 2,3,4,6")
    sweep.add_argument("--max-steps", type=int, default=None, help="training steps per k (default: the experiment's)")
    sweep.set_defaults(handler=cmd_sweep)

    study = commands.add_parser("study", parents=[queued], help="the paper's comparison in miniature, over seeds",
                                description="Train and evaluate base, dense_adapter, pesc, moce (2 and 4 experts per "
                                            "group), random_group, cluster_only, and moce and pesc with the AC "
                                            "router over 3 seeds on the experiment's data with a held-out split; "
                                            "score each run again with corrupted prompts and with centroids adapted "
                                            "to the held-out prompts (study_conditions); one table of means with "
                                            "intervals over seeds and items, and one figure (job `study`, one "
                                            "partition per run).")
    study.add_argument("--runs", default="", help="comma-separated run keys, e.g. base,moce/e4/s0 (default: all); "
                                                  "as many run side by side as the instance's run queue allows")
    study.add_argument("--rerun", action="store_true", help="run partitions again even when materialized")
    study.add_argument("--no-conditions", action="store_true",
                       help="leave out the evaluation-only conditions (study_conditions) of each run")
    study.set_defaults(handler=cmd_study)

    generate = commands.add_parser("generate", parents=[common], help="answer prompts with a trained model",
                                   description="Answer prompts with a merged model; prints the cluster / expert "
                                               "group each prompt was routed to.")
    generate.add_argument("prompts", nargs="+", metavar="PROMPT", help="the request text(s)")
    generate.add_argument("--variant", default="moce", help="which of the experiment's models (default: moce)")
    generate.add_argument("--model", default=None, metavar="DIR", help="a merged model directory instead")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    # The names are checked by moce_model.generate, whose import (torch) waits until a command runs.
    generate.add_argument("--prompt-format", default=None, metavar="FORMAT",
                          help="the prompt format the model was trained with: auto, chat_template or "
                               "human_assistant (default: the experiment's base_model.prompt_format)")
    generate.set_defaults(handler=cmd_generate)

    evaluate = commands.add_parser("eval", parents=[common], help="evaluate models on the demo benchmarks",
                                   description="Evaluate model directories on the experiment's demo benchmarks, with "
                                               "its sizes, prompt format, device and dtype; prints scores with "
                                               "intervals and the paired comparison.")
    evaluate.add_argument("--model", action="append", metavar="VARIANT=DIR",
                          help="a model and its name; repeat for several (default: every trained variant)")
    evaluate.add_argument("--show-items", action="store_true", help="print every prompt's completion")
    evaluate.add_argument("evaluation_args", nargs=argparse.REMAINDER,
                          help="after --: options of python -m moce_model.evaluation, e.g. -- --threads 1")
    evaluate.set_defaults(handler=cmd_eval)

    ui = commands.add_parser("ui", parents=[writer], help="open the Dagster UI (dagster dev)",
                             description="Start `dagster dev` on the experiment's instance: the asset graph, "
                                         "lineage, plots and metadata of everything `moce run` materialized.")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(handler=cmd_ui)

    doctor = commands.add_parser("doctor", parents=[writer], help="check and repair the experiment's Dagster instance",
                                 description="Find what keeps the experiment's Dagster instance from opening and "
                                             "repair it without losing its run history: a SQLite storage with "
                                             "several alembic_version rows (\"more than one head present\", left "
                                             "by two commands that created the instance at once) keeps the one of "
                                             "the newest migration. Then opens the instance.")
    doctor.add_argument("--dry-run", action="store_true",
                        help="say what is wrong, change nothing (status 1 when something is)")
    doctor.set_defaults(handler=cmd_doctor)
    return parser


# sysexits.h EX_TEMPFAIL: the experiment is busy, try again later.
EXIT_BUSY = 75


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "evaluation_args", None) and args.evaluation_args[0] == "--":
        args.evaluation_args = args.evaluation_args[1:]
    from moce_model.experiment import ExperimentError

    try:
        experiment = _select_experiment(args.experiment)
    except ExperimentError as err:
        print(f"moce {args.command}: {err}", file=sys.stderr)
        return 2
    from pipelines.instance import ExperimentBusy, InstanceDamaged, experiment_lock
    from pipelines.queue import RunQueueError

    try:
        # Each of these evaluates on evaluation.device: checked before the lock creates the storage root.
        # (`moce run --select` checks in cmd_run, where the selection is known.)
        evaluating_run = args.command == "run" and not args.dry_run and not args.select
        if args.command in ("sweep", "study", "eval") or evaluating_run:
            experiment.check_devices()
        if not getattr(args, "writes", False):
            return args.handler(args, experiment)
        with experiment_lock(experiment.storage_root, shlex.join(["moce", *argv]), wait=not args.no_wait):
            return args.handler(args, experiment)
    except ExperimentError as err:
        print(f"moce {args.command}: {err}", file=sys.stderr)
        return 2
    except ExperimentBusy as busy:
        print(busy, file=sys.stderr)
        return EXIT_BUSY
    except InstanceDamaged as damage:
        print(f"moce {args.command}: {damage}", file=sys.stderr)
        return 1
    except RunQueueError as error:
        print(f"moce {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
