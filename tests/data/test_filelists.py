"""File lists read back into exactly the paths and labels that were written, whatever the names hold."""

import os

import numpy as np
import pytest
from PIL import Image

from distill.data.configs import DatasetConfig

from distill.data.datasets import build_image_source
from distill.data.filelists import HEADER, read_file_list, write_file_list

AWKWARD = ["plain.png", "with space.png", "comma,in,name.png", "tab\there.png", " leading space.png",
           "trailing space.png ", "#hash.png", '"quoted".png', "line\nbreak.png", "caf\u00e9.png",
           os.fsdecode(b"latin1-\xe9t\xe9.png"), "label-like 3.png"]


def test_written_lists_read_back_the_same_paths_and_labels(tmp_path):
    entries = [(name, str(i % 3) if i % 2 else "cat") for i, name in enumerate(AWKWARD)]
    listing = write_file_list(tmp_path / "list.txt", entries)
    assert listing.read_bytes().startswith(HEADER.encode())
    assert read_file_list(listing) == entries
    write_file_list(listing, AWKWARD)  # without labels, over the old one
    assert read_file_list(listing) == [(name, None) for name in AWKWARD]
    assert b"latin1-\xe9t\xe9.png" in listing.read_bytes()  # the name's own bytes, not an escape


def test_lists_written_by_hand_keep_their_older_rule(tmp_path):
    (tmp_path / "my photo.png").write_bytes(b"")
    listing = tmp_path / "hand.txt"
    listing.write_text("# comment\na.png 3\nb.png,4\n\nmy photo.png\nc d.png 5\n")
    assert read_file_list(listing) == [("a.png", "3"), ("b.png", "4"), ("my photo.png", None), ("c d.png", "5")]


def test_the_trainer_reads_a_written_selection_of_awkward_names(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    names = [n for n in AWKWARD if "\n" not in n]
    for i, name in enumerate(names):
        pixels = np.full((8, 8), 20 * i, dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(os.fsencode(folder), os.fsencode(name)), format="PNG")
    listing = write_file_list(tmp_path / "kept.txt", [(str(folder / n), i % 2) for i, n in enumerate(names)])
    source = build_image_source(DatasetConfig(kind="filelist", path=str(listing)))
    assert source.paths == [str(folder / n) for n in names] and not source.unreadable
    assert source.labels.tolist() == [i % 2 for i in range(len(names))]
    for i in range(len(names)):
        assert np.asarray(source.load(i, "L")).max() == 20 * i


def test_a_path_list_of_a_folder_found_by_the_scan_round_trips(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.path.join(os.fsencode(tmp_path), b"\xff\xfe.png"),
                                                     format="PNG")
    source = build_image_source(DatasetConfig(kind="folder", path=str(tmp_path)))
    listing = write_file_list(tmp_path / "list.txt", source.paths)
    assert [path for path, _ in read_file_list(listing)] == source.paths


@pytest.mark.parametrize("bad", ['"unterminated.png'])
def test_a_damaged_quoted_line_is_a_clear_error(tmp_path, bad):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{HEADER}\n{bad}\n")
    from distill.errors import InputError

    with pytest.raises(InputError, match=r"list.txt line 2"):
        read_file_list(listing)
