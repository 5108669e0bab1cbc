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
