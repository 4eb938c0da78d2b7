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

import os
import sys

# (the commands import what they use when they run, to keep `simpnet list` and --help quick)
from simpnet_cli.commands import COMMANDS, cmd_export, compose, plan_runs, print_resolved, run_job
from simpnet_cli.errors import UserError, guarded
from simpnet_cli.sweep import is_multirun, multirun

USAGE = "usage: simpnet COMMAND [KEY=VALUE ...] [--FLAGS]\n\n" + "\n\n".join(__doc__.split("\n\n")[1:3])


FLAGS = {"--json", "--debug", "--dry-run", "--latex", "-m", "--multirun", "--help", "-h"}


# The flags each command reads (and --debug, --help everywhere): any other is refused, not silently ignored
# (`simpnet run --json` would otherwise train with no JSON anywhere).
COMMAND_FLAGS = {"list": {"--json"}, "show": {"--json", "--cfg=job"}, "run": {"--dry-run", "-m", "--multirun", "--cfg=job"},
                 "report": {"--latex"}, "bench": {"--json"}, "repair": set(), "index": set(), "export": set()}


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

    from simpnet_cli.config import tables

    with tables.SEARCH.scoped():  # a conf_dir= of this command is not the next one's (in-process: tests, api)
        return guarded(dispatch, debug)


if __name__ == "__main__":
    sys.exit(main())
