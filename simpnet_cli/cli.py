"""simpnet: the command line. Subcommands take Hydra overrides (key=value) and a few --flags.

  simpnet list                               tables and their rows
  simpnet show table=4 [row=WE10] [--json]   each row's resolved network and parameter counts
  simpnet run table=4 [row=WE10] [seeds=3] [profile=smoke] [--dry-run]
  simpnet run table=4 row=WE10 logger=[csv,tensorboard] --cfg job   (each resolved run as YAML; trains nothing)
  simpnet run -m table=4 row=WE10,BW10 hydra/launcher=submitit_slurm   (one cluster job per row)
  simpnet report [table=4] [--latex]         results/REPORT.md beside the paper's figures
  simpnet bench [bench.rows=[2/8L]]          images/s of the eager loop and the runner's path
  simpnet repair [table=4]                   rebuild results/table<N>.csv from the run folders (or: simpnet index)
  simpnet export run_dir=PATH [format=onnx]  a finished run's network as TorchScript or ONNX
  simpnet CMD --help                         a command's keys, with examples; simpnet --version

Loggers: logger=[csv,tensorboard] or logger=[csv,mlflow] (curve.csv always). In Python:
simpnet_cli.build_model(table=4, row="WE10"), simpnet_cli.load_model(run_dir), simpnet_cli.read_runs(table=4).

Bad input gets one line on stderr and exit code 2; --debug shows the traceback instead.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from simpnet_cli.errors import UserError

if TYPE_CHECKING:  # imported where used, to keep `simpnet list` quick
    from simpnet_cli.runs import runner

USAGE = "usage: simpnet COMMAND [KEY=VALUE ...] [--FLAGS]\n\n" + "\n\n".join(__doc__.split("\n\n")[1:3])
FLAGS = {"--json", "--debug", "--dry-run", "--latex", "-m", "--multirun", "--help", "-h"}
# The flags each command reads (and --debug, --help everywhere): any other is refused, not silently ignored
# (`simpnet run --json` would otherwise train with no JSON anywhere).
COMMAND_FLAGS = {"list": {"--json"}, "show": {"--json", "--cfg=job"}, "run": {"--dry-run", "-m", "--multirun", "--cfg=job"},
                 "report": {"--latex"}, "bench": {"--json"}, "repair": set(), "index": set(), "export": set()}


def compose(overrides: list[str]):
    """(the config for ``overrides``, their row overrides): config/compose.py, Hydra's composition."""
    from simpnet_cli.config import compose as composition

    return composition.compose(overrides)


def check_options(cfg) -> None:
    """Every top-level key (config/schemas.py: check_top), checked before anything is planned or trained."""
    from simpnet_cli.config import schemas, tables

    schemas.check_top(tables.to_plain(cfg))


def options(cfg) -> runner.Options:
    from simpnet_cli.runs import runner
    from simpnet_cli.train import callbacks

    check_options(cfg)
    logger = cfg.get("logger")  # a list from the command line is a ListConfig; logger_names checks the names
    return runner.Options(
        data_dir=Path(str(cfg.data_dir)), download=bool(cfg.download),
        results_dir=Path(str(cfg.results_dir)), runs_dir=Path(str(cfg.runs_dir)),
        device=str(cfg.profile.get("device", "auto") if cfg.device == "auto" else cfg.device),
        jobs_per_device="auto" if cfg.jobs_per_device == "auto" else int(cfg.jobs_per_device),
        profile=str(cfg.profile.name), quiet=bool(cfg.quiet),
        shard=cfg.get("shard"), shards=cfg.get("shards"),
        stack=cfg.get("stack", "auto"), stack_mode=str(cfg.get("stack_mode", "grouped")),
        logger=callbacks.logger_names(logger if logger is None or isinstance(logger, str) else list(logger)))


def chosen_tables(cfg, variant) -> list:
    """The tables a command names; a network in no table (``arch=`` without ``table=``) is a table of one row."""
    from simpnet_cli.config import tables

    tables.use_conf_dir(tables.user_conf_dir(cfg.conf_dir))  # (again: a cluster job starts in a new process)
    named = [f"custom.{k}" for k in ("row", "label") if cfg.custom.get(k) is not None]
    if named and not (cfg.table is None and "arch" in variant.choices):
        raise UserError(f"{' and '.join(named)} name{'s' * (len(named) == 1)} a network of your own (arch=NAME without table=); "
                        f"a table's rows are chosen with row=")
    if cfg.table is None and "arch" in variant.choices:
        return [tables.custom_table(str(cfg.custom.table), variant.choices["arch"], tables.to_plain(cfg.custom))]
    if cfg.table is None:
        raise UserError("say which table: table=4, table=14b, table=[2,3] or table=all "
                        "(or arch=NAME 'net.widths=...' for a network of your own)")
    return tables.load_tables(tables.to_plain(cfg.table))


