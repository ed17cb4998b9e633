"""Several processes: ``torchrun`` with 2 gloo processes on the CPU writes the same checkpoint as one
process, and a rank that fails ends the run with its message instead of leaving the others waiting."""
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from quant.loading import read_tensors

HERE = Path(__file__).resolve().parent
COMMON = ["--nsamples", 8, "--seqlen", 32, "--batch-size", 2, "--group-size", 32, "--no-progress"]


def hmq(args, processes: int, env_extra: dict | None = None, timeout: int = 300):
    """The hmq command in ``processes`` processes (1: plain python, no torchrun), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env_extra or {})}  # a rank that aborts shows where
    worker = [str(HERE / "dist_worker.py"), *map(str, args)]
    if processes == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *worker]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if processes > 1 and proc.returncode != 0 and "Signal 6 (SIGABRT)" in proc.stderr:
        # CI has twice seen a gloo rank abort (SIGABRT, no Python error) in a run that passed 53 times
        # of 53 here, idle and under load: not reproduced, so the command is run once more and the
        # rank's stacks reported, to find the cause from them; a second abort fails the test
        warnings.warn(f"a rank aborted; running the command once more. What it printed: {why(proc)}")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def why(proc) -> str:
    """What a failed run printed: where a process aborted (the fault handler's stacks, which the list
    of extension modules after them would push out of a plain tail), then the end of its output."""
    err = proc.stderr
    start = err.find("Fatal Python error")
    fatal = err[start: err.find("Extension modules", start)][:6000] if start >= 0 else ""
    return fatal + "\n...\n" + err[-3000:]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    from .conftest import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-llama-dist"), tokenizer_dir, num_hidden_layers=3)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_two_processes_write_the_checkpoint_one_writes(model_dir, text_file, tmp_path, method):
    args = ["quantize", "--model", model_dir, "--calib", text_file, "--bits", 3, "--method", method, *COMMON]
    one = hmq([*args, "--out", tmp_path / "one"], 1)
    assert one.returncode == 0, why(one)
    two = hmq([*args, "--out", tmp_path / "two"], 2)
    assert two.returncode == 0, why(two)
    a, b = read_tensors(tmp_path / "one"), read_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert two.stdout.count("wrote") == 1  # one process reports and writes


MEASURE = ["--loss-samples", 2, "--loss-seqlen", 32, "--probes", 2, "--candidates", "2,4", "--pair-bits", 2]


def measured(path) -> dict:
    import json

    data = json.loads(Path(path).read_text())
    data.pop("seconds")  # how long each stage took
    return data


def test_two_processes_write_the_measurement_one_writes(model_dir, text_file, tmp_path):
    # 10 probes, all kept: the second process runs probes 4-7 of the first round
    args = ["measure", "--model", model_dir, "--calib", text_file, *COMMON, *MEASURE, "--probes", 10,
            "--trace-tol", 0]
    one = hmq([*args, "--out", tmp_path / "one.sens"], 1)
    assert one.returncode == 0, why(one)
    two = hmq([*args, "--out", tmp_path / "two.sens"], 2)
    assert two.returncode == 0, why(two)
    a, b = measured(tmp_path / "one.sens"), measured(tmp_path / "two.sens")
    assert a == b, [k for k in a if a[k] != b[k]]
    assert len(a["pairs"]) > 0 and a["settings"]["trace_probes"] == 10 and two.stdout.count("wrote") == 1


def test_two_processes_measure_fisher_traces_and_taylor_context_as_one(model_dir, text_file, tmp_path):
    """The gradient sweeps: each process takes every second window. Fisher rows are gathered in
    window order (equal to the last bit); the Taylor gradients are summed across processes in
    another order, so what they predict agrees within rounding."""
    import math

    args = ["measure", "--model", model_dir, "--calib", text_file, *COMMON, *MEASURE, "--trace", "fisher",
            "--context-bits", 2, "--context-method", "taylor"]
    one = hmq([*args, "--out", tmp_path / "one.sens"], 1)
    assert one.returncode == 0, why(one)
    two = hmq([*args, "--out", tmp_path / "two.sens"], 2)
    assert two.returncode == 0, why(two)
    a, b = measured(tmp_path / "one.sens"), measured(tmp_path / "two.sens")
    assert a["trace"] == b["trace"] and a["trace_se"] == b["trace_se"] and a["settings"]["trace_method"] == "fisher"
    assert a["context_single"] and a["context_single"] != a["context_exact"]  # some values came from the gradients

    def close(x, y):
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(close(x[k], y[k]) for k in x)
        if isinstance(x, list):
            return len(x) == len(y) and all(close(u, v) for u, v in zip(x, y))
        if isinstance(x, float) and isinstance(y, float):
            return math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-7)
        return x == y

    assert close(a, b), [k for k in a if not close(a[k], b[k])]


def test_two_processes_killed_and_rerun_write_the_measurement_one_writes(model_dir, text_file, tmp_path):
    args = ["measure", "--model", model_dir, "--calib", text_file, *COMMON, *MEASURE]
    one = hmq([*args, "--out", tmp_path / "one.sens"], 1)
    assert one.returncode == 0, why(one)
    killed = hmq([*args, "--out", tmp_path / "two.sens"], 2, {"HMQ_TEST_KILL_AFTER": "2"})
    assert killed.returncode != 0 and (tmp_path / "two.sens.partial" / "weights-rank1").is_dir()
    two = hmq([*args, "--out", tmp_path / "two.sens"], 2)
    assert two.returncode == 0, why(two)
    assert "2 of 3 decoder layers were already measured" in two.stderr
    assert measured(tmp_path / "one.sens") == measured(tmp_path / "two.sens")


def budget_run_as_one(args, tmp_path) -> dict:
    """Run the mixed ``args`` in 1 and in 2 processes; both measure and write the same; returns the tensors."""
    one = hmq([*args, "--out", tmp_path / "one"], 1)
    assert one.returncode == 0, why(one)
    two = hmq([*args, "--out", tmp_path / "two"], 2)
    assert two.returncode == 0, why(two)
    assert measured(tmp_path / "one.sens") == measured(tmp_path / "two.sens")
    a, b = read_tensors(tmp_path / "one"), read_tensors(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a


@pytest.mark.parametrize("search", [[], ["--search", 3, "--search-samples", 4, "--search-seqlen", 32,
                                         "--search-offspring", 4]])
def test_two_processes_measure_and_quantize_under_a_budget_as_one(model_dir, text_file, tmp_path, search):
    """Measured, allocated, searched (the children spread over the processes) and quantized."""
    budget_run_as_one(["quantize", "--model", model_dir, "--calib", text_file, "--budget", 3.0, *COMMON, *MEASURE, "--recipe", "measure",
                       *search], tmp_path)
    if search:
        import json

        one, two = (json.loads((tmp_path / d / "hmq.json").read_text())["allocation"]["search"] for d in ("one", "two"))
        assert one["evaluations"] == two["evaluations"] and one["history"] == two["history"]


def test_two_processes_killed_and_rerun_write_the_checkpoint_one_writes(model_dir, text_file, tmp_path):
    args = ["quantize", "--model", model_dir, "--calib", text_file, "--bits", 3, *COMMON]
    one = hmq([*args, "--out", tmp_path / "one"], 1)
    assert one.returncode == 0, why(one)
    killed = hmq([*args, "--out", tmp_path / "two"], 2, {"HMQ_TEST_KILL_AFTER": "2"})
    assert killed.returncode != 0 and (tmp_path / "two.partial" / "inputs-00002-rank1.safetensors").is_file()
    one_proc = hmq([*args, "--out", tmp_path / "two"], 1)  # each process saved its own batches' activations
    assert one_proc.returncode == 2 and "differs in: processes" in one_proc.stderr
    two = hmq([*args, "--out", tmp_path / "two"], 2)
    assert two.returncode == 0, why(two)
    assert "2 of 3 decoder layers were already quantized" in two.stderr
    a, b = read_tensors(tmp_path / "one"), read_tensors(tmp_path / "two")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.mark.parametrize("against", ["--baseline", "--kl"])
def test_two_processes_evaluate_as_one(model_dir, text_file, tmp_path, against):
    import json

    q = hmq(["quantize", "--model", model_dir, "--calib", text_file, "--bits", 3, "--method", "rtn", *COMMON,
             "--out", tmp_path / "q"], 1)
    assert q.returncode == 0, why(q)
    args = ["eval", "--model", tmp_path / "q", against, "--data", text_file, "--seqlen", 32, "--max-windows", 20,
            "--no-progress"]
    one = hmq([*args, "--json", tmp_path / "one.json"], 1)
    assert one.returncode == 0, why(one)
    two = hmq([*args, "--json", tmp_path / "two.json"], 2)  # 20 windows: batches 0 and 2 here, 1 there
    assert two.returncode == 0, why(two)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    for r in (a, b, a["baseline"], b["baseline"]):
        r.pop("seconds", None)  # under --kl the baseline comes from the same sweep, timed once
    assert a == b and a["windows"] == 20 and a["ppl"] != a["baseline"]["ppl"]
    assert ("kl_p999" in a) == (against == "--kl")


def test_a_slow_rank_finds_the_resume_folder_the_first_one_starts(model_dir, text_file, tmp_path):
    # the first process creates the resume folder; one that looks for it later must not take it
    # for someone else's folder (as CI once saw under load)
    args = ["quantize", "--model", model_dir, "--calib", text_file, "--bits", 3, "--method", "rtn", *COMMON,
            "--out", tmp_path / "q"]
    done = hmq(args, 2, {"HMQ_TEST_SLOW_RANK": "1"})
    assert done.returncode == 0, why(done)
    assert (tmp_path / "q").is_dir() and not (tmp_path / "q.partial").exists()


def test_a_failing_rank_takes_the_others_down_with_its_message(model_dir, text_file, tmp_path):
    args = ["quantize", "--model", model_dir, "--calib", text_file, "--bits", 3, *COMMON, "--out", tmp_path / "q"]
    t0 = time.perf_counter()
    done = hmq(args, 2, {"HMQ_TEST_FAIL_RANK": "1"}, timeout=240)
    assert done.returncode != 0
    assert "injected failure on rank 1" in done.stderr
    assert time.perf_counter() - t0 < 200  # ended, not left waiting for the dead rank
    assert not (tmp_path / "q").exists()


def test_every_command_runs_under_torchrun(model_dir, text_file, tmp_path):
    """inspect and export (file work, nothing to share out) run once, in the first process; frontier
    quantizes and evaluates its points across the processes and writes what one process writes."""
    import json

    q = hmq(["quantize", "--model", model_dir, "--calib", text_file, "--bits", 4, "--method", "rtn", *COMMON,
             "--out", tmp_path / "q"], 1)
    assert q.returncode == 0, why(q)
    one, two = hmq(["inspect", tmp_path / "q", "--json"], 1), hmq(["inspect", tmp_path / "q", "--json"], 2)
    assert two.returncode == 0, why(two)
    assert json.loads(two.stdout) == json.loads(one.stdout)
    ex = hmq(["export", tmp_path / "q", "--format", "compressed-tensors", "--out", tmp_path / "ct"], 2)
    assert ex.returncode == 0, why(ex)
    assert ex.stdout.count("wrote") == 1 and read_tensors(tmp_path / "ct")
    m = hmq(["measure", "--model", model_dir, "--calib", text_file, *COMMON, *MEASURE, "--out", tmp_path / "m.sens"], 1)
    assert m.returncode == 0, why(m)
    args = ["frontier", "--model", model_dir, "--sensitivity", tmp_path / "m.sens", "--verify", 2, "--uniform-bits", 4,
            "--eval-windows", 4, "--eval-seqlen", 32, "--nsamples", 8, "--seqlen", 32, "--batch-size", 2, "--no-progress"]
    f1, f2 = hmq([*args, "--out", tmp_path / "f1"], 1), hmq([*args, "--out", tmp_path / "f2"], 2)
    assert f1.returncode == 0 and f2.returncode == 0, why(f2 if f1.returncode == 0 else f1)
    a, b = (json.loads((tmp_path / d / "frontier.json").read_text()) for d in ("f1", "f2"))
    for data in (a, b):
        data["bit_map"].pop("solve_seconds")  # how long the solver took
    assert a == b and len(a["verified"]) == 2 and len(a["uniform"]) == 2
    assert (tmp_path / "f2" / "frontier.png").is_file() and f2.stdout.count("fp perplexity") == 1


def test_an_affine_step_that_does_not_split_over_the_processes_is_refused(model_dir, text_file, tmp_path):
    done = hmq(["quantize", "--model", model_dir, "--calib", text_file, *COMMON, "--method", "affine",
                "--affine-batch", 3, "--out", tmp_path / "a"], 2)
    assert done.returncode != 0 and "--affine-batch 3 does not split evenly: pass a multiple of 2" in done.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()


def test_frontier_with_too_few_batches_for_its_processes_is_refused_before_any_work(tmp_path):
    """One calibration batch cannot be spread over two processes: said before the model is loaded."""
    done = hmq(["frontier", "--model", tmp_path / "no-model", "--sensitivity", tmp_path / "none.sens", "--verify", 1,
                "--nsamples", 2, "--batch-size", 2, "--out", tmp_path / "f"], 2)
    assert done.returncode != 0 and "2 windows make 1 batches of 2, fewer than the 2 processes" in done.stderr
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("method", ["affine", "affine+gptq"])
def test_two_processes_learn_the_transforms_one_learns(model_dir, text_file, tmp_path, method):
    """Each affine step averages the gradients of one batch from each process (all-reduced): the
    checkpoint one process writes with --affine-batch 2, bit for bit (two addends sum the same in
    either order)."""
    import json

    args = ["quantize", "--model", model_dir, "--calib", text_file, "--bits", 3, "--method", method, *COMMON,
            "--affine-epochs", 2, "--nsamples", 10]  # 5 batches: the second process has none in the last step
    one = hmq([*args, "--affine-batch", 2, "--out", tmp_path / "one"], 1)
    assert one.returncode == 0, why(one)
    two = hmq([*args, "--out", tmp_path / "two"], 2)  # the step size follows the processes
    assert two.returncode == 0, why(two)
    a, b = read_tensors(tmp_path / "one"), read_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    configs = [json.loads((tmp_path / d / "hmq.json").read_text())["quant_config"] for d in ("one", "two")]
    assert configs[0]["affine_batch"] == configs[1]["affine_batch"] == 2
    plain = hmq([*args, "--out", tmp_path / "plain"], 1)  # one batch a step: another trajectory
    assert plain.returncode == 0, why(plain)
    c = read_tensors(tmp_path / "plain")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_two_processes_bisect_as_one(model_dir, text_file, tmp_path):
    """The perplexity bisection: measured, then each step quantized and evaluated across the processes."""
    import json

    args = ["quantize", "--model", model_dir, "--calib", text_file, *COMMON, *MEASURE, "--recipe", "measure", "--max-ppl-increase", "50%",
            "--bisect-steps", 2, "--eval-windows", 4, "--eval-seqlen", 32]
    one = hmq([*args, "--out", tmp_path / "one"], 1)
    assert one.returncode == 0, why(one)
    two = hmq([*args, "--out", tmp_path / "two"], 2)
    assert two.returncode == 0, why(two)
    a, b = (json.loads((tmp_path / d / "hmq.json").read_text())["allocation"] for d in ("one", "two"))
    steps = [[(s["budget"], s["ppl"]) for s in m["bisection"]] for m in (a, b)]
    assert steps[0] == steps[1] and len(steps[0]) == 3
    ta, tb = read_tensors(tmp_path / "one"), read_tensors(tmp_path / "two")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_two_processes_measure_search_and_quantize_a_moe_model_as_one(tokenizer_dir, text_file, tmp_path):
    """Every expert's routed-token count is gathered over the processes; nothing waits on a rank."""
    from .conftest import save_tiny

    model_dir = save_tiny(tmp_path / "moe", tokenizer_dir, model_type="qwen2_moe")
    a = budget_run_as_one(["quantize", "--model", model_dir, "--calib", text_file, "--budget", 3.0, *COMMON, *MEASURE, "--recipe", "measure",
                           "--search", 2, "--search-samples", 4, "--search-seqlen", 32, "--search-offspring", 2], tmp_path)
    assert "model.layers.1.mlp.experts.3.down_proj.qweight" in a


