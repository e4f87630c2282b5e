"""The VMM layer: where its shadow virtqueues note guest writes, in both dirty-tracking modes."""

from __future__ import annotations

import pytest

from vdpacert.conformance.driver.memory import PAGE
from vdpacert.conformance.targets import make_target
from vdpacert.migration.bitmap import DirtyBitmap
from vdpacert.migration.dirty import CpuDirtyTracker, ShadowDirtySink
from vdpacert.migration.guest import Guest, GuestConfig
from vdpacert.migration.vmm import DirtyMode, Vmm
from vdpacert.uapi import virtio_net as N  # noqa: N812

MEMORY = 4 << 20


@pytest.mark.parametrize("mode", list(DirtyMode))
def test_a_control_command_during_tracking_marks_the_guest_pages_it_wrote(mode: DirtyMode) -> None:
    """The controlq is shadowed in both modes; what its shadow writes (ack byte, used ring) is guest memory the
    VMM wrote, noted with the VMM's own writes whatever the mode, and data queues go to the shadow sink."""
    with make_target("sim-net") as target:
        guest = Guest(target.new_memory(MEMORY, gpa=0), lambda layout: Vmm(target, layout, mode=mode),
                      GuestConfig(queue_size=64))
        guest.bring_up()
        vmm, ctrl = guest.vmm, guest.ctrl_queue
        assert ctrl is not None
        cpu, shadow_sink = CpuDirtyTracker(MEMORY), ShadowDirtySink(MEMORY)
        cpu.start()
        shadow_sink.start()
        vmm.set_cpu_dirty(cpu)
        vmm.set_shadow_dirty(shadow_sink)
        by_index = {shadow.index: shadow for shadow in vmm.shadows()}
        assert by_index[ctrl].dirty is cpu
        assert all(shadow.dirty is shadow_sink for index, shadow in by_index.items() if index != ctrl)
        assert set(by_index) == ({ctrl} if mode is DirtyMode.DEVICE_LOG else set(guest.queues))
        ring = guest.session.rings[ctrl]
        used_page = guest.layout.gpa(ring.addresses[2] - guest.layout.iova_base) // PAGE
        assert guest.ctrl(N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET, bytes.fromhex("020000000042")) == 0
        noted = DirtyBitmap(MEMORY // PAGE)
        cpu.sync(noted)
        assert noted.test(used_page)  # the shadow wrote the guest's used entry: noted
        vmm.set_cpu_dirty(None)
        vmm.set_shadow_dirty(None)
        assert all(shadow.dirty is None for shadow in vmm.shadows())
        guest.close()
