"""Atomic output storage: a finished file appears whole under its name, or not at all."""

from __future__ import annotations

import enum
import json
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from workers.storage import (
    atomic_write_path,
    part_files,
    part_path,
    remove_partial,
    sidecar_path,
    write_sidecar,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_success_renames_the_temp_file_into_place(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "take.wav"  # the folder does not exist yet
    with atomic_write_path(dest) as tmp:
        assert tmp.parent == dest.parent
        assert re.fullmatch(r"\.take\.wav\.[0-9a-f]{12}\.part", tmp.name)
        tmp.write_bytes(b"complete")
        assert not dest.exists()  # nothing under the real name until the block ends
    assert dest.read_bytes() == b"complete"
    assert list(dest.parent.iterdir()) == [dest]


def test_error_removes_the_temp_file_and_keeps_the_old_output(tmp_path: Path) -> None:
    dest = tmp_path / "take.wav"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="encoder died"), atomic_write_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("encoder died")
    assert dest.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [dest]


def test_interrupt_is_cleaned_up_too(tmp_path: Path) -> None:
    dest = tmp_path / "take.wav"
    with pytest.raises(KeyboardInterrupt), atomic_write_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_writing_nothing_is_an_error_not_an_empty_file(tmp_path: Path) -> None:
    dest = tmp_path / "take.wav"
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_write_path(dest):
        pass
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_no_partial_file_under_the_real_name(tmp_path: Path) -> None:
    dest = tmp_path / "take.wav"
    child = ("import os, signal, sys\nfrom pathlib import Path\n"
             "from workers.storage import atomic_write_path\n"
             "with atomic_write_path(Path(sys.argv[1])) as tmp:\n"
             "    tmp.write_bytes(b'half a file')\n"
             "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", child, str(dest)], cwd=REPO_ROOT,
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == -9
    assert not dest.exists()
    leftovers = list(tmp_path.glob(".take.wav.*.part"))
    assert len(leftovers) == 1  # a SIGKILL cannot clean up, so the sweep must
    assert remove_partial([dest]) == leftovers
    assert list(tmp_path.iterdir()) == []


class Mode(enum.Enum):
    LUFS = "lufs"


def test_sidecar_is_sorted_indented_json_next_to_the_file(tmp_path: Path) -> None:
    dest = tmp_path / "take.mp3"
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    path = write_sidecar(dest, {"zeta": 1, "alpha": {"b": 2, "a": 1}, "path": dest,
                                "mode": Mode.LUFS, "at": when})
    assert path == sidecar_path(dest) == tmp_path / "take.mp3.json"
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    assert list(json.loads(text)) == ["alpha", "at", "mode", "path", "zeta"]
    assert json.loads(text)["path"] == str(dest) and json.loads(text)["mode"] == "lufs"
    assert json.loads(text)["at"] == "2024-05-01T12:00:00+00:00"
    assert list(tmp_path.iterdir()) == [path]


def test_sidecar_refuses_what_json_cannot_hold_and_writes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "take.mp3"
    with pytest.raises(TypeError, match="object"):
        write_sidecar(dest, {"model": object()})
    assert list(tmp_path.iterdir()) == []


def test_remove_partial_sweeps_output_sidecar_and_temp_files(tmp_path: Path) -> None:
    dest = tmp_path / "take[1].wav"  # glob characters in the name must match literally
    other = tmp_path / "take1.wav"
    for path in (dest, sidecar_path(dest), tmp_path / ".take[1].wav.abc123.part", other,
                 tmp_path / ".take1.wav.abc123.part"):
        path.write_bytes(b"x")
    removed = remove_partial([dest, tmp_path / "never-written.wav"])
    assert sorted(p.name for p in removed) == [".take[1].wav.abc123.part", "take[1].wav",
                                               "take[1].wav.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".take1.wav.abc123.part", "take1.wav"]


def test_remove_partial_takes_only_the_exact_temp_files_of_its_path(tmp_path: Path) -> None:
    # Job "abc" writes abc.wav; job "abc.wav" writes abc.wav.wav, whose temp files also start
    # with ".abc.wav.": removing abc.wav must leave every file of the other job alone.
    ours = [tmp_path / n for n in ("abc.wav", "abc.wav.json", ".abc.wav.0a1b2c3d4e5f.part",
                                   ".abc.wav.json.0a1b2c3d4e5f.part")]
    theirs = [tmp_path / n for n in ("abc.wav.wav", "abc.wav.wav.json",
                                     ".abc.wav.wav.0a1b2c3d4e5f.part",
                                     ".abc.wav.wav.json.0a1b2c3d4e5f.part", ".abc.wav.x.part")]
    for path in ours + theirs:
        path.write_bytes(b"x")
    assert part_files(tmp_path / "abc.wav") == sorted(ours[2:])
    assert sorted(remove_partial([tmp_path / "abc.wav"])) == sorted(ours)
    assert sorted(tmp_path.iterdir()) == sorted(theirs)


def test_remove_partial_can_keep_the_finished_file_and_sidecar(tmp_path: Path) -> None:
    dest = tmp_path / "abc.mp3"
    part = part_path(dest)
    for path in (dest, sidecar_path(dest), part):
        path.write_bytes(b"x")
    assert remove_partial([dest], keep_finished=True) == [part]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc.mp3", "abc.mp3.json"]