def plan_runs(cfg, variant):
    from simpnet_cli.runs import runner
    from simpnet_cli.config import tables

    profile = tables.to_plain(cfg.profile)
    run_opts = {"precision": cfg.precision} if cfg.precision else None
    data_opts = {"svhn": {"extra": bool(cfg.svhn_extra)}} if cfg.svhn_extra is not None else None
    return runner.plan(chosen_tables(cfg, variant), tables.to_plain(cfg.row), tables.to_plain(cfg.seeds),
                       profile, run_opts, data_opts, variant, base_profile(cfg))


def base_profile(cfg) -> dict | None:
    """The profile as its file says, before profile.* keys of the command line: what a run is compared with to
    name its variant (a run with profile.train.eval_every=4 is not the paper's row, whatever the words typed)."""
    from simpnet_cli.config import tables

    try:
        return tables.load_named("profile", str(cfg.profile.name))
    except UserError:  # a profile of one's own whose `name` is not its file's: nothing to compare with
        return None


def table_selector(cfg):
    """``table=`` as given, or every table when it is not given (list, show, report)."""
    from simpnet_cli.config import tables

    tables.use_conf_dir(tables.user_conf_dir(cfg.conf_dir))
    return "all" if cfg.table is None else tables.to_plain(cfg.table)


# --------------------------------------------------------------------------- subcommands

def _origin(table) -> str:
    from simpnet_cli.config import tables

    if table.path is None:
        return "command line"
    try:
        return f"built-in: conf/tables/{table.path.relative_to(tables.DEFAULT_CONF_DIR / 'tables')}"
    except ValueError:
        return str(table.path)


def cmd_list(cfg, flags, variant) -> int:
    from simpnet_cli.config import tables

    chosen = tables.load_tables(table_selector(cfg))
    if "--json" in flags:
        print(json.dumps([{"table": t.name, "title": t.title, "origin": _origin(t), "cited": len(t.cited),
                           "rows": [{"id": r["id"], "label": r["label"],
                                     "dataset": r["dataset"] if isinstance(r["dataset"], str) else r["dataset"]["base"]}
                                    for r in t.rows]} for t in chosen], indent=1))
        return 0
    for t in chosen:
        print(f"Table {t.name}: {t.title}  [{_origin(t)}]")
        for r in t.rows:
            dataset = r["dataset"] if isinstance(r["dataset"], str) else r["dataset"]["base"]
            print(f"  {r['id']:<14} {r['label']}  [{dataset}]")
        if t.cited:
            print(f"  ({len(t.cited)} cited rows of other papers, not trained)")
    return 0


def show_records(cfg, variant=None) -> list[dict]:
    """Each chosen row's resolved network (a variant's, with its overrides), validated as a run would be."""
    from simpnet_cli.nets import specs as network
    from simpnet_cli.runs import runner
    from simpnet_cli.config import tables
    from simpnet_cli.config import variants

    variant = variant or variants.RowOverrides()
    if cfg.table is None and "arch" not in variant.choices:
        chosen = tables.load_tables("all")
    else:
        chosen = chosen_tables(cfg, variant)
    records = []
    for run in runner.plan(chosen, tables.to_plain(cfg.row), [0], tables.to_plain(cfg.profile),
                           {"precision": cfg.precision} if cfg.precision else None, None, variant,
                           base_profile(cfg)):
        paper_p, total_p = network.count_params(run.spec, run.in_shape)
        records.append({
            "table": run.table, "row": run.label, "row_id": run.row_id, "variant": run.variant,
            "dataset": run.dataset["name"], "notation": run.net.get("widths"), "layers": network.tokens(run.spec),
            "counted_params": paper_p, "params_total": total_p,
            "paper_params": run.paper.get("params"), "paper_acc": run.paper.get("acc"),
            "solver": run.solver["type"], "iterations": run.train["iterations"], "config_hash": run.config_hash,
            "recipe": run.recipe(), "solver_config": run.solver,
            "layer_table": network.layer_table(run.spec, run.in_shape), "notes": list(run.notes),
            "authors_runs": authors_records(run),
        })
    return records


def authors_records(run) -> list[dict]:
    """The authors' logs of a run's row (runs/authors.py): best, final, hours... one dict per log."""
    from simpnet_cli.runs import authors

    logs = authors.runs_of(run.table, run.row_id).drop(columns=["table", "row", "row_id"])
    return json.loads(logs.to_json(orient="records"))


