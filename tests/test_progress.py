"""Progress bars in a log file: transient ones leave nothing, lasting ones write plain updates."""

import io

from distill import progress as progress_module


def test_a_log_file_gets_no_transient_bars_and_no_cursor_codes(monkeypatch):
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(progress_module.sys, "stderr", log)
    with progress_module.progress(total=100, desc="kNN bank", leave=False, file=log) as inner:
        inner.update(100)
    with progress_module.progress(total=10, desc="dino", file=log) as outer:
        outer.update(10)
    written = log.getvalue()
    assert "kNN bank" not in written and "\x1b[" not in written
    assert "dino: 100%" in written
