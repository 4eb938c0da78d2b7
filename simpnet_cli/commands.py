"""simpnet's commands as functions of a composed config: list, show, run, report, repair, bench and export (cli.py
parses the command line and dispatches here; sweep.py runs a sweep's jobs). Each reads its keys, plans through
runs/ and shows what it did.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from simpnet_cli.errors import UserError

if TYPE_CHECKING:  # imported where used, to keep `simpnet list` quick
    from simpnet_cli.runs import planning


def compose(overrides: list[str]):
    """(the config for ``overrides``, their row overrides): config/compose.py, Hydra's composition."""
    from simpnet_cli.config import compose as composition

    return composition.compose(overrides)


def check_options(cfg) -> None:
    """Every top-level key (config/schemas.py: check_top), checked before anything is planned or trained."""
    from simpnet_cli.config import schemas, tables

    schemas.check_top(tables.to_plain(cfg))


def options(cfg) -> planning.Options:
    from simpnet_cli.runs import planning
    from simpnet_cli.train import callbacks

    check_options(cfg)
    logger = cfg.get("logger")  # a list from the command line is a ListConfig; logger_names checks the names
    return planning.Options(
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
    from simpnet_cli.runs import planning
    from simpnet_cli.config import tables

    profile = tables.to_plain(cfg.profile)
    run_opts = {"precision": cfg.precision} if cfg.precision else None
    data_opts = {"svhn": {"extra": bool(cfg.svhn_extra)}} if cfg.svhn_extra is not None else None
    return planning.plan(chosen_tables(cfg, variant), tables.to_plain(cfg.row), tables.to_plain(cfg.seeds),
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
    from simpnet_cli.runs import planning
    from simpnet_cli.config import tables
    from simpnet_cli.config import variants

    variant = variant or variants.RowOverrides()
    if cfg.table is None and "arch" not in variant.choices:
        chosen = tables.load_tables("all")
    else:
        chosen = chosen_tables(cfg, variant)
    records = []
    for run in planning.plan(chosen, tables.to_plain(cfg.row), [0], tables.to_plain(cfg.profile),
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
    from simpnet_cli.runs import planning, runner

    runs = plan_runs(cfg, variant)
    opts = options(cfg)
    # device=cuda on a machine without one, a network too big for it: said before anything is printed or timed
    # (runner.execute checks the rest, folders and datasets, before its first run trains)
    planning.preflight(runs, opts, full=False)
    if "--cfg=job" in flags:  # Hydra's habit: show what would run, resolved, and run nothing
        print_resolved(runs)
        return 0
    # Said even with quiet=true: it is about what trains, not how far it got (once a network, not once a seed).
    for note in dict.fromkeys(note for run in runs for note in run.notes):
        print(f"simpnet: note: {note}", file=sys.stderr)
    if "--dry-run" in flags:
        from simpnet_cli.runs import estimate

        dry = cfg.get("dry_run") or {}
        print(estimate.dry_run_summary(runs, opts, dry.get("iters"), dry.get("batch_size"),
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
    from simpnet_cli.runs import index, planning, results, runner

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
    planning.check_results_files(results_dir, names)
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