def cmd_show(cfg, flags, variant) -> int:
    records = show_records(cfg, variant)
    if "--json" in flags:
        print(json.dumps([{k: v for k, v in r.items() if k != "layer_table"} for r in records], indent=1))
        return 0
    for rec in records:
        print(f"Table {rec['table']} / {rec['row_id']}: {rec['row']}  ({rec['dataset']}, {rec['solver']}, "
              f"{rec['iterations']} iterations)")
        if rec["variant"]:
            print(f"  variant: {rec['variant']}")
        for note in rec["notes"]:
            print(f"  note: {note}")
        print(f"  {' '.join(rec['layers'])}")  # the reference's token line, then layer by layer
        print(f"  {'layer':<40} {'output':>12} {'params':>10}")
        for tokens, shape, params in rec["layer_table"]:
            out = f"{shape.c}x{shape.h}x{shape.w}" if (shape.h, shape.w) != (1, 1) else str(shape.c)
            if len(tokens) > 40:  # a residual block or fire module: its tokens on a line of their own
                print(f"  {tokens}")
                tokens = ""
            print(f"  {tokens:<40} {out:>12} {params:>10,}")
        print(f"  params: {rec['counted_params']:,} conv+fc (paper: {rec['paper_params'] or '-'}), "
              f"{rec['params_total']:,} trainable with BatchNorm")
        print(f"  recipe: {recipe_line(rec['recipe'])}")
        print(f"  solver: {solver_line(rec['solver_config'])}")
        from simpnet_cli.runs import authors

        for line in authors.show_lines(rec["table"], rec["row_id"]):
            print(f"  {line}")
    return 0


def solver_line(solver: dict) -> str:
    """A run's solver and its learning-rate schedule on one line (`simpnet show`): "adadelta lr 0.1, rho 0.9, eps
    0.001, weight decay 0.005; lr x0.1 at [50000, 95000]" or "...; lr 0.1 from 0, 0.01 from 5000"."""
    def word(value) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    settings = [f"{key.replace('_', ' ')} {word(value)}" for key, value in solver.items() if key not in ("type", "schedule")]
    schedule = dict(solver.get("schedule") or {})
    kind = schedule.pop("kind", None)
    if kind == "multistep":
        plan = f"lr x{word(schedule.get('gamma'))} at {schedule.get('steps')}"
    elif kind == "piecewise":
        plan = "lr " + ", ".join(f"{word(lr)} from {it}" for it, lr in (schedule.get("points") or {}).items())
    else:  # another kind: its keys as they are
        plan = f"{kind} schedule " + ", ".join(f"{k} {v}" for k, v in schedule.items()) if kind else "constant lr"
    return f"{solver.get('type')} {', '.join(settings)}; {plan}"


def recipe_line(recipe: dict) -> str:
    """A run's recipe on one line, in the reference's words (`simpnet show`)."""
    init, mults = recipe["init"], recipe["param_mults"]
    fill = init["default"] + (f", N(0, {init['gaussian_std']:g}) on convs {init['on_convs']}" if init["on_convs"] else "")
    parts = [f"input {recipe['input']}", f"augment {recipe['augment']}", f"test {recipe['test_transform']}",
             f"BatchNorm fraction {recipe['bn_fraction']}" if recipe["bn_fraction"] is not None else "no BatchNorm",
             f"init {fill}", f"test every {recipe['test_interval']}"]
    cls = mults["classifier"]
    if cls:
        parts.append(f"fc weight lr x{cls['weight']['lr']:g} decay x{cls['weight']['decay']:g}, "
                     f"bias lr x{cls['bias']['lr']:g} decay x{cls['bias']['decay']:g}")
    if mults["convs"]["indices"]:
        bias = mults["convs"]["bias"]
        parts.append(f"bias of convs {mults['convs']['indices']} lr x{bias['lr']:g} decay x{bias['decay']:g}")
    return "; ".join(parts)


def run_job(cfg, flags, variant) -> int:
    from simpnet_cli.runs import runner

    runs = plan_runs(cfg, variant)
    opts = options(cfg)
    # device=cuda on a machine without one, a network too big for it: said before anything is printed or timed
    # (runner.execute checks the rest, folders and datasets, before its first run trains)
    runner.preflight(runs, opts, full=False)
    if "--cfg=job" in flags:  # Hydra's habit: show what would run, resolved, and run nothing
        print_resolved(runs)
        return 0
    # Said even with quiet=true: it is about what trains, not how far it got (once a network, not once a seed).
    for note in dict.fromkeys(note for run in runs for note in run.notes):
        print(f"simpnet: note: {note}", file=sys.stderr)
    if "--dry-run" in flags:
        from simpnet_cli.tools import bench

        dry = cfg.get("dry_run") or {}
        print(bench.dry_run_summary(runs, opts, dry.get("iters"), dry.get("batch_size"),
                                    say=(lambda line: None) if cfg.quiet else
                                    (lambda line: print(line, file=sys.stderr, flush=True))))
        return 0
    from simpnet_cli.runs import sources

    for table in chosen_tables(cfg, variant):  # a conf_dir's table keeps its title and claims in the report
        sources.remember(opts.results_dir, table)
    counts = runner.execute(runs, opts)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"{len(runs)} run(s): {summary}; results in {opts.results_dir}/", file=sys.stderr)
    return 0


