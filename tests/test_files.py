"""Files written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from domainbed_fish.files import write_text_atomic


def test_an_atomic_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_write_cut_short_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text('{"complete": true}')
    real_write = Path.write_text

    def killed_half_way(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, '{"complete": false, "longer": "text"}')
    monkeypatch.undo()
    assert path.read_text() == '{"complete": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_readers_never_see_the_file_half_written(tmp_path, monkeypatch):
    """The file itself is never written in place: a write cut short, wherever it lands, cannot
    leave it truncated."""
    path = tmp_path / "report.json"
    path.write_text('{"complete": true}')
    real_write = Path.write_text

    class Killed(Exception):
        pass

    def cut_short_on_the_file(self, text, *args, **kwargs):
        if self == path:
            real_write(self, text[: len(text) // 2], *args, **kwargs)
            raise Killed
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", cut_short_on_the_file)
    write_text_atomic(path, '{"complete": false, "longer": "text"}')
    monkeypatch.undo()
    assert path.read_text() == '{"complete": false, "longer": "text"}'
