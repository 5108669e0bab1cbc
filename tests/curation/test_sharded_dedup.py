"""`distill-curate dedup --submit local --parts N`: N tasks, each searching its rows against one index of the pool,
give the kept list and groups of one process, with an exact and with an inverted-list index; a part whose task was
killed is searched again on a rerun, and the finished ones are not; bad input is one line and status 2, and an
earlier result stays as it was."""

import json
import shutil

import numpy as np
import pytest

from data_curation.cli import main
from data_curation.dedup import search_pairs, similar_pairs
from data_curation.embeddings import ArrayRows, EmbeddingStore
from data_curation.embeddings import contiguous_runs
from data_curation.sharded_dedup import EXIT_PART, part_rows
from tests.curation.test_distributed_kmeans import files_of, make_store
from tests.distributed.test_submit import _fake_slurm

RESULTS = ("kept.txt", "groups.json")
# an exact index; inverted lists; and a pool streamed shard by shard past --memory-gb (76.8 kB of float32 rows),
# in an index of 8-bit codes, or (a budget below the 8-bit codes' 19.2 kB) of product-quantised codes whose
# similarities are then computed again exactly
KINDS = {"exact": [], "ivf": ["--exact-below", "100"], "streamed": ["--memory-gb", str(30_000 / 2**30)],
         "quantised": ["--memory-gb", str(20_000 / 2**30)]}