def print_resolved(runs) -> None:
    """`--cfg job`: every run as it would train: its network layer by layer, recipe, data, solver with its lr,
    schedule and decay, training keys and hash, one YAML document per run."""
    import yaml

    from simpnet_cli.nets import specs as network

    docs = []
    for run in runs:
        doc = {k: v for k, v in run.to_dict().items() if k not in ("net", "paper")}
        doc["net"] = {**run.net, "layers": " ".join(network.tokens(run.spec)),
                      "params": network.count_params(run.spec, run.in_shape)[0]}
        doc["recipe"] = run.recipe()
        docs.append(doc)
    # libyaml's emitter where installed: the pure-Python one takes ~35 ms a run (seeds=30000: 20 minutes)
    base = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

    class PlainDumper(base):  # a mapping shared by two keys is written out twice, never as &id001 / *id001
        def ignore_aliases(self, data) -> bool:
            return True

    print(yaml.dump_all(docs, Dumper=PlainDumper, sort_keys=False, width=120), end="")


def is_multirun(flags, overrides) -> bool:
    return bool({"-m", "--multirun"} & flags) or any(o.startswith("hydra/launcher=") for o in overrides)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Every combination a sweep will launch (``row=WE10,BW10 dataset=cifar10,cifar100``: four), as the override
    lists Hydra's basic sweeper gives its jobs; Hydra's own keys (launcher, sweep folder) left out."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from simpnet_cli.config import compose as composition

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except (HydraException, ValueError) as err:
        raise composition.hydra_error(err) from None
    choices = []
    for o in parsed:
        if o.key_or_group.startswith("hydra"):
            continue
        prefix = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~"}.get(o.type.name, "")
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        key = f"{prefix}{o.key_or_group}" + (f"@{o.package}" if o.package else "")
        choices.append([f"{key}={v}" if not (o.is_delete() and v is None) else key for v in values])
    return [list(combo) for combo in itertools.product(*choices)]


def check_sweep(prepared: list[str], search: list[str], primary: Path) -> int:
    """Compose and plan every job of a sweep before the first one starts: a bad key or value in any
    combination is one line and exit 2, never Hydra's multi-line error after some jobs have trained."""
    import yaml
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from simpnet_cli.config import compose as composition
    from simpnet_cli.runs import runner

    jobs, planned = sweep_jobs(prepared), {}
    with initialize_config_dir(config_dir=str(primary), version_base="1.3"):
        for job in jobs:
            try:
                cfg = hydra_compose(config_name="config", overrides=job + search)
            except (HydraException, OmegaConfBaseException, ValueError, yaml.YAMLError) as err:
                raise composition.hydra_error(err, primary) from None
            except RecursionError:
                raise composition.defaults_loop(primary) from None
            check_options(cfg)
            # the slices of one sharded command (shard=range(0,N)) plan the same runs: planned once
            same = tuple(o for o in job if not o.startswith("shard="))
            if same not in planned:
                planned[same] = (plan_runs(cfg, composition.row_overrides(cfg, job)), options(cfg))
    # Then what the jobs will meet when they run (devices, memory, output folders, datasets): every job's
    # config is good by now, so a folder this creates is one a job would have created. The datasets of all the
    # jobs first, so that one line names every missing one (dataset=cifar10,cifar100 without either).
    from simpnet_cli.train import data as D

    places: dict = {}
    for runs, opts in planned.values():
        places.setdefault((opts.data_dir, opts.download), {}).update({runner.json_key(r.dataset): r.dataset for r in runs})
    for (data_dir, download), datasets in places.items():
        D.check_available(list(datasets.values()), data_dir, download)
    for runs, opts in planned.values():
        runner.preflight(runs, opts)
    return len(jobs)


