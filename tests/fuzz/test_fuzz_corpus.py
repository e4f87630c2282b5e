"""Regression replay: every seed and every shipped corpus file of every fuzzer runs clean through its one_input.

A failing input found once is kept in ``src/vdpacert/fuzz/corpus/<name>/`` after its fix, so it is
replayed here for good. Nothing is skipped: a fuzzer whose module file exists must import and pass;
one whose module is not written yet passes only while it has no shipped corpus either (a corpus
without its fuzzer would be replayed by nobody).
"""

from __future__ import annotations

import importlib.util

import pytest

from vdpacert.fuzz import engine
from vdpacert.fuzz.base import Fuzzer


@pytest.mark.parametrize("name", sorted(engine.FUZZER_MODULES))
def test_every_seed_and_corpus_file_runs_clean(name: str) -> None:
    module = engine.FUZZER_MODULES[name]
    folder = engine.corpus_dir(name)
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    if importlib.util.find_spec(module) is None:
        assert files == [], f"{folder} has a corpus, but {module} does not exist"
        print(f"{name}: {module} is not written yet; nothing to replay")
        return
    fuzzer = engine.load(name)  # an existing module that does not import fails here
    assert isinstance(fuzzer, Fuzzer) and fuzzer.name == name and fuzzer.invariants
    engine.prepare(fuzzer)
    seeds = [bytes(seed) for seed in fuzzer.seeds()]
    assert seeds, f"{name} has no seeds"
    for position, data in enumerate(seeds):
        try:
            fuzzer.one_input(data)
        except Exception as error:
            raise AssertionError(f"seed {position} ({data.hex()}): {error!r}") from error
    for path in files:
        data = path.read_bytes()
        assert len(data) <= engine.MAX_LEN, f"{path} is larger than the engines ever generate"
        try:
            fuzzer.one_input(data)
        except Exception as error:
            raise AssertionError(f"{path.name} (reproduce: vdpacert fuzz {name} --reproduce {path}): "
                                 f"{error!r}") from error
    assert len(engine.corpus(name, fuzzer)) == len(seeds) + len(files)
