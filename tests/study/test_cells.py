from __future__ import annotations

import pytest

from vlmerge.study.cells import CellStore, config_hash


def test_cells_cache_by_config_and_resume_after_a_kill(tmp_path) -> None:
    calls: list[int] = []

    def work(x: int):
        def fn(cell):
            calls.append(x)
            if x == 3:
                raise KeyboardInterrupt  # the run is killed while computing this cell
            return {"value": x * 10}
        return fn

    store = CellStore(tmp_path)
    assert store.run("a", {"x": 1}, work(1)) == {"value": 10}
    assert store.run("a", {"x": 2}, work(2)) == {"value": 20}
    with pytest.raises(KeyboardInterrupt):
        store.run("a", {"x": 3}, work(3))
    again = CellStore(tmp_path)  # a new process after the kill
    assert again.run("a", {"x": 1}, work(1)) == {"value": 10}
    assert again.run("a", {"x": 2}, work(2)) == {"value": 20}
    assert calls == [1, 2, 3]  # finished cells were not recomputed
    assert again.computed == []
    assert not again.cell("a", {"x": 3}).done
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1}) != config_hash({"a": 2})
    assert store.cell("a", {"x": 1}).dir != store.cell("b", {"x": 1}).dir