def multirun(flags, overrides) -> int:
    """Sweeps and clusters: Hydra launches one job per combination (``row=WE10,BW10``), locally or through
    a launcher plugin such as hydra-submitit-launcher (``hydra/launcher=submitit_slurm``)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from simpnet_cli.config import compose as composition, variants

    primary, search = composition.config_dirs(overrides)
    prepared = variants.prepare(overrides)
    total = check_sweep(prepared, search, primary)
    done: list[tuple[str, int]] = []  # (job's overrides, exit code) of the jobs run in this process

    @hydra.main(config_path=str(primary), config_name="config", version_base="1.3")
    def job(job_cfg):
        # A failed job prints its one line and returns its code: Hydra goes on with the other jobs.
        task = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra")]
        variant = composition.row_overrides(job_cfg, task)
        if not job_cfg.quiet:
            print(f"sweep job {HydraConfig.get().job.num + 1}/{total}: {' '.join(task)}"
                  + (f"  (variant: {variant.text()})" if variant else ""), file=sys.stderr, flush=True)
        done.append((" ".join(task), guarded(lambda: run_job(job_cfg, flags, variant), "--debug" in flags)))
        return done[-1][1]

    argv = sys.argv
    sys.argv = [argv[0], "--multirun", *prepared, *search]
    try:
        job()
    finally:
        sys.argv = argv
    if done:  # the jobs of this process (a cluster's jobs report in their own logs, listed below)
        failed = [task for task, code in done if code]
        print(f"sweep: {len(done)} job(s), {len(done) - len(failed)} ok, {len(failed)} failed"
              + "".join(f"\n  failed: {task}" for task in failed), file=sys.stderr)
    if any(o.startswith("hydra/launcher=submitit") for o in overrides):
        print_submitit_logs(overrides)
    return max((code for _, code in done), default=0)


def print_submitit_logs(overrides: list[str]) -> None:
    """Where each job of a submitit launch writes its log: <sweep dir>/.submitit/<job id>/ (the launcher's
    default folder); the sweep dir is hydra.sweep.dir= if given, else the newest under runs_dir/multirun."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.sweep.dir=")]
    if given:
        sweep = Path(given[-1])
    else:
        runs_dir = ([o.split("=", 1)[1] for o in overrides if o.startswith("runs_dir=")] or ["experiments"])[-1]
        found = sorted(Path(runs_dir, "multirun").glob("*"), key=lambda p: p.stat().st_mtime)
        if not found:
            return
        sweep = found[-1]
    logs = sorted(sweep.glob(".submitit/*/*.out")) + sorted(sweep.glob(".submitit/*/*.err"))
    if logs:
        print("job logs:" + "".join(f"\n  {log}" for log in logs), file=sys.stderr)
    else:
        print(f"job logs: {sweep}/.submitit/<job id>/ (once the jobs start)", file=sys.stderr)


def cmd_report(cfg, flags, variant) -> int:
    from simpnet_cli.report import write as report

    try:
        out = report.render(Path(str(cfg.results_dir)), tables=table_selector(cfg), latex="--latex" in flags)
    except OSError as err:  # a read-only or full results folder
        raise UserError(f"cannot write the report under {cfg.results_dir}: {err.strerror or err}"
                        + (f" ({err.filename})" if err.filename else "")) from None
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_repair(cfg, flags, variant) -> int:
    """Rebuild results CSVs (the index) from the run folders under runs_dir; `simpnet index` is the same."""
    from simpnet_cli.runs import index, results, runner

    from simpnet_cli.config import tables

    results_dir, runs_dir = Path(str(cfg.results_dir)), Path(str(cfg.runs_dir))
    chosen = tables.to_plain(cfg.table)
    if chosen is None or chosen == "all":
        names = sorted({results.table_of(p) for p in results_dir.glob("table*.csv")}
                       | set(index.tables_recorded(runs_dir, results_dir)))
    else:  # one name or a list of them (checked by check_top as names, never paths)
        names = [str(t).removeprefix("table") or str(t) for t in (chosen if isinstance(chosen, list) else [chosen])]
    if not names:
        raise UserError(f"no results files (table*.csv) in {results_dir} and no runs recorded for it in {runs_dir}")
    runner.check_results_files(results_dir, names)
    for name, idx in index.rebuild_tables(results_dir, runs_dir, names, runner.warn).items():
        done = idx.counts()
        print(f"{idx.path}: {'rebuilt' if done['changed'] else 'unchanged'} from {runs_dir}/: "
              f"{done['read']} run folder(s) read, {done['indexed']} indexed, {done['refused']} refused, "
              f"{done['unfinished']} unfinished; {done['lines']} "
              f"line(s): {done['kept']} kept, {done['recovered']} recovered from run folders, {done['carried']} "
              f"kept without a run folder; {done['duplicates']} duplicate(s) and {done['dropped']} damaged "
              f"line(s) dropped"
              + (f"; the old file is {done['backup']}" if done["backup"] else ""), file=sys.stderr)
        if not done["read"]:
            elsewhere = index.recorded_elsewhere(runs_dir, results_dir, name)
            if elsewhere:
                runner.warn(f"no run folder under {runs_dir}/ is recorded for table {name} in {results_dir}; "
                            f"{len(elsewhere)} other results folder(s) have runs there: "
                            f"{', '.join(elsewhere[:3])} (results_dir= names the one to rebuild)")
    return 0


def cmd_bench(cfg, flags, variant) -> int:
    # said before torch is imported: a bench's first figure can be a minute away
    print(f"bench: starting; figures go to {cfg.bench.out} (each row is printed as it is measured)",
          file=sys.stderr, flush=True)
    from simpnet_cli.tools import bench

    return bench.main(cfg, flags)


COMMANDS = {"list": cmd_list, "show": cmd_show, "report": cmd_report, "bench": cmd_bench, "repair": cmd_repair,
            "index": cmd_repair}


