"""The parent-driver protocol: state types, optional-op detection, exclusive binding, the registry,
and the example parent of docs/parent-driver.md run through the vhost-vdpa front."""

from __future__ import annotations

import errno
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdpacert.impl import parent as protocol
from vdpacert.impl.guestmem import MemoryRegistry
from vdpacert.impl.parent import (
    NO_CALLBACK,
    OPTIONAL_OPS,
    VdpaCallback,
    VdpaParent,
    VqStatePacked,
    VqStateSplit,
    bind_parent,
    bound_driver,
    check_parent,
    has_op,
    supports_logging,
    unbind_parent,
)
from vdpacert.impl.vhost_vdpa import VhostVdpa

DOC = Path(__file__).resolve().parents[2] / "docs" / "parent-driver.md"


def test_vq_states_validate_their_fields() -> None:
    assert VqStateSplit(0xFFFF).avail_index == 0xFFFF
    for bad in (-1, 0x10000):
        with pytest.raises(ValueError):
            VqStateSplit(bad)
    VqStatePacked(0x7FFF, 1, 0, 0)
    with pytest.raises(ValueError):
        VqStatePacked(0x8000, 0, 0, 0)
    with pytest.raises(ValueError):
        VqStatePacked(0, 2, 0, 0)
    with pytest.raises(ValueError):
        VqStatePacked(0, 0, 0, -1)
    state = VqStatePacked(1, 1, 2, 0)
    with pytest.raises(AttributeError):
        state.last_avail_idx = 3  # type: ignore[misc]


@given(st.integers(0, 0x7FFF), st.integers(0, 1), st.integers(0, 0x7FFF), st.integers(0, 1))
def test_packed_states_are_values(a: int, ac: int, u: int, uc: int) -> None:
    assert VqStatePacked(a, ac, u, uc) == VqStatePacked(a, ac, u, uc)
    assert hash(VqStatePacked(a, ac, u, uc)) == hash(VqStatePacked(a, ac, u, uc))


def test_callback_is_a_plain_callable() -> None:
    hits: list[int] = []
    cb = VdpaCallback(lambda: hits.append(1), trigger=7)
    cb()
    NO_CALLBACK()
    assert hits == [1] and cb.bound and not NO_CALLBACK.bound
    assert VdpaCallback(trigger=3).bound


def test_abstract_ops_are_mandatory() -> None:
    class Half(VdpaParent):
        def get_device_id(self) -> int:
            return 1

    with pytest.raises(TypeError):
        Half()  # type: ignore[abstract]


def test_has_op_follows_overrides(kinds: Any) -> None:
    setmap, dma = kinds.SetMapParent(), kinds.DmaParent()
    assert has_op(setmap, "set_map") and not has_op(setmap, "dma_map")
    assert has_op(dma, "dma_map") and has_op(dma, "dma_unmap") and not has_op(dma, "suspend")
    assert has_op(setmap, "suspend") and has_op(setmap, "get_vq_group")
    assert not supports_logging(setmap) and supports_logging(kinds.LoggingParent())
    with pytest.raises(ValueError):
        has_op(setmap, "kick_vq")  # mandatory, not optional
    assert "set_log_base" in OPTIONAL_OPS and "reset" not in OPTIONAL_OPS


def test_absent_optional_ops_raise_not_implemented(kinds: Any) -> None:
    dma = kinds.DmaParent()
    for name in ("suspend", "resume", "get_generation", "get_backend_features"):
        with pytest.raises(NotImplementedError):
            getattr(dma, name)()


