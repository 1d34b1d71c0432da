"""Fixtures for the whole suite.

The suite's models are tiny, so every test runs torch on one intra-op thread: faster than two at these sizes,
and immune to the OpenMP spin-waiting that makes small ops crawl when other processes share the cores.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