# `simpnet CMD --help`: what each command takes, with examples. Printing it is all --help does: nothing is composed,
# trained, written or read beyond this text.
ROW_KEYS_HELP = """\
  Any key of a row, from the command line (a change is a variant, recorded in the `variant` column):
    arch=arch3  dataset=cifar100  feed=mean_file_mirror  solver=nesterov_80k    (config groups in conf/)
    net.widths='C64{3}, C128{4}'  net.pools_after=[3,7]  net.kernels={1-3: 5}  net.dropout.head=0.3
    net.bn_fraction=0.99  net.init.on_convs=[]  net.param_mults.convs.indices=[-1]  net.conv_suffix={6: linear}
    feed.augment=pad4_crop32_mirror  dataset.extra=false  solver.lr=0.05  solver.schedule.steps=[20000,40000]
    iterations=90000  batch_size=50  test_interval=1000
  A network of your own (in no table): arch=arch2 'net.widths=C64, C128{2}' [custom.table=mine]
    custom.row=NAME (a row of its own, side by side with the table's others)  custom.label='six layers'"""
COMMON_HELP = """\
  Top-level keys (conf/config.yaml): results_dir=results  runs_dir=experiments  data_dir=data  download=true
    conf_dir=PATH (tables/arch/solver/dataset/feed of your own)  --debug (tracebacks instead of one line)"""
HELP = {
    "list": ("simpnet list [table=N] [--json]", "The paper's tables and their rows (ids such as 8L, WE10, 5M-C10)."),
    "show": ("simpnet show [table=N] [row=ID] [KEY=VALUE ...] [--json]",
             "Each chosen row's resolved network, layer by layer in the reference's grammar, its parameter counts and\n"
             "its recipe (feed, BatchNorm fraction, fillers, lr/decay multipliers, test interval) and the authors'\n"
             "runs of the row (their Caffe logs: best, final and hours per log). Trains nothing.\n"
             + ROW_KEYS_HELP),
    "run": ("simpnet run table=N [row=ID] [seeds=3] [profile=smoke] [KEY=VALUE ...] [--dry-run] [-m]",
            "Trains the chosen rows (finished runs are skipped, interrupted ones resume) and records each in\n"
            "results/table<N>.csv.\n"
            "  seeds=3 or seeds=[0,7]   profile=smoke (a few steps on synthetic data)   device=cuda:1\n"
            "  jobs_per_device=4 (or auto: as measured)   precision=bf16   profile.train.eval_every=4\n"
            "  dataset.train_size=512 (a subset)   shards=N shard=I (the I-th slice of the jobs: one cluster job)\n"
            "  stack=3 (a row's seeds in one training step; stack_mode=grouped|branched; auto: on a GPU as measured)\n"
            "  quiet=true   logger=[csv,tensorboard] (or mlflow)   --cfg job (print each resolved run, train nothing)\n"
            "  --dry-run (runs, iterations and an estimated time, beside the authors' hours; trains nothing;\n"
            "    quick and rough: dry_run.iters=1 dry_run.batch_size=8)\n"
            "  Each evaluation is compared with the authors' runs of the row (a run well below them is said once;\n"
            "    result.json: yardstick); a variant or a smoke run has no yardstick.\n"
            "  -m with comma-separated values sweeps: simpnet run -m table=4 row=WE10,BW10 dataset=cifar10,cifar100\n"
            + ROW_KEYS_HELP),
    "report": ("simpnet report [table=N] [--latex]",
               "Writes results/REPORT.md (and results/report/table<N>.md, .tex with --latex, and figures): every\n"
               "table beside the paper's figures, with the claims checked."),
    "bench": ("simpnet bench [bench.rows=[\"2/8L\"]] [bench.iters=300] [bench.pack=[4]]",
              "Images/s of the eager loop and the runner's step for chosen rows (each with its step_mode, and the\n"
              "authors' img/s and hours for the row beside it), written to results/bench/benchmarks.md (git-ignored).\n"
              "  bench.rows=[\"2/8L\",\"12/5M-C10\"]  bench.batch_size=100  bench.warmup=30  bench.s1=false\n"
              "  bench.precision.rows=[\"13/slim-300K\"] (fp32 vs bf16 accuracy on Fashion-MNIST)\n"
              "  bench.grouped.rows=[] (skip the probe of each conv alone vs three stacked in one grouped conv)\n"
              "  bench.ops=true [--json] (instead of timing: the ATen ops per training step of each row, one run in\n"
              "    fp32 and bf16, k runs grouped and branched at each k > 1 of bench.stack; written to results/ops.md)\n"
              "    e.g. simpnet bench bench.ops=true bench.rows=[\"2/8L\"] bench.stack=[3] --json"),
    "export": ("simpnet export run_dir=PATH [format=torchscript|onnx] [out=FILE]",
               "Writes a finished run's network with its trained weights as TorchScript (run_dir/model.ts) or ONNX\n"
               "(run_dir/model.onnx; needs pip install -e '.[onnx]'). In Python: simpnet_cli.load_model(run_dir)."),
    "repair": ("simpnet repair [table=N]   (or: simpnet index [table=N])",
               "Rebuilds results/table<N>.csv, an index, from the run folders under runs_dir (the folders are the\n"
               "record); a healthy file is left as it is, a damaged one is kept beside it."),
}


