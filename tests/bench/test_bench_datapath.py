"""The datapath benchmark measures real work: every offered chain is completed by the device and by
the Python walk, and the CLI writes the JSON rows the issue asks for. No figure is asserted: speed
is for the benchmark to print, not for tests to judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vdpacert.bench import datapath
from vdpacert.bench.rings import Arena, BenchRing, Piece
from vdpacert.cli import main
from vdpacert.impl.guestmem import GuestMemory

BLK = next(w for w in datapath.WORKLOADS if w.device == "blk")
JSON_KEYS = {"workload", "ring", "batch", "desc_per_s", "gbytes_per_s", "python_desc_per_s", "memcpy_gbytes_per_s"}


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("batch", [1, 32])
def test_device_and_python_complete_every_offered_chain(packed: bool, batch: int) -> None:
    # Both measurements raise if a single offered chain was left unused.
    assert datapath.measure_device(BLK, packed, batch, 0.01) > 0
    assert datapath.measure_python(BLK, packed, batch, 0.01) > 0


def test_memcpy_baseline_copies() -> None:
    assert datapath.measure_memcpy(BLK, 0.01) > 0


def test_bench_ring_refuses_chains_that_do_not_tile_the_ring() -> None:
    with GuestMemory(1 << 16) as memory, pytest.raises(ValueError):
        BenchRing(Arena(memory), 16, [Piece(16, False)] * 3, packed=True)


def test_cli_writes_the_rows_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "datapath", "--seconds", "0.005", "--batch", "4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {row["workload"] for row in rows} == {w.name for w in datapath.WORKLOADS}
    assert {row["ring"] for row in rows} == {"split", "packed"}
    for row in rows:
        assert set(row) == JSON_KEYS
        assert row["batch"] == 4
        assert row["desc_per_s"] > 0 and row["python_desc_per_s"] > 0 and row["memcpy_gbytes_per_s"] > 0
    assert "x python" in capsys.readouterr().out


def test_cli_refuses_bad_arguments() -> None:
    assert main(["bench", "datapath", "--seconds", "0"]) == 2
    assert main(["bench", "datapath", "--batch", "0"]) == 2
