"""Pre-training tests run their tiny models on one intra-op thread: faster than two, and immune to the OpenMP
spin-waiting that makes tiny ops crawl when other processes share the cores."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
