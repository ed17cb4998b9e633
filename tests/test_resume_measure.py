"""Resume of a measurement: `hmq measure` stopped in its layer sweep, after its traces, or part way
through its loss passes, and started again, writes the same measurement as one never stopped, and
runs only what the first start had not finished."""
import json
import os

import pytest
import torch

from calibration import measure, mixed
from calibration.mixed import allocate
from quant import resume, variants
from quant.loading import read_tensors

from .conftest import Killed, run, run_logged

COMMON = ["--nsamples", 4, "--seqlen", 32, "--group-size", 32, "--no-progress"]
MEASURE = ["--loss-samples", 2, "--loss-seqlen", 32, "--probes", 2, "--candidates", "2,3,4"]





def measured(path) -> dict:
    data = json.loads(path.read_text())
    data.pop("seconds")  # how long each stage took: the only part that may differ
    return data


def kill_at(monkeypatch, where: str, after: int = 1) -> None:
    """Raise :class:`Killed` once ``after`` layers are saved (``where == "layers"``) or once the
    stage ``where`` has recorded ``after`` times."""
    save, record = resume.LayerState.save, resume.LayerState.record
    count = {"n": 0}

    def dying_save(self, i, *a, **k):
        save(self, i, *a, **k)
        if where == "layers" and self.done == after:
            raise Killed()

    def dying_record(self, key, value):
        record(self, key, value)
        if key == where:
            count["n"] += 1
            if count["n"] == after:
                raise Killed()

    monkeypatch.setattr(resume.LayerState, "save", dying_save)
    monkeypatch.setattr(resume.LayerState, "record", dying_record)


def counted_passes(monkeypatch) -> dict:
    """Counts the loss passes (one head NLL each) from now on."""
    count = {"n": 0}
    head_nll = variants.head_nll

    def counting(*a, **k):
        count["n"] += 1
        return head_nll(*a, **k)

    monkeypatch.setattr(variants, "head_nll", counting)
    return count


@pytest.mark.parametrize("where,after,extra", [("layers", 2, []), ("traces", 1, []), ("loss passes", 1, []),
                                               ("in-context passes", 1, ["--context-bits", 3])])
def test_killed_measure_resumes_to_the_same_measurement(deep_model_dir, text_file, tmp_path, monkeypatch, caplog,
                                                        where, after, extra):
    args = ["measure", "--model", deep_model_dir, "--calib", text_file, *COMMON, *MEASURE, *extra]
    with monkeypatch.context() as m:
        whole_passes = counted_passes(m)
        assert run(*args, "--out", tmp_path / "whole.sens") == 0
    assert not (tmp_path / "whole.sens.partial").exists()  # removed once the measurement is written

    with monkeypatch.context() as m:
        kill_at(m, where, after)
        with pytest.raises(Killed):
            run(*args, "--out", tmp_path / "resumed.sens")
    partial = tmp_path / "resumed.sens.partial"
    take_traces = measure._traces
    state = json.loads((partial / "state.json").read_text())
    assert state["done"] == (after if where == "layers" else 4) and not (tmp_path / "resumed.sens").exists()
    assert where == "layers" or where in state["extra"]

    with monkeypatch.context() as m:
        passes, traces = counted_passes(m), {"n": 0}
        m.setattr(measure, "_traces", lambda *a: (traces.update(n=traces["n"] + 1), take_traces(*a))[1])
        assert run_logged(caplog, *args, "--out", tmp_path / "resumed.sens") == 0
    assert f"{state['done']} of 4 decoder layers were already measured" in caplog.text
    assert traces["n"] == (where == "layers")  # the traces an earlier start finished are not taken again
    if where.endswith("passes"):  # only the passes the first start had not finished ran again
        assert passes["n"] < whole_passes["n"]
    assert measured(tmp_path / "resumed.sens") == measured(tmp_path / "whole.sens")
    assert not partial.exists()


def test_a_measure_state_from_other_settings_is_refused_then_restarted(deep_model_dir, text_file, tmp_path,
                                                                       monkeypatch, capsys):
    args = ["measure", "--model", deep_model_dir, "--calib", text_file, *COMMON, *MEASURE, "--out", tmp_path / "m.sens"]
    with monkeypatch.context() as m:
        kill_at(m, "layers", 1)
        with pytest.raises(Killed):
            run(*args)
    assert run(*args, "--seed", 1) == 2
    err = capsys.readouterr().err
    assert "unfinished measurement with other settings (differs in: request)" in err and "--restart" in err
    assert run(*args, "--seed", 1, "--restart") == 0
    assert not (tmp_path / "m.sens.partial").exists()
    assert json.loads((tmp_path / "m.sens").read_text())["settings"]["seed"] == 1


