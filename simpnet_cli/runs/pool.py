"""Packed runs: ``jobs_per_device`` worker processes on each device slot, each training one job at a time (a
plan_groups group: one run, or the runs of one shared step), the parent showing their progress and keeping the
tally. What a job is, and how it is trained, is the runner's (``execute_group``, handed to the workers).
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection  # noqa: F401 - mp.connection.wait
import os
import signal
from multiprocessing.managers import SyncManager

from simpnet_cli.runs import index
from simpnet_cli.runs import progress
from simpnet_cli.runs.planning import Options
from simpnet_cli.runs.watch import watch_parent  # (its own module: the manager process imports only it)


def _slot_worker(execute_group, opts, device, shown, conn) -> None:
    """A packed worker holding one device slot: trains the jobs the parent sends through ``conn``, one at a time,
    and sends back each one's [(the run's place in the group, outcome, message, its step as trained)], until it
    gets None. A job is one plan_groups group and how it shares its step (usually a single run, "separate"; "auto":
    decided here): a stacked group trains together in this one process, on this one slot. Its progress goes to
    ``shown`` (a Forwarder to the parent's Reporter). ``execute_group``: the runner's (runner.execute_group)."""
    watch_parent(os.getppid())  # the parent killed hard cannot stop this worker: it stops itself
    while (job := conn.recv()) is not None:
        group, how = job
        try:
            outcomes = execute_group(group, opts, device, shown, auto=how == "auto")
        except Exception as err:  # one group's failure (bad input, CUDA out of memory) must not stop the others
            outcomes = [(run, "error", f"{progress.run_name(run)}: {type(err).__name__}: {err}") for run in group]
        conn.send([(n, outcome, message, run.step) for n, (run, outcome, message) in enumerate(outcomes)])


def death_cause(exitcode: int | None) -> str:
    """Why a run's process ended without a result, from its exit code (minus a signal's number)."""
    if exitcode is None or exitcode >= 0:
        return f"its process exited with status {exitcode} before it reported"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    why = {"SIGKILL": "the kernel's out-of-memory killer, or a kill -9",
           "SIGSEGV": "a crash in native code", "SIGABRT": "an abort, e.g. in the CUDA driver or a library",
           "SIGBUS": "a crash in native code"}.get(name)
    return f"its process was killed by {name}" + (f" ({why})" if why else "")


class _Slot:
    """A worker process on one device slot, and the job (a group of runs, and how they share a step) it
    trains (None: idle)."""

    def __init__(self, ctx, execute_group, opts: Options, device: str, shown):
        self.device, self.job = device, None
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_slot_worker, args=(execute_group, opts, device, shown, theirs))
        self.proc.start()
        theirs.close()  # only the worker holds its end, so its death reads as end-of-file here

    def outcome(self):
        """[(the run's place in the group, outcome, message)] once the job has reported, "died" if the worker is
        dead, None while it trains."""
        if not self.conn.poll():
            return None
        try:
            return self.conn.recv()
        except (EOFError, ConnectionResetError):
            self.proc.join()
            return "died"


def execute_packed(execute_group, groups, twins, opts: Options, slots: list[str], workers: int,
                   shown: progress.Reporter, tally, as_trained=lambda twin: twin) -> None:
    """``workers`` processes, each holding one device slot and training one job at a time: a plan_groups group,
    one run or a stack of runs trained together in one step in that one process, so a device never holds more
    than ``jobs_per_device`` jobs. Processes, not threads: each packed job has its own CUDA context and
    interpreter, so one job's host overhead never stalls another's kernel launches. Not a ProcessPoolExecutor:
    one worker dying hard (the out-of-memory killer, a CUDA abort, a segfault) breaks such a pool and every run
    in it. Here the parent knows which job each worker holds: a dead worker's runs are reported failed with its
    cause (they resume from their last checkpoints on the next invocation), a fresh worker takes the slot, and
    the other jobs go on. ``execute_group`` trains a job (runner.execute_group, run in the workers)."""
    ctx = mp.get_context("spawn")
    jobs, died = list(groups), set()
    devices = (slots * max(1, opts.jobs_per_device))[:workers]
    pool: list[_Slot | None] = [None] * len(devices)  # a worker is started when a job needs it

    def next_job():
        """The next group with runs still to train, as (runs, how); recorded runs are skipped here, without a
        worker (a run of a shared step left alone still trains in its step, with passengers)."""
        while jobs:
            group, how = jobs.pop(0)
            left = []
            for run in group:
                if index.is_recorded(opts.results_dir, opts.runs_dir, run):
                    tally(run, "skipped", f"{progress.run_name(run)}: already recorded")  # no worker needed
                else:
                    left.append(run)
            if left:
                return left, how  # (a stacked run left alone still trains in its step, with passengers)
        return None

    # The workers (above) and the manager watch this process: killed (SIGKILL, a lost SLURM job), it cannot stop
    # them, so they stop themselves instead of training for minutes with no one to record them.
    manager = SyncManager(ctx=ctx)
    manager.start(watch_parent, (os.getpid(),))
    with manager:
        events = manager.Queue()  # progress: the parent shows one line per evaluation and the command's bar
        try:
            while True:
                for i, w in enumerate(pool):
                    if w is not None and w.job is not None:
                        continue
                    job = next_job()
                    if job is None:
                        break
                    if w is None or not w.proc.is_alive():
                        pool[i] = w = _Slot(ctx, execute_group, opts, devices[i], progress.Forwarder(events))
                    w.conn.send(job)
                    w.job = job
                busy = [w for w in pool if w is not None and w.job is not None]
                if not busy:
                    break
                mp.connection.wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=0.5)
                progress.drain(events, shown)  # a run's last events are queued before its job reports
                for i, w in enumerate(pool):
                    reported = w.outcome() if w is not None and w.job is not None else None
                    if reported is None:
                        continue
                    (group, _), w.job = w.job, None
                    if reported == "died":  # the slot gets a fresh worker when a job needs it
                        died.update(run.alone_hash for run in group)
                        pool[i] = None
                        cause = death_cause(w.proc.exitcode)
                        shared = f" (it trained {len(group)} runs together)" if len(group) > 1 else ""
                        for run in group:
                            tally(run, "error", f"{progress.run_name(run)}: {cause}{shared}; the other runs went "
                                                f"on, and this one resumes from its last checkpoint on the next "
                                                f"invocation")
                        continue
                    for place, outcome, message, step in reported:
                        tally(group[place], outcome, message, step)
        finally:
            live = [w for w in pool if w is not None]
            for w in live:
                if w.job is None and w.proc.is_alive():
                    try:
                        w.conn.send(None)  # done: the worker returns
                    except OSError:
                        pass
                else:  # interrupted (Ctrl-C) mid-job: its runs resume from their checkpoints next time
                    w.proc.terminate()
            for w in live:
                w.proc.join(timeout=30)
                if w.proc.is_alive():
                    w.proc.kill()
    for run in twins:  # recorded from their first run's result.json (or trained here if that one failed)
        if run.alone_hash in died:  # not in this process: what killed that one would end the command
            tally(run, "error", f"{progress.run_name(run)}: not trained, its run's process died (above)")
            continue
        try:
            tally(*execute_group([as_trained(run)], opts, slots[0], shown)[0])
        except Exception as err:  # noqa: BLE001 - as in a packed run: the others are recorded
            tally(run, "error", f"{progress.run_name(run)}: {type(err).__name__}: {err}")