def cmd_export(args: list[str]) -> int:
    from simpnet_cli.runs import trained

    keys = dict(a.split("=", 1) for a in args if "=" in a)
    bad = sorted(set(keys) - {"run_dir", "format", "out"}) + [a for a in args if "=" not in a]
    if bad or "run_dir" not in keys:
        raise UserError("usage: simpnet export run_dir=PATH [format=torchscript|onnx] [out=FILE]"
                        + (f" (unknown: {', '.join(bad)})" if bad else ""))
    path = trained.export(keys["run_dir"], keys.get("format", "torchscript"), keys.get("out"),
                          warn=lambda msg: print(f"simpnet: warning: {msg}", file=sys.stderr))
    print(f"wrote {path}")
    return 0


# Hydra's own flags, which simpnet (a command line on top of Hydra's composition) does not offer: each is
# answered in one line naming what does that job here.
HYDRA_FLAGS = {
    "--info": "Hydra's --info is not offered: `simpnet list` shows each table and where it comes from (conf/ or "
              "conf_dir=), `simpnet show table=N row=ID --cfg job` each resolved run",
    "--cfg=hydra": "--cfg hydra is not offered: Hydra's own settings change nothing in simpnet (runs go to runs_dir=, "
                   "records to results_dir=); `--cfg job` prints each resolved run",
    "--cfg=all": "--cfg all is not offered: `--cfg job` prints each resolved run (Hydra's own settings change "
                 "nothing in simpnet)",
    "--shell-completion": "simpnet has no shell completion: `simpnet --help` lists the commands, `simpnet CMD --help` "
                          "each command's keys with examples",
    "--hydra-help": "simpnet CMD --help lists a command's keys with examples (Hydra's own help does not apply)",
    "--resolve": "--cfg job prints each run already resolved",
    "--package": "--cfg job prints each whole run (there is no --package)",
    "--config-path": "conf_dir=PATH adds a folder of your own configs (tables/, arch/, solver/, ...)",
    "--config-name": "conf_dir=PATH adds a folder of your own configs (tables/, arch/, solver/, ...)",
    "--config-dir": "conf_dir=PATH adds a folder of your own configs (tables/, arch/, solver/, ...)",
    "--run": "simpnet run trains (and -m sweeps); Hydra's --run flag does not apply",
}


def check_hydra_flags(args: list[str]) -> None:
    for arg in args:
        flag = arg.split("=", 1)[0] if not arg.startswith("--cfg=") else arg
        flag = {"-p": "--package", "-cp": "--config-path", "-cn": "--config-name", "-cd": "--config-dir",
                "-r": "--run", "-i": "--info", "-sc": "--shell-completion"}.get(flag, flag)
        if flag in HYDRA_FLAGS:
            raise UserError(HYDRA_FLAGS[flag])


def check_hydra_keys(overrides: list[str], multirun: bool) -> None:
    """Refuse ``hydra.*`` keys that would be accepted and then do nothing: simpnet writes where results_dir and
    runs_dir say, so Hydra's run folder and output settings have no effect; a sweep (-m) takes Hydra's
    launcher and sweep-folder keys."""
    for arg in overrides:
        key = arg.split("=", 1)[0].lstrip("+~")
        if not (key == "hydra" or key.startswith(("hydra.", "hydra/"))):
            continue
        if multirun and key.startswith(("hydra.launcher", "hydra/launcher", "hydra.sweep", "hydra.sweeper",
                                        "hydra/sweeper")):
            continue
        raise UserError(f"{arg}: this Hydra key changes nothing in simpnet (runs go to runs_dir=, records to "
                        f"results_dir=); with -m, hydra/launcher=, hydra.launcher.* and hydra.sweep.dir= apply")


