"""The speed issue's code paths: the benchmark and the dry-run estimate (CPU), packed runs, and the CUDA-graph
step (GPU only; skipped here with the reason). The launcher (submitit's local executor) is test_variants'."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from simpnet_cli.train import data as D
from simpnet_cli.train import captured_step
from simpnet_cli.runs import results
from simpnet_cli.config import tables
from simpnet_cli.train import state as run_state
from simpnet_cli.train import solvers
from simpnet_cli.nets import modules as M
from simpnet_cli.cli import main

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]


def test_bench_writes_markdown_with_device_and_rates(tmp_path, capsys):
    out = tmp_path / "bench.md"
    code = main(["bench", "bench.rows=[5/P5]", "bench.iters=2", "bench.warmup=1", "bench.s1=false",
                 "bench.batch_size=8", "bench.pack=[1]", "bench.stack=[]", "bench.grouped.rows=[]", f"bench.out={out}",
                 "device=cpu"])
    assert code == 0
    text = out.read_text()
    assert run_state.device_name(torch.device("cpu")) in text
    rows = [line for line in text.splitlines() if line.startswith("| 5/P5 |")]
    assert len(rows) == 1 and "eager fp32" in rows[0]
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[3] == "eager"  # the step mode it really ran in
    rate = float(cells[4].replace(",", ""))
    assert rate > 0
    # the authors' speed for Table 5's P5 row (authors_runs.csv), and our ratio to it
    from simpnet_cli.runs import authors

    ref = authors.authors_speed("5", tables.load_table("5").row("P5")["label"])
    assert cells[7] == f"{ref.img_per_s:,.0f}" and cells[8] == f"{ref.hours:.3g}"
    # (the ratio is of the unrounded rate; the cell shows it rounded to whole images/s)
    assert cells[9].endswith("x") and float(cells[9][:-1]) == pytest.approx(rate / ref.img_per_s, abs=0.011)


def test_dry_run_counts_runs_and_iterations_without_training(tmp_path, capsys):
    code = main(["run", "table=5", "profile=smoke", "seeds=2", "--dry-run", f"results_dir={tmp_path}/r",
                 f"runs_dir={tmp_path}/e"])
    assert code == 0
    out = capsys.readouterr().out
    assert "6 run(s) asked for, 6 still to train" in out
    assert "| 5 | 6 | 24 |" in out  # 3 rows x 2 seeds x 4 smoke iterations
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()


def test_quick_dry_run_says_which_network_it_times_and_scales_the_batch(tmp_path, capsys):
    """dry_run.iters=1 dry_run.batch_size=2: one timed step per network at batch 2, a progress line for each
    network on stderr, and an estimate that says it is scaled (rough)."""
    code = main(["run", "table=2", "--dry-run", "dry_run.iters=1", "dry_run.batch_size=2",
                 f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/e"])
    assert code == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("dry-run: timing network")]
    assert [line.split()[3] for line in progress] == ["1/4", "2/4", "3/4", "4/4"]
    assert "row 8L" in progress[0]
    assert "at batch 2 (scaled to each run's batch: rough)" in captured.out
    assert "| 2 | 4 | 120,000 |" in captured.out
    assert main(["run", "table=2", "--dry-run", "dry_run.iters=0"]) == 2


# The submitit launcher (one job per row into one CSV): test_variants' submitit sweep, two rows by two variants.


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph step needs a CUDA device")
def test_graphed_step_matches_eager_step_on_gpu():
    t = tables.load_table("2")
    run = tables.resolve(t, t.row("8L"), 0, {"train": {"batch_size": 100, "iterations": 1},
                                             "data": {"source": "synthetic", "train_size": 1000, "test_size": 100}})
    losses = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        dev = torch.device("cuda")
        data = D.load(run.dataset, Path("."), False, dev, 100, 0)
        model = M.build_model(run.spec, run.in_shape, run.net).to(dev).to(memory_format=torch.channels_last)
        opt = solvers.make_optimizer(run.solver, model.parameters())
        step = captured_step.Step(model, opt, data, contextlib.nullcontext, graphs)
        trace = []
        for it in range(12):
            step.reset_loss()
            step(it, solvers.lr_at(run.solver, it) if it < 6 else 0.01)  # an lr change: a fill, no re-capture
            trace.append(step.loss_sum.item())
        # a capture that fell back to eager would make this compare eager with eager
        assert step.step_mode == ("cuda-graph" if graphs else "eager"), step.step_mode
        losses[graphs] = trace
    assert torch.allclose(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Fashion-MNIST is not installed (Debian package dataset-fashion-mnist)")
@pytest.mark.slow
def test_bench_precision_check_trains_both_precisions_on_fashion_mnist(tmp_path):
    out = tmp_path / "bench.md"
    code = main(["bench", "bench.rows=[]", "bench.s1=false", "bench.grouped.rows=[]", "bench.precision.rows=[13/slim-300K]",
                 "bench.precision.seeds=2", "bench.precision.iterations=2", "bench.precision.batch_size=8",
                 "bench.precision.train_size=16", "bench.precision.test_size=8", f"bench.out={out}",
                 f"data_dir={tmp_path}/data", "device=cpu"])
    assert code == 0
    lines = [line for line in out.read_text().splitlines() if line.startswith("| 13/slim-300K |")]
    assert [line.split("|")[2].strip() for line in lines] == ["fp32", "bf16"]
    for line in lines:
        assert line.split("|")[4].strip() == "2"  # two seeds each


# The smoke profile on a sliver of its data: what the pool records is checked, not what the runs learn.


@pytest.mark.slow
def test_packed_runs_share_a_device_and_record_every_row_once(tmp_path):
    """jobs_per_device=2 on the CPU: the runs go through the process pool and its device slots; a twin row
    of another table (Table 9's first row is Table 2's 8L) is recorded from the shared run."""
    code = main(["run", "table=[2,9]", "profile=smoke", "quiet=true", "device=cpu", "jobs_per_device=2",
                 *TINY, f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/experiments"])
    assert code == 0
    rows2, bad2 = results.read(tmp_path / "results" / "table2.csv")
    rows9, bad9 = results.read(tmp_path / "results" / "table9.csv")
    assert not bad2 and not bad9
    assert sorted(r["row_id"] for r in rows2) == ["10L", "13L", "8L", "9L"]
    assert len(rows9) == 2 and all(r["status"] == "ok" for r in rows2 + rows9)
    twin = {r["config_hash"] for r in rows2} & {r["config_hash"] for r in rows9}
    assert len(twin) == 1  # one network trained once, recorded in both tables
    assert len(list((tmp_path / "experiments").iterdir())) == 5  # 4 + 2 rows, one of them shared


def test_packed_throughput_is_all_images_over_the_whole_span():
    """Two processes of 1,000 images each, over 0-10 s and 5-15 s: 2,000 images in 15 s, not 100 + 100 img/s."""
    from simpnet_cli.tools import bench

    assert bench.packed_rate([(1000, 0.0, 10.0), (1000, 5.0, 15.0)]) == pytest.approx(2000 / 15)
    assert bench.packed_rate([(500, 2.0, 4.0)]) == 250


def test_mps_is_detected_from_its_daemon_or_its_control_pipe(tmp_path):
    from simpnet_cli.tools import bench

    proc, pipes = tmp_path / "proc", tmp_path / "mps"
    (proc / "17").mkdir(parents=True)
    (proc / "17" / "comm").write_text("python\n")
    pipes.mkdir()
    assert bench.mps_status(proc, str(pipes)) == "off"
    (proc / "42").mkdir()
    (proc / "42" / "comm").write_text("nvidia-cuda-mps\n")  # nvidia-cuda-mps-control, as the kernel cuts it
    assert bench.mps_status(proc, str(pipes)) == "on (nvidia-cuda-mps runs)"
    (proc / "42" / "comm").unlink()
    (pipes / "control").write_text("")
    assert bench.mps_status(proc, str(pipes)).startswith("on (control pipe")


def test_grouped_conv_probe_times_every_conv_alone_grouped_and_padded_and_says_cpu(tmp_path):
    from simpnet_cli.config import tables as T
    from simpnet_cli.tools import bench

    out = tmp_path / "bench.md"
    code = main(["bench", "bench.rows=[]", "bench.s1=false", "bench.grouped.rows=[2/8L]", f"bench.out={out}",
                 "device=cpu"])
    assert code == 0
    text = out.read_text()
    assert "CPU figures, at batch 2 for one step in fp32" in text and run_state.device_name(torch.device("cpu")) in text
    lines = [line for line in text.splitlines() if line.startswith("| 2/8L |")]
    t = T.load_table("2")
    convs = bench.conv_layers(T.resolve(t, t.row("8L"), 0, {}))
    assert len(lines) == len(convs) == 8  # 8 layers, all convolutions (the classifier is the last conv's fc)
    cin, cout, k, stride, pad, h, w = convs[0]
    assert (cin, k, h, w) == (3, 3, 32, 32)
    assert lines[0].split("|")[3].strip() == f"3 -> {cout}, 3x3/1, 32x32"
    for line in lines:
        one, grouped, padded = (float(c.split()[0]) for c in line.split("|")[4:7])
        assert one > 0 and grouped > 0 and padded > 0