def pool_with_copies(n=600, dim=32, seed=0):
    """Random directions, and 60 near-copies of earlier rows (some of copies: chains), many in other parts."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    for number, row in enumerate(range(n - 60, n)):
        original = (number * 37) % (n - 60) if number % 5 else row - 1  # every fifth a copy of the copy before it
        x[row] = x[original] + 0.03 * np.linalg.norm(x[original]) / np.sqrt(dim) * rng.normal(size=dim)
    return x


def dedup(store, out, *extra):
    return main(["dedup", "--embeddings", str(store), "--threshold", "0.95", "--no-grid", "--output", str(out),
                 *extra])


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    store = make_store(folder / "emb", pool_with_copies(), shard=150)
    one = {}
    for kind, extra in KINDS.items():
        one[kind] = folder / f"one_{kind}"
        assert dedup(store, one[kind], *extra) == 0
        assert len(json.loads((one[kind] / "groups.json").read_text())) >= 20  # the copies found
    return {"store": store, "one": one}


def same_result(a, b):
    for name in RESULTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_the_parts_edges_are_the_edges_of_one_process():
    import faiss

    rows = ArrayRows(pool_with_copies(), batch=100)
    whole = similar_pairs(rows, 0.95, with_scores=True)
    index = faiss.IndexFlatIP(rows.dim)
    index.add(rows.vectors)
    found = [search_pairs(index, part_rows(rows, a, b), 0.95, 16, len(rows), a) for a, b in contiguous_runs(len(rows), 3)]
    from data_curation.dedup import merge_pairs

    merged = merge_pairs(np.concatenate([p for p, _ in found]), np.concatenate([s for _, s in found]))
    assert len(whole[0]) >= 60 and (merged[0] == whole[0]).all() and np.allclose(merged[1], whole[1])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_three_local_parts_give_the_dedup_of_one_process(pool, tmp_path, capsys, kind):
    extra = KINDS[kind]
    out = tmp_path / "three"
    assert dedup(pool["store"], out, *extra, "--submit", "local", "--parts", "3", "--wait") == 0
    printed = capsys.readouterr().out
    assert "3 of 3 parts to search" in printed and "kept " in printed
    same_result(pool["one"][kind], out)
    assert sorted(p.name for p in (out / "parts").iterdir()) == sorted(
        [f"{name}_{p:04d}{ext}" for p in range(3) for name, ext in (("edges", ".npy"), ("scores", ".npy"),
                                                                     ("done", ""))] + ["run.json"])
    assert (out / "index" / "pool.faiss").is_file()


def test_a_killed_part_is_searched_again_and_the_finished_ones_are_not(pool, tmp_path, capsys, monkeypatch):
    out = tmp_path / "three"
    command = ["--submit", "local", "--parts", "3", "--wait"]
    monkeypatch.setenv(EXIT_PART, "1")  # the task of part 1 ends before writing its edges
    assert dedup(pool["store"], out, *command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ended without its result" in err and "run the same command again" in err
    assert not (out / "kept.txt").exists()
    parts = out / "parts"
    assert sorted(p.name for p in parts.glob("done_*")) == ["done_0000", "done_0002"]
    written = {p.name: p.stat().st_mtime_ns for p in parts.glob("*_000[02]*")}
    monkeypatch.delenv(EXIT_PART)
    assert dedup(pool["store"], out, *command) == 0
    assert "1 of 3 parts to search (2 found finished)" in capsys.readouterr().out
    assert {name: (parts / name).stat().st_mtime_ns for name in written} == written
    same_result(pool["one"]["exact"], out)
    assert dedup(pool["store"], out, *command) == 0  # everything done: merged again, nothing submitted
    assert "all 3 parts found finished" in capsys.readouterr().out
    same_result(pool["one"]["exact"], out)


def test_bad_input_is_one_line_and_leaves_an_earlier_result_as_it_was(pool, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(pool["one"]["exact"], out)
    before = files_of(out)

    def refused(*args, store=pool["store"]):
        code = dedup(store, out, *args)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("distill-curate dedup: error: "), err
        assert files_of(out) == before
        return err

    for option, value in (("--parts", "0"), ("--nprobe", "0")):  # usage errors: argparse's, before anything runs
        with pytest.raises(SystemExit) as stopped:
            dedup(pool["store"], out, "--submit", "local", option, value)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert stopped.value.code == 2
        assert last == f"distill-curate dedup: error: argument {option}: must be at least 1, got 0"
        assert files_of(out) == before
    assert "--parts 601 but the store has 600 usable embeddings" in refused("--submit", "local", "--parts", "601")
    assert "--parts 3 runs with --submit" in refused("--parts", "3")
    assert "SLURM option" in refused("--submit", "local", "--parts", "3", "--partition", "gpu")

    monkeypatch.setenv("PATH", f"{_fake_slurm(tmp_path / 'bin', partitions='debug')}:/usr/bin:/bin")
    err = refused("--submit", "slurm", "--parts", "3", "--partition", "gpu")
    assert "partition 'gpu' does not exist on this cluster: choose one of debug (as `sinfo` lists them)" in err
    monkeypatch.undo()

    import distill.launch.slurm as slurm

    edited = shutil.copytree(pool["store"], tmp_path / "edited")
    real_submit = slurm.submit_or_explain

    def submitted_then_edited(submit, folder):  # `embed` adds a shard while the job's tasks start
        jobs = real_submit(submit, folder)
        EmbeddingStore(edited).append(np.random.default_rng(1).normal(size=(10, 32)).astype(np.float32), [f"new{i}.png" for i in range(10)])
        return jobs

    monkeypatch.setattr(slurm, "submit_or_explain", submitted_then_edited)
    err = refused("--submit", "local", "--parts", "3", "--wait", store=edited)
    assert f"{edited} changed since the job was submitted" in err or f"{edited} changed while" in err


def test_the_index_codes_fit_three_quarters_of_the_budget(tmp_path):
    """float16 codes, else 8-bit, else product quantisation with the most 4-bit sub-vectors that fit; a budget
    too small even for those is one clear error."""
    from data_curation.dedup import code_kind
    from data_curation.embeddings import select
    from distill.errors import InputError

    store = make_store(tmp_path / "emb", pool_with_copies(), shard=150)  # 600 x 32: float16 codes 38.4 kB
    kinds = {budget: code_kind(select(store, budget / 2**30)[0])
             for budget in (1e6, 60_000, 30_000, 20_000, 4_000)}
    assert kinds[1e6] == (None, 0)  # held in memory: float32
    assert kinds[60_000] == ("float16", 0) and kinds[30_000] == ("8bit", 0)
    assert kinds[20_000] == ("pq", 32)  # 600 x 16 bytes = 9.6 kB <= 15 kB; 8-bit would take 19.2 kB
    assert kinds[4_000] == ("pq", 8)  # 600 x 4 bytes = 2.4 kB <= 3 kB
    with pytest.raises(InputError, match="raise --memory-gb"):
        code_kind(select(store, 500 / 2**30)[0])  # not even one byte a row


def test_product_quantised_similarities_are_replaced_by_exact_ones(tmp_path):
    """The edges of an index of 4-bit product-quantised codes carry the exact cosine similarity of their rows,
    all at or above the threshold, and are the edges an exact search finds; a part searched without the pool to
    rescore from is refused."""
    import faiss

    from data_curation.dedup import approximate, build_index
    from data_curation.embeddings import select

    x = pool_with_copies()
    store = make_store(tmp_path / "emb", x, shard=150)
    rows, _ = select(store, 20_000 / 2**30)
    index = build_index(rows, exact_below=10_000)
    assert approximate(index)
    pairs, scores = search_pairs(index, rows, 0.95, 16, len(rows), pool=rows)
    unit = x.astype(np.float16).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    assert len(pairs) >= 60 and (scores >= 0.95).all()
    assert np.allclose(scores, (unit[pairs[:, 0]] * unit[pairs[:, 1]]).sum(1), atol=1e-6)
    exact = faiss.IndexFlatIP(rows.dim)
    exact.add(unit)
    truth, _ = search_pairs(exact, ArrayRows(unit), 0.95, 16, len(rows))
    assert (pairs == truth).all()
    with pytest.raises(ValueError, match="whole pool"):
        search_pairs(index, part_rows(rows, 0, 300), 0.95, 16, len(rows), 0)