def print_help(cmd: str) -> int:
    cmd = "repair" if cmd == "index" else cmd  # the same command under two names
    if cmd not in HELP:
        raise UserError(f"unknown command {cmd!r}; commands: {', '.join(HELP)}")
    usage, text = HELP[cmd]
    return say(f"usage: {usage}\n\n{text}\n\n{COMMON_HELP}")


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("simpnet")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def say(text: str) -> int:
    """Print ``text`` and flush here, where a reader that left (``simpnet -h | head -2``) is caught."""
    print(text)
    sys.stdout.flush()
    return 0


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def guarded(fn, debug: bool) -> int:
    """Run ``fn``; a UserError or an unexpected failure becomes one line on stderr and an exit code."""
    try:
        return fn()
    except UserError as err:
        if debug:
            raise
        print(f"simpnet: error: {one_line(err)}", file=sys.stderr)
        code = err.exit_code
    except BrokenPipeError:  # `simpnet show | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except KeyboardInterrupt:
        print("simpnet: interrupted; finished runs are recorded and unfinished ones resume from their "
              "last checkpoint", file=sys.stderr)
        code = 130
    except Exception as err:  # a bug, not bad input: still one line unless --debug
        if debug:
            raise
        print(f"simpnet: internal error: {type(err).__name__}: {one_line(err)} (run with --debug for the traceback)",
              file=sys.stderr)
        code = 1
    return code


class TolerantStream:
    """stderr for a command that trains: a write that fails (``2>/dev/full``: ENOSPC; ``2>&1 | head -c 1``: the
    reader left, EPIPE) is dropped, never raised: progress lines are not worth a run, and a run stopped by its
    own progress line would record nothing and fail the same way every time."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (OSError, ValueError):  # (ValueError: the stream was closed)
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


def standard_streams() -> None:
    """``simpnet ... 2>&-``: a closed stdin, stdout or stderr is reopened on /dev/null before anything opens a
    file, so no results file or checkpoint is handed fd 2 (where tracebacks and C++ warnings go), and the exit
    code still says what happened (Python leaves sys.stderr None, and printing the error line failed)."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one (those below are open)
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode))


def check_working_dir() -> None:
    """Every relative path (results/, experiments/, data/) is read from the working directory: a deleted one
    is said at once, not as a FileNotFoundError without a file name from wherever it is first used."""
    try:
        os.getcwd()
    except FileNotFoundError:
        raise UserError("the working directory no longer exists (deleted or moved away); cd to a folder that "
                        "exists and run the command again") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    standard_streams()
    if argv and argv[0] == "run" and not isinstance(sys.stderr, TolerantStream):
        stderr, sys.stderr = sys.stderr, TolerantStream(sys.stderr)
        try:
            return main(argv)
        finally:
            sys.stderr = stderr
    if not argv or argv[0] in ("-h", "--help", "help", "--version", "-V"):
        text = USAGE if not argv or argv[0] not in ("--version", "-V") else f"simpnet {version()}"
        return guarded(lambda: say(text), debug=False)
    cmd, rest = argv[0], argv[1:]
    for short in ("--cfg", "-c"):  # `--cfg job` (or Hydra's `-c job`) as Hydra spells it: one flag
        if short in rest:
            i = rest.index(short)
            rest = rest[:i] + [f"--cfg={rest[i + 1]}" if i + 1 < len(rest) else "--cfg="] + rest[i + 2:]
    flags = {a for a in rest if a.startswith("-")}
    overrides = [a for a in rest if not a.startswith("-")]
    debug = "--debug" in flags

    def dispatch() -> int:
        check_hydra_flags([cmd, *flags])
        if flags & {"--help", "-h"}:
            return print_help(cmd)
        check_working_dir()
        cfg_flags = {f for f in flags if f.startswith("--cfg=")}
        if cfg_flags - {"--cfg=job"} or (cfg_flags and cmd not in ("run", "show")):
            raise UserError("--cfg takes `job` (simpnet run|show ... --cfg job prints each resolved run and trains "
                            "nothing)")
        unknown = flags - FLAGS - cfg_flags
        if unknown:
            raise UserError(f"unknown flag(s) {', '.join(sorted(unknown))}; flags: {', '.join(sorted(FLAGS))}")
        ignored = flags - COMMAND_FLAGS.get(cmd, flags) - {"--debug", "--help", "-h"}
        if ignored:
            takes = sorted(COMMAND_FLAGS[cmd] | {"--debug"})
            raise UserError(f"simpnet {cmd} does not take {', '.join(sorted(ignored))} (it takes {', '.join(takes)})")
        if cmd == "export":  # a run folder, not a config: nothing to compose
            return cmd_export(overrides)
        if cmd != "run" and cmd not in COMMANDS:
            raise UserError(f"unknown command {cmd!r}; commands: list, show, run, report, bench, repair, index, export")
        check_hydra_keys(overrides, multirun=cmd == "run" and is_multirun(flags, overrides))
        if cmd == "show" and cfg_flags:
            cfg, variant = compose(overrides)
            print_resolved(plan_runs(cfg, variant))
            return 0
        if cmd == "run" and is_multirun(flags, overrides):
            return multirun(flags, overrides)  # Hydra composes each job's config itself
        cfg, variant = compose(overrides)
        if cmd == "run":
            return run_job(cfg, flags, variant)
        return COMMANDS[cmd](cfg, flags, variant)

    return guarded(dispatch, debug)


if __name__ == "__main__":
    sys.exit(main())
