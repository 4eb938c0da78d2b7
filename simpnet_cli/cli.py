"""simpnet: the command line. Subcommands take Hydra overrides (key=value) and a few --flags.

  simpnet list                               tables and their rows
  simpnet show table=4 [row=WE10] [--json]   each row's resolved network and parameter counts
  simpnet run table=4 [row=..] [seeds=3] [profile=smoke] [--dry-run]
  simpnet run -m table=4 row=WE10,BW10 hydra/launcher=submitit_slurm   (one cluster job per row)
  simpnet report [table=4] [--latex]         results/REPORT.md beside the paper's figures
  simpnet bench [rows=..]                    images/s of the eager loop and the runner's path

Bad input gets one line on stderr and exit code 2; --debug shows the traceback instead.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from simpnet_cli.errors import UserError

USAGE = __doc__.split("\n\n")[1]
FLAGS = {"--json", "--debug", "--dry-run", "--latex", "-m", "--multirun", "--help", "-h"}


def compose(overrides: list[str]):
    """The config for ``overrides``, with Hydra's errors turned into one line each."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from simpnet_cli.tables import CONF_DIR

    if not (CONF_DIR / "config.yaml").is_file():
        raise UserError(f"no config.yaml in the config directory {CONF_DIR} (set by SIMPNET_CONF_DIR, or conf/ "
                        f"beside the package); point SIMPNET_CONF_DIR at a copy of conf/ or unset it")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if "not in struct" in str(err) or "Could not override" in str(err) or "Key '" in str(err):
            hint = " (unknown config key; see conf/config.yaml for the keys)"
        raise UserError(f"bad override: {first}{hint}") from None


def options(cfg) -> "runner.Options":  # noqa: F821 - imported lazily to keep `simpnet list` quick
    from simpnet_cli import runner

    return runner.Options(
        data_dir=Path(cfg.data_dir), download=bool(cfg.download), results_dir=Path(cfg.results_dir),
        runs_dir=Path(cfg.runs_dir),
        device=str(cfg.profile.get("device", "auto") if cfg.device == "auto" else cfg.device),
        jobs_per_device=int(cfg.jobs_per_device), profile=str(cfg.profile.name), quiet=bool(cfg.quiet))


def plan_runs(cfg):
    from simpnet_cli import runner, tables

    profile = tables.to_plain(cfg.profile)
    run_opts = {"precision": cfg.precision} if cfg.precision else None
    data_opts = {"svhn": {"extra": True}} if cfg.svhn_extra else None
    return runner.plan(tables.to_plain(cfg.table), tables.to_plain(cfg.row), tables.to_plain(cfg.seeds),
                       profile, run_opts, data_opts)


def table_selector(cfg):
    """``table=`` as given, or every table when it is not given (list, show, report)."""
    from simpnet_cli import tables

    return "all" if cfg.table is None else tables.to_plain(cfg.table)


# --------------------------------------------------------------------------- subcommands

def cmd_list(cfg, flags) -> int:
    from simpnet_cli import tables

    for t in tables.load_tables(table_selector(cfg)):
        print(f"Table {t.name}: {t.title}")
        for r in t.rows:
            dataset = r["dataset"] if isinstance(r["dataset"], str) else r["dataset"]["base"]
            print(f"  {r['id']:<14} {r['label']}  [{dataset}]")
        if t.cited:
            print(f"  ({len(t.cited)} cited rows of other papers, not trained)")
    return 0


def show_records(cfg) -> list[dict]:
    from simpnet_cli import network, tables

    records = []
    for t in tables.load_tables(table_selector(cfg)):
        for r in t.select(tables.to_plain(cfg.row)):
            run = tables.resolve(t, r, 0, {})
            paper_p, total_p = network.count_params(run.spec, run.in_shape)
            records.append({
                "table": t.name, "row": r["label"], "row_id": r["id"], "dataset": run.dataset["name"],
                "notation": run.net.get("widths"), "layers": network.tokens(run.spec),
                "params_paper": paper_p, "params_total": total_p,
                "paper_params": run.paper.get("params"), "paper_acc": run.paper.get("acc"),
                "solver": run.solver["type"], "iterations": run.train["iterations"],
            })
    return records


def cmd_show(cfg, flags) -> int:
    records = show_records(cfg)
    if "--json" in flags:
        print(json.dumps(records, indent=1))
        return 0
    for rec in records:
        print(f"Table {rec['table']} / {rec['row_id']}: {rec['row']}  ({rec['dataset']}, {rec['solver']}, "
              f"{rec['iterations']} iterations)")
        print(f"  {' '.join(rec['layers'])}")
        print(f"  params: {rec['params_paper']:,} conv+fc (paper: {rec['paper_params']}), "
              f"{rec['params_total']:,} trainable with BatchNorm")
    return 0


def run_job(cfg, flags) -> int:
    from simpnet_cli import runner

    runs = plan_runs(cfg)
    opts = options(cfg)
    if "--dry-run" in flags:
        from simpnet_cli import bench

        print(bench.dry_run_summary(runs, opts))
        return 0
    counts = runner.execute(runs, opts)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"{len(runs)} run(s): {summary}; results in {opts.results_dir}/", file=sys.stderr)
    return 0


def is_multirun(flags, overrides) -> bool:
    return bool({"-m", "--multirun"} & flags) or any(o.startswith("hydra/launcher=") for o in overrides)


def multirun(flags, overrides) -> int:
    """Sweeps and clusters: Hydra launches one job per combination (``row=WE10,BW10``), locally or through
    a launcher plugin such as hydra-submitit-launcher (``hydra/launcher=submitit_slurm``)."""
    import hydra

    from simpnet_cli.tables import CONF_DIR

    codes: list[int] = []  # exit codes of the jobs run in this process (a cluster's jobs report in their logs)

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def job(job_cfg):
        # A failed job prints its one line and returns its code: Hydra goes on with the other jobs.
        codes.append(guarded(lambda: run_job(job_cfg, flags), "--debug" in flags))
        return codes[-1]

    argv = sys.argv
    sys.argv = [argv[0], "--multirun", *overrides]
    try:
        job()
    finally:
        sys.argv = argv
    return max(codes, default=0)


def cmd_report(cfg, flags) -> int:
    from simpnet_cli import report

    out = report.render(Path(cfg.results_dir), tables=table_selector(cfg),
                        latex="--latex" in flags)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_bench(cfg, flags) -> int:
    from simpnet_cli import bench

    return bench.main(cfg, flags)


COMMANDS = {"list": cmd_list, "show": cmd_show, "report": cmd_report, "bench": cmd_bench}


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    flags = {a for a in rest if a.startswith("-")}
    overrides = [a for a in rest if not a.startswith("-")]
    debug = "--debug" in flags

    def dispatch() -> int:
        unknown = flags - FLAGS
        if unknown:
            raise UserError(f"unknown flag(s) {', '.join(sorted(unknown))}; flags: {', '.join(sorted(FLAGS))}")
        if cmd != "run" and cmd not in COMMANDS:
            raise UserError(f"unknown command {cmd!r}; commands: list, show, run, report, bench")
        if cmd == "run" and is_multirun(flags, overrides):
            return multirun(flags, overrides)  # Hydra composes each job's config itself
        cfg = compose(overrides)
        if cmd == "run":
            return run_job(cfg, flags)
        return COMMANDS[cmd](cfg, flags)

    return guarded(dispatch, debug)


if __name__ == "__main__":
    sys.exit(main())
