"""The fuzz engines and the ``vdpacert fuzz`` command, on toy fuzzers with a planted bug.

The toy's seed is eight bytes one bit away from containing ``de ad be ef``; an input that contains
them breaks its invariant. The mutate engine must find that input for a fixed seed, the same one
every time, write it, and ``reproduce`` must fail on it again; an exception other than
InvariantBroken is classified as a crash. The atheris engine runs in a real libFuzzer subprocess,
whose own statistics give the execution count.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from vdpacert.commands import fuzz as fuzz_command
from vdpacert.fuzz import engine
from vdpacert.fuzz.base import ByteReader, Fuzzer, InvariantBroken

BUG = b"\xde\xad\xbe\xef"
SEED = b"\x00\x01\xde\xad\xbe\xee\x02\x03"  # one bit flip from BUG


def _planted(data: bytes) -> None:
    if BUG in data:
        raise InvariantBroken("toy.no_deadbeef", f"{data.hex()} contains deadbeef")


def _crashing(data: bytes) -> None:
    if BUG in data:
        raise KeyError("deadbeef")


def _stairs(data: bytes) -> None:
    # One comparison per byte: each step is new coverage, the guide a coverage-guided engine follows.
    if len(data) >= 4 and data[0] == BUG[0]:  # noqa: SIM102 - nested on purpose: four branches, four steps
        if data[1] == BUG[1]:  # noqa: SIM102
            if data[2] == BUG[2]:  # noqa: SIM102
                if data[3] == BUG[3]:
                    raise InvariantBroken("toy.no_deadbeef", f"{data.hex()} starts with deadbeef")


def _clean(data: bytes) -> None:
    reader = ByteReader(data)
    reader.below(7)
    reader.u32()


TOY = Fuzzer("toy", "a planted bug", _planted, lambda: [SEED], ("toy.no_deadbeef",))
CRASHY = Fuzzer("crashy", "a planted KeyError", _crashing, lambda: [SEED], ())
CLEAN = Fuzzer("clean", "never fails", _clean, lambda: [SEED, b""], ())
STAIRS = Fuzzer("stairs", "a planted bug behind four comparisons", _stairs, lambda: [bytes(8)], ("toy.no_deadbeef",))
FUZZER = TOY  # what FUZZER_MODULES finds when a test registers this module as a fuzzer


def test_the_mutate_engine_finds_the_planted_bug_deterministically_and_reproduce_repeats_it(tmp_path: Path) -> None:
    first = engine.mutate_run(TOY, runs=20_000, seed=3, workdir=tmp_path / "a")
    again = engine.mutate_run(TOY, runs=20_000, seed=3, workdir=tmp_path / "b")
    assert len(first.crashes) == 1
    crash = first.crashes[0]
    assert crash.kind == "invariant" and crash.message.startswith("toy.no_deadbeef: ")
    assert crash.input_path is not None and crash.input_path.parent == tmp_path / "a" / "toy"
    data = crash.input_path.read_bytes()
    assert BUG in data
    assert first.executions < 20_000 and first.engine == "mutate"
    assert again.executions == first.executions  # the same seed walks the same inputs
    assert again.crashes[0].input_path is not None and again.crashes[0].input_path.read_bytes() == data
    repeated = engine.reproduce(f"{__name__}:TOY", data)
    assert repeated is not None and repeated.kind == "invariant" and repeated.message == crash.message
    assert engine.reproduce(f"{__name__}:TOY", SEED) is None


def test_an_exception_other_than_a_broken_invariant_is_a_crash(tmp_path: Path) -> None:
    stats = engine.mutate_run(CRASHY, runs=20_000, seed=3, workdir=tmp_path)
    assert [(c.kind, c.message) for c in stats.crashes] == [("crash", "KeyError: 'deadbeef'")]
    assert engine.classify(ValueError("x")) == ("crash", "ValueError: x")


def test_a_bounded_run_replays_the_corpus_first_and_counts_every_execution(tmp_path: Path) -> None:
    stats = engine.mutate_run(CLEAN, runs=500, seed=0, workdir=tmp_path)
    assert stats.executions == 500 and stats.crashes == [] and stats.exec_per_second > 0
    with pytest.raises(ValueError, match="seconds or runs"):
        engine.mutate_run(CLEAN, workdir=tmp_path)


def test_the_atheris_engine_reports_libfuzzers_execution_count(tmp_path: Path) -> None:
    if engine.asan_preloaded():  # the sanitizer run (tox -e asan): atheris would be blind, so it is refused
        with pytest.raises(ValueError, match="cannot follow coverage with gcc's libasan preloaded"):
            engine.run(f"{__name__}:CLEAN", engine="atheris", runs=3000, seed=1, workdir=tmp_path)
        return
    stats = engine.run(f"{__name__}:CLEAN", engine="atheris", runs=3000, seed=1, workdir=tmp_path)
    assert (stats.engine, stats.executions, stats.crashes) == ("atheris", 3000, [])
    log = (tmp_path / f"{__name__}_CLEAN" / "libfuzzer.log").read_text()
    assert "stat::number_of_executed_units: 3000" in log
    copied = tmp_path / f"{__name__}_CLEAN" / "corpus"
    assert {p.read_bytes() for p in copied.iterdir()} >= {SEED, b""}  # libFuzzer adds its finds to the copy


def test_the_atheris_engine_follows_coverage_to_the_planted_bug_and_classifies_it(tmp_path: Path) -> None:
    """Four byte comparisons in a row: blind mutation needs ~2^32 tries, coverage feedback a few thousand."""
    if engine.asan_preloaded():  # the sanitizer run (tox -e asan): atheris would be blind, so it is refused
        with pytest.raises(ValueError, match="use the mutate engine under the sanitizer build"):
            engine.run(f"{__name__}:STAIRS", engine="atheris", runs=200_000, seed=1, workdir=tmp_path)
        return
    stats = engine.run(f"{__name__}:STAIRS", engine="atheris", runs=200_000, seed=1, workdir=tmp_path)
    [crash] = stats.crashes
    assert crash.kind == "invariant" and crash.message.startswith("toy.no_deadbeef: ")
    assert crash.input_path is not None and crash.input_path.read_bytes()[:4] == BUG
    assert 0 < stats.executions < 200_000


def test_names_engines_and_corpus_folders() -> None:
    with pytest.raises(engine.UnknownFuzzer, match="unknown fuzzer 'nope': the fuzzers are rings, iotlb"):
        engine.load("nope")
    assert set(engine.available()) <= set(engine.FUZZER_MODULES)
    assert "state" in engine.available()
    assert engine.corpus_dir("state") == Path(engine.__file__).resolve().parent / "corpus" / "state"
    assert engine.corpus(f"{__name__}:TOY") == [SEED]
    with pytest.raises(ValueError, match="unknown engine"):
        engine.resolve_engine("afl")
    assert engine.resolve_engine("mutate") == "mutate"


def test_auto_avoids_atheris_under_a_preloaded_libasan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/gcc/x86_64-linux-gnu/12/libasan.so")
    assert engine.resolve_engine("auto") == "mutate"
    with pytest.raises(ValueError, match="cannot follow coverage"):
        engine.resolve_engine("atheris")
    monkeypatch.delenv("LD_PRELOAD")
    assert engine.resolve_engine("auto") == "atheris"  # installed in the test environment


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="vdpacert")
    fuzz_command.register(parser.add_subparsers())
    args = parser.parse_args(["fuzz", *argv])
    code: int = args.handler(args)
    return code


def test_the_command_prints_the_table_and_fails_with_the_reproducer_on_a_finding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(engine.FUZZER_MODULES, "toy", __name__)
    json_path = tmp_path / "out.json"
    assert cli("toy", "--engine", "mutate", "--runs", "20000", "--seed", "3", "--workdir", str(tmp_path),
               "--json", str(json_path)) == 1
    out = capsys.readouterr().out
    assert "fuzzer     engine     executions    exec/s  seconds crashes" in out
    assert "toy: invariant: toy.no_deadbeef: " in out
    crash_file = next((tmp_path / "toy").glob("crash-*"))
    assert f"reproduce: vdpacert fuzz toy --reproduce {crash_file}" in out
    assert '"total_executions"' in json_path.read_text()
    assert cli("toy", "--reproduce", str(crash_file)) == 1
    assert "toy: invariant: toy.no_deadbeef" in capsys.readouterr().out
    (tmp_path / "seed").write_bytes(SEED)
    assert cli("toy", "--reproduce", str(tmp_path / "seed")) == 0
    assert cli("nope") == 2
    assert cli("toy", "--runs", "0") == 2


def test_the_command_runs_a_clean_fuzzer_to_exit_status_0(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(engine.FUZZER_MODULES, "clean", f"{__name__}:CLEAN")
    assert cli("clean", "--engine", "mutate", "--runs", "300", "--workdir", str(tmp_path)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:3] == ["clean", "mutate", "300"]
    assert lines[4].split() == ["total", "300"]
