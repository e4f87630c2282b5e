"""Scenario files: every key read as written, defaults, and every kind of mistake refused with file, key and rule.

The wrong-type and unknown-key tests are generated from the dataclasses' own fields, so a key added
to the format is covered without touching this file; the docs test keeps docs/scenarios.md listing
every key the loader takes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

import vdpacert.migration
from vdpacert.migration.scenario import (
    DeviceSpec,
    FaultSpec,
    MemorySpec,
    MigrationSpec,
    Scenario,
    ScenarioError,
    WorkloadSpec,
    load_scenario,
    load_scenario_text,
    shipped_scenarios,
)

ROOT = Path(__file__).resolve().parents[2]
SECTIONS: dict[str, type[Any]] = {"device": DeviceSpec, "memory": MemorySpec, "workload": WorkloadSpec,
                                  "migration": MigrationSpec}

FULL = """
name = "net-split-full"
description = "every key written out"
regression = "multiqueue state lost"
[device]
target = "sim-net:max_vq_pairs=4,queue_size=512"
destination = "sim-net:max_vq_pairs=4,queue_size=512"
ring = "split"
queue_size = 512
queues = 4
event_idx = false
indirect = true
start_index = 65530
[memory]
size_mib = 128
[workload]
net_frames_per_s = 20000
frame_bytes = 1514
cpu_pages_per_s = 50000
cpu_working_set_mib = 16
inflight = 8
mq_pairs = 3
mac = "02:00:00:00:00:42"
promisc = true
reset_before = true
seed = 99
[migration]
mode = "shadow"
bandwidth_mib_s = 250
latency_ms = 0.5
downtime_ms = 10
max_iterations = 12
run_before_ms = 5
run_after_ms = 7.5
expect = "failed"
[[faults]]
kind = "corrupt-stream"
iteration = 3
target = "ram"
[[faults]]
kind = "link-drop"
iteration = 0
"""


def error_of(text: str, name: str = "t.toml") -> ScenarioError:
    with pytest.raises(ScenarioError) as caught:
        load_scenario_text(text, name)
    return caught.value


def test_every_key_is_read_as_written() -> None:
    s = load_scenario_text(FULL, "full.toml")
    assert (s.name, s.description, s.regression) == ("net-split-full", "every key written out", "multiqueue state lost")
    assert s.device == DeviceSpec("sim-net:max_vq_pairs=4,queue_size=512", "sim-net:max_vq_pairs=4,queue_size=512",
                                  "split", 512, 4, False, True, 65530)
    assert s.memory == MemorySpec(128)
    assert s.workload == WorkloadSpec(net_frames_per_s=20000, frame_bytes=1514, cpu_pages_per_s=50000,
                                      cpu_working_set_mib=16, inflight=8, mq_pairs=3, mac="02:00:00:00:00:42",
                                      promisc=True, reset_before=True, seed=99)
    assert s.migration == MigrationSpec("shadow", 250.0, 0.5, 10.0, 12, 5.0, 7.5, "failed")
    assert s.faults == (FaultSpec("corrupt-stream", 3, "ram"), FaultSpec("link-drop", 0))
    assert isinstance(s.migration.bandwidth_mib_s, float)  # a TOML integer where a number is asked
    assert s.device_kind == "net"


def test_an_empty_file_is_all_defaults_named_after_the_file() -> None:
    s = load_scenario_text("", "quiet")
    assert s == Scenario("quiet")
    assert s.device.target == "sim-net" and s.device.destination_target == "sim-net"
    assert (s.device.ring, s.device.queue_size, s.device.queues, s.device.event_idx) == ("split", 256, 1, True)
    assert s.memory.size_bytes == 64 << 20
    assert s.migration.mode == "device-log" and s.migration.expect == "converged" and s.faults == ()
    assert s.migration.bandwidth_bytes_s == 1000 * (1 << 20)
    assert (s.migration.latency_s, s.migration.downtime_s) == (0.001, 0.03)
    assert (s.migration.run_before_s, s.migration.run_after_s) == (0.02, 0.02)
    assert s.cpu_working_set_bytes == 64 << 20


def test_a_file_names_itself_and_its_errors(tmp_path: Path) -> None:
    good = tmp_path / "blk-packed.toml"
    good.write_text('[device]\ntarget = "sim-blk"\nring = "packed"\nqueue_size = 100\n')
    s = load_scenario(good)
    assert (s.name, s.path, s.device.queue_size, s.device_kind) == ("blk-packed", good, 100, "blk")
    bad = tmp_path / "bad.toml"
    bad.write_text("[memory]\nsize_mib = 0\n")
    with pytest.raises(ScenarioError) as caught:
        load_scenario(bad)
    assert (caught.value.source, caught.value.key) == (str(bad), "memory.size_mib")
    assert str(caught.value).startswith(f"{bad}: memory.size_mib: 0 ")
    with pytest.raises(FileNotFoundError):
        load_scenario(tmp_path / "missing.toml")


def test_not_toml_and_not_utf8_are_refused(tmp_path: Path) -> None:
    assert "not valid TOML" in str(error_of("[device\n"))
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"name = \"\xff\"\n")
    with pytest.raises(ScenarioError, match="not UTF-8"):
        load_scenario(binary)


def all_keys() -> list[tuple[str, str, str]]:
    """(section, key, type name) of every key the loader takes in a table."""
    return [(section, f.name, str(f.type)) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


WRONG = {"int": '"12"', "float": '"fast"', "bool": "1", "str": "3"}


@pytest.mark.parametrize(("section", "key", "kind"), all_keys(), ids=lambda v: str(v))
def test_a_wrong_type_names_the_key(section: str, key: str, kind: str) -> None:
    err = error_of(f"[{section}]\n{key} = {WRONG[kind]}\n")
    assert err.key == f"{section}.{key}" and "must be" in err.rule and err.source == "t.toml"
    if kind in ("int", "float"):
        assert error_of(f"[{section}]\n{key} = true\n").key == f"{section}.{key}"  # a boolean is not a number


@pytest.mark.parametrize("section", [*SECTIONS, "faults"])
def test_unknown_keys_are_refused_with_what_the_table_takes(section: str) -> None:
    text = '[[faults]]\nkind = "link-drop"\ncolour = 1\n' if section == "faults" else f"[{section}]\ncolour = 1\n"
    err = error_of(text)
    assert err.key == ("faults[0].colour" if section == "faults" else f"{section}.colour")
    assert "unknown key" in err.rule


@pytest.mark.parametrize(("text", "key", "fragment"), [
    ("colour = 1", "colour", "unknown key"),
    ('name = "has space"', "name", "letters, digits"),
    ('description = "two\\nlines"', "description", "one line"),
    ("device = 3", "device", "must be a table"),
    ("faults = 3", "faults", "array of tables"),
    ('[device]\ntarget = "sim-gpu"', "device.target", "unknown kind"),
    ('[device]\ndestination = "sim-net:mq=0"', "device.destination", "outside"),
    ('[device]\nring = "ring"', "device.ring", '"split", "packed"'),
    ("[device]\nqueue_size = 0", "device.queue_size", "1..32768"),
    ("[device]\nqueue_size = 65536", "device.queue_size", "1..32768"),
    ("[device]\nqueue_size = 96", "device.queue_size", "power of 2"),
    ("[device]\nqueues = 0", "device.queues", "1..32768"),
    ("[device]\nstart_index = 65536", "device.start_index", "0..65535"),
    ("[device]\nstart_index = -1", "device.start_index", "0..65535"),
    ("[memory]\nsize_mib = 65537", "memory.size_mib", "1..65536"),
    ("[workload]\nframe_bytes = 59", "workload.frame_bytes", "60..1514"),
    ("[workload]\nframe_bytes = 1515", "workload.frame_bytes", "60..1514"),
    ("[workload]\nnet_frames_per_s = -1", "workload.net_frames_per_s", "0.."),
    ('[device]\ntarget = "sim-blk"\n[workload]\nblk_write_sectors = 0', "workload.blk_write_sectors", "1..128"),
    ("[workload]\ninflight = 257", "workload.inflight", "do not fit"),
    ('[workload]\nmac = "03:00:00:00:00:01"', "workload.mac", "unicast"),
    ('[workload]\nmac = "02:00:00:00:01"', "workload.mac", "unicast"),
    ("[workload]\ncpu_working_set_mib = 65", "workload.cpu_working_set_mib", "more than memory.size_mib"),
    ("[workload]\nseed = -1", "workload.seed", "0..2^64-1"),
    ('[migration]\nmode = "precopy"', "migration.mode", '"device-log", "shadow"'),
    ("[migration]\nbandwidth_mib_s = 0", "migration.bandwidth_mib_s", "> 0"),
    ("[migration]\nbandwidth_mib_s = inf", "migration.bandwidth_mib_s", "finite"),
    ("[migration]\nlatency_ms = -0.1", "migration.latency_ms", ">= 0"),
    ("[migration]\ndowntime_ms = nan", "migration.downtime_ms", "finite"),
    ("[migration]\nmax_iterations = 0", "migration.max_iterations", "1..1000"),
    ("[migration]\nrun_after_ms = -1", "migration.run_after_ms", ">= 0"),
    ('[migration]\nexpect = "maybe"', "migration.expect", '"converged"'),
])
def test_values_out_of_range_name_the_key_and_the_rule(text: str, key: str, fragment: str) -> None:
    err = error_of(text)
    assert err.key == key and fragment in err.rule, str(err)


FAILED = '[migration]\nexpect = "failed"\n'


@pytest.mark.parametrize(("text", "key", "fragment"), [
    # the device kind decides which workload keys mean anything
    ('[device]\ntarget = "sim-blk"\n[workload]\nnet_frames_per_s = 5', "workload.net_frames_per_s", "net workload"),
    ('[device]\ntarget = "sim-blk"\n[workload]\nframe_bytes = 256', "workload.frame_bytes", "net workload"),
    ("[workload]\nblk_writes_per_s = 5", "workload.blk_writes_per_s", "blk workload key on a net"),
    ('[device]\ntarget = "python:m:f"\n[workload]\nblk_writes_per_s = 1\nmac = "02:00:00:00:00:01"',
     "workload.blk_writes_per_s", "together"),
    ('[device]\ntarget = "sim-blk"\ndestination = "sim-net"', "device.destination", "cannot take"),
    # queues, pairs and ring geometry
    ('[device]\ntarget = "sim-net:mq=4"\nqueues = 2\n[workload]\nmq_pairs = 3', "workload.mq_pairs", "at most"),
    ("[workload]\nmq_pairs = 1", "workload.mq_pairs", "multiqueue"),
    ("[device]\nqueues = 2", "device.queues", "max_vq_pairs = 1"),
    ('[device]\ntarget = "sim-blk:num_queues=2"\nqueues = 3', "device.queues", "num_queues = 2"),
    ('[device]\ntarget = "sim-net:queue_size=128"\nqueue_size = 256', "device.queue_size", "allows (128)"),
    ('[device]\ndestination = "sim-net:queue_size=64"', "device.queue_size", "device.destination"),
    ('[device]\nring = "packed"\nqueue_size = 100\nstart_index = 100', "device.start_index", "< queue_size"),
    ("[workload]\nchain_spans_ring = true", "workload.chain_spans_ring", "packed"),
    # what the target's feature offer must contain
    ('[device]\ntarget = "sim-net:features=100000000"\nevent_idx = false\n[migration]\nmode = "shadow"\n'
     '[workload]\npromisc = true', "workload.promisc", "bit 18"),
    ('[device]\ntarget = "sim-net:features=300000000"\nevent_idx = false\nring = "packed"', "device.ring", "bit 34"),
    ('[device]\ntarget = "sim-net:features=300000000"\nevent_idx = false', "migration.mode", "bit 26"),
    ('[device]\ntarget = "vhost-vdpa:/dev/vhost-vdpa-0"\ndestination = "vhost-vdpa:/dev/vhost-vdpa-1"\n'
     'twin = "vhost-vdpa:/dev/vhost-vdpa-2"', "migration.mode", '"shadow"'),
    ('[device]\ntarget = "vhost-vdpa:/dev/vhost-vdpa-0"\n[migration]\nmode = "shadow"', "device.destination",
     "one owner at a time"),
    ('[device]\ntarget = "vhost-vdpa:/dev/vhost-vdpa-0"\ndestination = "vhost-vdpa:/dev/vhost-vdpa-1"\n'
     '[migration]\nmode = "shadow"', "device.twin", "one owner at a time"),
    ('[device]\ntarget = "sim-net"\ntwin = "sim-blk"', "device.twin", "cannot be the twin"),
    # faults and the expected outcome
    ('[[faults]]\nkind = "link-drop"', "migration.expect", 'expects "failed"'),
    (FAILED, "migration.expect", "needs a [[faults]]"),
    (FAILED + '[[faults]]\nkind = "crash"', "faults[0].kind", "source-crash"),
    (FAILED + "[[faults]]\niteration = 1", "faults[0].kind", "required"),
    (FAILED + '[[faults]]\nkind = "link-drop"\niteration = 31', "faults[0].iteration", "max_iterations = 30"),
    (FAILED + '[[faults]]\nkind = "destination-refuses"\niteration = 2', "faults[0].iteration", "stop-and-copy"),
    (FAILED + '[[faults]]\nkind = "corrupt-stream"\ntarget = "state"\niteration = 1', "faults[0].iteration",
     "stop-and-copy"),
    (FAILED + '[[faults]]\nkind = "corrupt-stream"\ntarget = "disk"', "faults[0].target", '"ram", "state"'),
    (FAILED + '[[faults]]\nkind = "source-crash"\ntarget = "ram"', "faults[0].target", "only corrupt-stream"),
    (FAILED + '[[faults]]\nkind = "link-drop"\n[[faults]]\nkind = "link-drop"\nbogus = 1', "faults[1].bogus",
     "unknown key"),
])
def test_fields_that_contradict_each_other_are_refused(text: str, key: str, fragment: str) -> None:
    err = error_of(text)
    assert err.key == key and fragment in err.rule, str(err)


@pytest.mark.parametrize("text", [
    '[device]\ntarget = "sim-net:mq=2"\nqueues = 2\n[workload]\nmq_pairs = 2',
    '[device]\ntarget = "sim-net:queue_size=1024"\nring = "packed"\nqueue_size = 1000\nstart_index = 999\n'
    '[workload]\nchain_spans_ring = true',
    '[device]\ntarget = "vhost-vdpa:/dev/vhost-vdpa-0"\ndestination = "vhost-vdpa:/dev/vhost-vdpa-1"\n'
    'twin = "vhost-vdpa:/dev/vhost-vdpa-2"\n[migration]\nmode = "shadow"',
    '[device]\ntarget = "python:vendor.mod:make"\n[workload]\nblk_writes_per_s = 10',
    FAILED + '[[faults]]\nkind = "corrupt-stream"\ntarget = "state"',
    FAILED + '[[faults]]\nkind = "source-crash"\niteration = 30',
])
def test_edge_cases_that_are_allowed(text: str) -> None:
    load_scenario_text(text, "ok")


def test_device_kind_of_a_target_the_string_does_not_describe() -> None:
    blk = load_scenario_text('[device]\ntarget = "python:m:f"\n[workload]\nblk_writes_per_s = 1', "x")
    assert blk.device_kind == "blk"
    assert load_scenario_text('[device]\ntarget = "python:m:f"', "x").device_kind is None


def test_scenarios_made_in_code_meet_the_same_rules() -> None:
    s = load_scenario_text("", "base")
    with pytest.raises(ScenarioError) as caught:
        dataclasses.replace(s, workload=dataclasses.replace(s.workload, inflight=1000))
    assert caught.value.key == "workload.inflight"
    with pytest.raises(ScenarioError, match=r"device\.queue_size"):
        DeviceSpec(queue_size=0)
    with pytest.raises(ScenarioError, match=r"workload\.blk_writes_per_s"):
        Scenario("x", workload=WorkloadSpec(blk_writes_per_s=3))
    with pytest.raises(ScenarioError, match=r"migration\.expect"):
        Scenario("x", faults=(FaultSpec("link-drop"),))
    assert Scenario("x", faults=(FaultSpec("link-drop"),), migration=MigrationSpec(expect="failed")).faults


def test_shipped_scenarios_all_load_with_unique_names() -> None:
    paths = shipped_scenarios()
    package = Path(vdpacert.migration.__file__).parent  # the source folder, or site-packages under tox
    assert all(p.suffix == ".toml" and p.parent == package / "scenarios" for p in paths)
    assert paths == sorted(paths, key=lambda p: p.name)
    names = [load_scenario(p).name for p in paths]
    assert len(names) == len(set(names))


def test_the_docs_describe_every_key() -> None:
    docs = (ROOT / "docs" / "scenarios.md").read_text()
    for section, key, _ in all_keys():
        assert f"`{key}`" in docs, f"docs/scenarios.md does not describe {section}.{key}"
    for key in ("name", "description", "regression", "kind", "iteration", "target"):
        assert f"`{key}`" in docs
    for field in ("scenario", "converged", "iterations", "bytes_sent", "total_s", "downtime_s", "verified", "faults",
                  "error"):
        assert f"`{field}`" in docs
