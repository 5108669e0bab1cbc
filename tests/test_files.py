"""The run folder's lock (distill/files.py): one holder at a time, and it ends with the process that took it."""

import multiprocessing
import subprocess
import sys

from distill.files import hold_folder, release_folder

TRY = ("import sys; from distill.files import hold_folder; from distill.errors import InputError\n"
       "try:\n    hold_folder(sys.argv[1], 'train.output_dir')\nexcept InputError as e:\n    print(e); sys.exit(2)")


def _other_process_may_hold(folder) -> bool:
    result = subprocess.run([sys.executable, "-c", TRY, str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 2), result.stderr
    return result.returncode == 0


def _sleep(seconds):
    import time

    time.sleep(seconds)


def test_one_holder_at_a_time_and_forked_children_do_not_keep_it(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()  # a folder the run did not make: its release leaves it there
    hold_folder(folder, "train.output_dir")
    hold_folder(folder, "train.output_dir")  # the holder asking again
    assert folder.is_dir() and not _other_process_may_hold(folder)
    child = multiprocessing.get_context("fork").Process(target=_sleep, args=(30,))
    child.start()  # as a loader worker is forked: it inherits the descriptor
    try:
        release_folder(folder)
        assert _other_process_may_hold(folder)  # the child still runs, the lock is gone with its taker's release
    finally:
        child.kill()
        child.join()


def test_a_refused_holder_is_told_which_key_to_change(tmp_path):
    hold_folder(tmp_path, "train.output_dir")
    try:
        result = subprocess.run([sys.executable, "-c", TRY, str(tmp_path)], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2 and "another process is writing into train.output_dir" in result.stdout
    finally:
        release_folder(tmp_path)