def test_check_parent(kinds: Any) -> None:
    check_parent(kinds.SetMapParent())
    with pytest.raises(ValueError, match="neither set_map nor dma_map"):
        check_parent(kinds.BaseRecordingParent())

    class OnlyMap(kinds.BaseRecordingParent):  # type: ignore[misc, name-defined]
        def dma_map(self, asid: int, iova: int, size: int, uaddr: int, perm: int) -> None:
            pass

    with pytest.raises(ValueError, match="only one of dma_map"):
        check_parent(OnlyMap())
    bad = kinds.SetMapParent()
    bad.nas = 0
    with pytest.raises(ValueError, match="nas"):
        check_parent(bad)
    with pytest.raises(TypeError):
        check_parent(object())  # type: ignore[arg-type]


def test_binding_is_exclusive_and_released(kinds: Any) -> None:
    device = kinds.SetMapParent()
    binding = bind_parent(device, "virtio_vdpa")
    assert bound_driver(device) == "virtio_vdpa"
    with pytest.raises(OSError) as busy:
        VhostVdpa(device, MemoryRegistry())
    assert busy.value.errno == errno.EBUSY
    unbind_parent(binding)
    unbind_parent(binding)  # idempotent
    assert bound_driver(device) is None
    assert protocol.parent_lock(device) is not binding.lock


def test_parent_registry(kinds: Any) -> None:
    name = f"test-parent-{os.getpid()}-{id(kinds)}"
    protocol.register_parent(name, kinds.SetMapParent)
    try:
        assert protocol.parent_factory(name) is kinds.SetMapParent
        assert name in protocol.registered_parents()
        with pytest.raises(OSError) as taken:
            protocol.register_parent(name, kinds.DmaParent)
        assert taken.value.errno == errno.EEXIST
        protocol.register_parent(name, kinds.DmaParent, replace=True)
        assert protocol.parent_factory(name) is kinds.DmaParent
    finally:
        protocol.unregister_parent(name)
    with pytest.raises(OSError) as gone:
        protocol.parent_factory(name)
    assert gone.value.errno == errno.ENOENT
    for bad in ("", "two words"):
        with pytest.raises(OSError):
            protocol.register_parent(bad, kinds.SetMapParent)


def test_entry_point_parents_are_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"acme-{os.getpid()}"
    module = f"acme_vdpa_{os.getpid()}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        def factory(**attrs):
            return ("built", attrs)
    """))
    dist = tmp_path / "acme_vdpa-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-vdpa\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[vdpacert.parents]\n{name} = {module}:factory\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert name in protocol.load_entry_point_parents()
        assert protocol.parent_factory(name)(x=1) == ("built", {"x": 1})
        assert name not in protocol.load_entry_point_parents()  # already registered
    finally:
        protocol.unregister_parent(name)
        sys.modules.pop(module, None)


def _doc_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks, "docs/parent-driver.md has no python example"
    return blocks[-1]


def test_the_documented_example_parent_runs_through_vhost_vdpa() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(_doc_example(), str(DOC), "exec"), namespace)
    parent = namespace["EchoParent"]()
    check_parent(parent)
    with VhostVdpa(parent, MemoryRegistry()) as front:
        front.set_owner()
        front.set_status(3)
        front.set_features(1 << 32)
        front.set_status(0xB)
        front.set_vring_num(0, 64)
        front.set_vring_base(0, 9)
        call = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            front.set_vring_call(0, call)
            front.set_vring_enable(0, True)
            front.set_status(0xF)
            front.kick(0)
            assert os.eventfd_read(call) == 1
        finally:
            os.close(call)
        assert front.get_vring_base(0) == 9
        with pytest.raises(OSError) as busy:
            front.set_vring_base(0, 1)
        assert busy.value.errno == errno.EBUSY
        with pytest.raises(OSError) as unsupported:
            front.suspend()
        assert unsupported.value.errno == errno.EOPNOTSUPP


def test_the_doc_lists_every_config_op() -> None:
    text = DOC.read_text()
    ops = {name for name in vars(VdpaParent) if not name.startswith("_") and callable(getattr(VdpaParent, name))}
    missing = sorted(op for op in ops if f"`{op}" not in text)
    assert not missing, f"docs/parent-driver.md does not mention {missing}"
