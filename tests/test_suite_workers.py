"""How `make test` shares the cores among its pytest-xdist workers (tests/conftest.py)."""

from tests.conftest import cores_of_worker


def test_each_worker_gets_its_own_contiguous_share_of_the_cores():
    cores = {0, 1, 2, 3, 4, 5, 6}
    shares = [cores_of_worker(cores, i, 3) for i in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert [cores_of_worker({4, 9}, i, 2) for i in range(2)] == [[4], [9]]


def test_more_workers_than_cores_take_one_core_each_in_turn():
    assert [cores_of_worker({2, 3}, i, 5) for i in range(5)] == [[2], [3], [2], [3], [2]]
    assert cores_of_worker({7}, 0, 1) == [7]


def test_an_xdist_group_runs_on_one_worker(tmp_path):
    """`make test` runs with --dist loadgroup: the tests of one group (the SLURM cluster's, a module-wide
    fixture's) must stay on one worker, or one worker's teardown ends the other's jobs. A pytest and pytest-xdist
    pair that drops the groups fails here, not mid-way through the SLURM tests."""
    import re
    import subprocess
    import sys

    (tmp_path / "test_grouped.py").write_text(
        "import time, pytest\npytestmark = pytest.mark.xdist_group('one')\n"
        + "".join(f"def test_{i}():\n    time.sleep(0.2)\n" for i in range(6)))
    (tmp_path / "test_free.py").write_text(
        "import time, pytest\n@pytest.mark.parametrize('i', range(6))\ndef test_free(i):\n    time.sleep(0.2)\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p",
                           "no:cacheprovider", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:]
    workers = set(re.findall(r"\[(gw\d+)\] .*PASSED .*test_grouped", done.stdout))
    assert len(workers) == 1, done.stdout[-2000:]
