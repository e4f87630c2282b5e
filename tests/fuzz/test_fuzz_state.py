"""The state-blob fuzzer: its snapshots are real and reach every stage, its runs are clean, its checks bite.

The seeds must reach each outcome (a blob restored, a blob load refuses, a state restore refuses
before any call), a short mutate run must break nothing, and each invariant check, pointed at a
deliberately broken loader or restore function, must raise the InvariantBroken that names it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from vdpacert.fuzz import engine, state
from vdpacert.fuzz.base import ByteReader, InvariantBroken
from vdpacert.migration import blob
from vdpacert.migration.restore import restore_device_state
from vdpacert.migration.state import DestinationInfo, DeviceState, RestoreError


@pytest.fixture(scope="module", autouse=True)
def snapshots() -> Iterator[None]:
    state.setup()
    yield
    state.teardown()


def decoded(data: bytes) -> tuple[state.Mutant, state.Destination]:
    reader = ByteReader(data)
    snapshot = state._world[reader.below(len(state._world))]
    return state.mutate_blob(snapshot.blob, reader), snapshot.destination


def outcome(data: bytes) -> str:
    """Where a seed's blob ends: refused by load, or restore's outcome."""
    mutant, destination = decoded(data)
    loaded = state.check_load(state._load, mutant.data)
    if loaded is None:
        return "load refused"
    result = state.check_restore(destination, loaded, restore_device_state)
    destination.reset()
    return result


def test_the_snapshots_are_real_saves_of_running_devices() -> None:
    by_name = {spec.name: blob.load(state.snapshot_blob(spec.name)) for spec in state.SOURCES}
    mq = by_name["net-split-mq"]
    assert mq.net is not None and mq.net.queue_pairs == 2 and mq.net.mac == bytes.fromhex("02aabbccddee")
    assert (mq.net.promisc, mq.net.allmulti) == (False, True) and mq.vqs_count == 5 and not mq.packed
    assert by_name["net-packed-mq"].packed and by_name["blk-packed"].packed and by_name["blk-split"].net is None
    assert by_name["blk-split-inflight"].vrings[0].inflight == (0, 3)
    assert all(v.base for v in mq.vrings if v.index in (0, 1))  # traffic moved the rings


def test_the_seeds_reach_every_outcome_and_the_corpus_runs_clean() -> None:
    seeds = state.seeds()
    assert [outcome(seed) for seed in seeds] == (["restored"] * len(state.SOURCES) + [
        "refused", "restored", "restored", "load refused", "load refused", "load refused", "load refused"])
    for data in engine.corpus("state"):
        state.FUZZER.one_input(data)


def test_mutations_follow_the_input_bytes_exactly() -> None:
    original = state.snapshot_blob("blk-split")
    data = bytes(state.program("blk-split", state.MODE_BITS).below(0, 8).below(8 * 20 + 3, len(original) * 8)
                 .raw(b"\x00").out)
    mutant, _ = decoded(data)
    assert bytes(a ^ b for a, b in zip(mutant.data, original, strict=True)) == bytes(20) + b"\x08" + bytes(
        len(original) - 21)
    assert decoded(data) == decoded(data)
    as_is, _ = decoded(bytes(state.program("blk-split", state.MODE_AS_IS).out))
    assert as_is == state.Mutant(original, True, "as is")


def test_a_short_mutate_run_breaks_no_invariant(tmp_path: Path) -> None:
    stats = engine.mutate_run(state.FUZZER, runs=300, seed=0, workdir=tmp_path, inputs=engine.corpus("state"))
    assert stats.crashes == [] and stats.executions == 300
    print(f"state fuzzer, mutate engine: {stats.exec_per_second:.0f} exec/s")


# ----- negative controls: every check, pointed at a broken component, must fire ------------------------------

def leaky_load(data: bytes, destination: DestinationInfo | None) -> DeviceState:
    """Reads a field before validating the payload: a missing key is a KeyError."""
    payload = json.loads(data[14:-32])
    payload["vrings"][0]["num"] += 0
    return blob.load(data, destination)


def forgetful_load(data: bytes, destination: DestinationInfo | None) -> DeviceState:
    """Loses the RX mode: the state it returns is not what the blob says."""
    loaded = blob.load(data, destination)
    return loaded if loaded.net is None else dataclasses.replace(loaded, net=dataclasses.replace(loaded.net,
                                                                                                 allmulti=False))


def eager_restore(ops: Any, state: DeviceState, *, kick_fds: Mapping[int, int], call_fds: Mapping[int, int],
                  rewind_inflight: bool = True, bases: Mapping[int, int] | None = None) -> None:
    """Applies the backend features before checking that the state fits the destination."""
    ops.set_owner()
    ops.set_backend_features(state.backend_features)
    restore_device_state(ops, state, kick_fds=kick_fds, call_fds=call_fds, bases=bases)


def unreset_restore(ops: Any, state: DeviceState, *, kick_fds: Mapping[int, int], call_fds: Mapping[int, int],
                    rewind_inflight: bool = True, bases: Mapping[int, int] | None = None) -> None:
    """Fails half way and does not reset the device."""
    ops.set_owner()
    ops.set_status(0)
    ops.set_status(3)
    raise RestoreError("VHOST_SET_FEATURES", 22, "refused")


def leaky_restore(ops: Any, state: DeviceState, *, kick_fds: Mapping[int, int], call_fds: Mapping[int, int],
                  rewind_inflight: bool = True, bases: Mapping[int, int] | None = None) -> None:
    restore_device_state(ops, state, kick_fds=kick_fds, call_fds=call_fds, bases=bases)
    raise KeyError("queue 9")


def broken(harness: state.StateHarness, data: bytes) -> str:
    with pytest.raises(InvariantBroken) as caught:
        harness(data)
    return caught.value.invariant


def test_a_loader_letting_a_key_error_out_is_caught_by_the_check_and_found_by_the_engine(tmp_path: Path) -> None:
    missing = json.loads(state.snapshot_blob("blk-split")[14:-32])
    del missing["vrings"][0]["num"]
    data = blob.seal(json.dumps(missing, sort_keys=True, separators=(",", ":")).encode())
    assert state.check_load(state._load, data) is None  # the real loader refuses it, typed
    with pytest.raises(InvariantBroken, match=r"^state.typed_errors: load let KeyError out"):
        state.check_load(leaky_load, data)
    harness = state.StateHarness(load=leaky_load)
    stats = engine.mutate_run(dataclasses.replace(state.FUZZER, one_input=harness), runs=3000, seed=0,
                              workdir=tmp_path)
    assert [c.message.split(":")[0] for c in stats.crashes] == ["state.typed_errors"]


def test_a_loader_that_loses_a_field_breaks_the_round_trip() -> None:
    assert broken(state.StateHarness(load=forgetful_load), state.seeds()[0]) == "state.round_trip"


def test_a_restore_that_applies_before_validating_is_caught() -> None:
    refused_by_restore = state.seeds()[len(state.SOURCES)]  # one queue more than the destination has
    assert broken(state.StateHarness(restore=eager_restore), refused_by_restore) == "state.refused_applies_nothing"
    assert outcome(refused_by_restore) == "refused"  # the real restore applies nothing


def test_a_restore_error_that_leaves_the_device_set_up_is_caught() -> None:
    assert broken(state.StateHarness(restore=unreset_restore), state.seeds()[3]) == "state.restore_error_resets"
    assert broken(state.StateHarness(restore=leaky_restore), state.seeds()[3]) == "state.restore_typed_errors"
    state.FUZZER.one_input(state.seeds()[3])  # the destination is reset for the next input
