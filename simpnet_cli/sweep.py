"""A sweep (``simpnet run -m``): its jobs re-expanded from Hydra's sweep grammar, every job composed, planned
and checked before the first one trains (``check_sweep``), then run through Hydra's launcher (the basic one, or
submitit's on a cluster), each job a ``simpnet run`` of its own into the same folders and index.
"""
from __future__ import annotations

import sys
from pathlib import Path

from simpnet_cli.commands import check_options, options, plan_runs, run_job
from simpnet_cli.errors import guarded


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
    from simpnet_cli.runs import planning

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
        places.setdefault((opts.data_dir, opts.download), {}).update({planning.json_key(r.dataset): r.dataset for r in runs})
    for (data_dir, download), datasets in places.items():
        D.check_available(list(datasets.values()), data_dir, download)
    for runs, opts in planned.values():
        planning.preflight(runs, opts)
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
