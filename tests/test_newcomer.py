"""What a new user meets first (issue 27, part A): the ONNX export, the Python API, discoverable flags, git-clean
runs, adapted dropout ranges, one line for every missing dataset, the loss logged between evaluations."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import simpnet_cli
from simpnet_cli import cli

HAS_ONNX_EXTRA = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript"))
SMOKE_8L = ["table=2", "row=8L", "profile=smoke", "quiet=true"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One finished smoke run of Table 2's 8L (four steps on synthetic data): (its folder, results_dir)."""
    tmp = tmp_path_factory.mktemp("smoke_run")
    assert cli.main(["run", *SMOKE_8L, f"results_dir={tmp}/r", f"runs_dir={tmp}/e"]) == 0
    (run_dir,) = [p for p in (tmp / "e").iterdir() if (p / "result.json").exists()]
    return run_dir, tmp / "r"


# --------------------------------------------------------------------------- A1: export


@pytest.mark.skipif(not HAS_ONNX_EXTRA, reason="the onnx extra is not installed (pip install -e '.[onnx]')")
def test_onnx_export_computes_what_the_torch_model_computes(smoke_run, tmp_path, capsys):
    run_dir, _ = smoke_run
    out = tmp_path / "m.onnx"
    assert cli.main(["export", f"run_dir={run_dir}", "format=onnx", f"out={out}"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    model = simpnet_cli.load_model(run_dir)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # another batch size than exported
    with torch.no_grad():
        expected = model(x).numpy()
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(["logits"], {"images": x.numpy()})[0]
    else:
        from onnx.reference import ReferenceEvaluator

        got = ReferenceEvaluator(str(out)).run(None, {"images": x.numpy()})[0]
    assert got.shape == (5, 10)
    assert abs(got - expected).max() < 1e-4


def test_onnx_export_without_the_extra_names_the_command_for_a_clone(smoke_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    assert cli.main(["export", f"run_dir={smoke_run[0]}", "format=onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxscript" in err and "pip install -e '.[onnx]'" in err
