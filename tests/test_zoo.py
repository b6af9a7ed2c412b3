"""The model cache (megatron_rpt/model/zoo.py): two runs that start together share one entry."""

import json

import pytest

from megatron_rpt.atomic import OutputExistsError
from megatron_rpt.model.zoo import _atomic_dir


def test_a_cache_entry_finished_by_another_process_is_used(tmp_path):
    final = tmp_path / "tiny-qwen2"

    def build_while_another_process_finishes_first(tmp):
        (tmp / "config.json").write_text(json.dumps({"mine": True}))
        final.mkdir()  # the other process renames its finished entry into place meanwhile
        (final / "config.json").write_text(json.dumps({"mine": False}))

    assert _atomic_dir(final, build_while_another_process_finishes_first) == final
    assert json.loads((final / "config.json").read_text()) == {"mine": False}  # the first one's, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-qwen2"]  # our temporary copy is gone


def test_an_unfinished_entry_in_the_way_is_still_an_error(tmp_path):
    final = tmp_path / "tiny-qwen2"

    def build(tmp):
        (tmp / "config.json").write_text("{}")
        final.mkdir()
        (final / "partial.bin").write_bytes(b"x")  # not a finished entry: no config.json

    with pytest.raises(OutputExistsError):
        _atomic_dir(final, build)