def test_a_budget_run_killed_while_measuring_goes_on_with_the_measurement(deep_model_dir, text_file, tmp_path,
                                                                          monkeypatch, caplog):
    args = ["quantize", "--model", deep_model_dir, "--calib", text_file, *COMMON, *MEASURE, "--recipe", "measure", "--budget", 3.0,
            "--pair-bits", 0]
    assert run(*args, "--out", tmp_path / "whole") == 0
    with monkeypatch.context() as m:
        kill_at(m, "layers", 2)
        with pytest.raises(Killed):
            run(*args, "--out", tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed.sens.partial" / "state.json").read_text())["done"] == 2
    assert run_logged(caplog, *args, "--out", tmp_path / "resumed") == 0
    assert "2 of 4 decoder layers were already measured" in caplog.text
    assert measured(tmp_path / "resumed.sens") == measured(tmp_path / "whole.sens")
    a, b = read_tensors(tmp_path / "whole"), read_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed.sens.partial").exists() and not (tmp_path / "resumed.partial").exists()


@pytest.mark.parametrize("where,after", [("layers", 2), ("search", 2)])
def test_a_killed_search_goes_on_to_the_same_allocation(deep_model_dir, text_file, tmp_path, monkeypatch, caplog,
                                                        where, after):
    """--search saves its candidate database layer by layer and its state after every generation."""
    args = ["quantize", "--model", deep_model_dir, "--calib", text_file, *COMMON, *MEASURE, "--recipe", "measure", "--budget", 3.0,
            "--pair-bits", 0, "--search", 4, "--search-samples", 2, "--search-seqlen", 32, "--search-offspring", 3]
    assert run(*args, "--out", tmp_path / "whole") == 0
    with monkeypatch.context() as m:
        save = resume.LayerState.save

        def only_search(self, i, *a, **k):  # the measurement's layers do not count
            if where == "layers" and not self.folder.name.endswith(".search.partial"):
                return save(self, i, *a, **k)
            return dying(self, i, *a, **k)

        kill_at(m, where, after)
        dying = resume.LayerState.save
        m.setattr(resume.LayerState, "save", only_search)
        with pytest.raises(Killed):
            run(*args, "--out", tmp_path / "resumed")
    partial = tmp_path / "resumed.search.partial"
    state = json.loads((partial / "state.json").read_text())
    assert state["done"] == (after if where == "layers" else 4)
    with monkeypatch.context() as m:  # the ILP's answer is kept: under a time limit a new solve could differ
        solves = []
        m.setattr(mixed, "allocate", lambda *a, **k: solves.append(a) or allocate(*a, **k))
        assert run_logged(caplog, *args, "--out", tmp_path / "resumed") == 0
    assert not solves
    assert (f"{after} of 4 decoder layers were done" if where == "layers" else
            f"{after} of 4 generations were done") in caplog.text
    whole, resumed = (json.loads((tmp_path / d / "hmq.json").read_text())["allocation"] for d in ("whole", "resumed"))
    for record in (whole, resumed):
        record["search"].pop("seconds"), record.pop("solve_seconds")
    assert resumed == whole
    a, b = read_tensors(tmp_path / "whole"), read_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not partial.exists() and not (tmp_path / "resumed.partial").exists()


def test_cache_folders_of_dead_processes_on_this_host_are_removed(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("HMQ_DATA_DIR", str(tmp_path))
    root = tmp_path / "work"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    mine = variants._ORPHAN_PREFIX
    folders = {"dead": root / f"{mine}{dead}-abc", "alive": root / f"{mine}{os.getpid()}-abc",
               "other host": root / f"{mine[:-1]}-3_{dead}-abc", "old style": root / "weights-abc"}
    for f in folders.values():
        f.mkdir(parents=True)
    cache = variants.WeightCache()
    assert not folders["dead"].exists()
    assert all(folders[k].exists() for k in ("alive", "other host", "old style"))
    cache.close()
    assert not cache.folder.exists()
