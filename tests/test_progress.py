"""The one progress helper: tqdm's bars on a terminal; off one, a plain line every few seconds with the rate and
the time left, never a carriage return."""
import pytest

from pipeline import progress as progress_module
from pipeline.progress import Lines, progress


def test_off_a_terminal_progress_is_plain_lines_with_rate_and_time_left(capsys, monkeypatch):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)  # a line at every update
    items = list(progress(range(4), desc="decode", unit="img"))
    err = capsys.readouterr().err
    assert items == [0, 1, 2, 3] and "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("[decode] 1/4 img (") and "img/s" in lines[0] and "s left" in lines[0]
    assert lines[-1].startswith("[decode] 4/4 img (") and "done in" in lines[-1]


def test_a_short_loop_that_keeps_no_bar_prints_nothing_and_a_long_one_prints_its_lines(capsys, monkeypatch):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    monkeypatch.setattr(progress_module, "EVERY_S", 3600.0)
    with progress(total=3, desc="epoch", leave=False) as bar:
        for _ in range(3):
            bar.update()
        bar.set_postfix(loss="0.5")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)
    with progress(total=2, desc="epoch", unit="batch", leave=False) as bar:
        bar.set_postfix(loss="0.25")
        bar.update()
    assert "[epoch] 1/2 batch (" in capsys.readouterr().err and "loss=0.25" in bar.line(bar.last)
    bar.write("[train] started job 1")  # the runner's own lines, as tqdm.write prints them
    assert capsys.readouterr().out == "[train] started job 1\n"


def test_on_a_terminal_it_is_tqdm(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(progress_module, "on_terminal", lambda: True)
    bar = progress(total=2, desc="x")
    assert isinstance(bar, tqdm) and not isinstance(bar, Lines)
    bar.close()


@pytest.mark.parametrize("module", ["pipeline.train.loop", "pipeline.train.predict", "pipeline.data.images",
                                    "pipeline.data.faces", "pipeline.data.synth", "pipeline.runner",
                                    "pipeline.gate.predict"])
def test_no_module_draws_its_own_bars(module):
    import importlib
    import inspect

    assert "tqdm" not in inspect.getsource(importlib.import_module(module))