def test_two_processes_select_as_one(model_dir, text_file, tmp_path):
    """The default recipe: database rows, single-unit passes and children spread over two processes
    write the checkpoint one process writes, after the same search."""
    import json

    args = ["quantize", "--model", model_dir, "--calib", text_file, "--budget", 3.0, *COMMON, "--search", 2,
            "--search-samples", 4, "--search-seqlen", 32, "--search-offspring", 4, "--search-screen", 1]
    one = hmq([*args, "--out", tmp_path / "one"], 1)
    assert one.returncode == 0, why(one)
    two = hmq([*args, "--out", tmp_path / "two"], 2)
    assert two.returncode == 0, why(two)
    a, b = read_tensors(tmp_path / "one"), read_tensors(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one, two = (json.loads((tmp_path / d / "hmq.json").read_text())["allocation"] for d in ("one", "two"))
    assert one["search"]["history"] == two["search"]["history"] and one["units"] == two["units"]


def test_only_the_first_process_runs_inspect_and_export(tmp_path, monkeypatch, capsys):
    """Under torchrun every other process leaves export and inspect at once: nothing written, nothing
    printed (before it joins any process group, so it cannot wait on one)."""
    import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["export", str(tmp_path / "none"), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    assert cli.main(["inspect", str(tmp_path / "none")]) == 0
    assert not (tmp_path / "ct").exists() and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")  # the first process does the work (here: finds no checkpoint)
    assert cli.main(["inspect", str(tmp_path / "none")]) != 0
