"""Guest memory regions and the registry that resolves user addresses to them."""

from __future__ import annotations

import pytest

from vdpacert.impl.guestmem import GuestMemory, MemoryRegistry, default_registry


def test_memory_is_zeroed_and_bounds_checked() -> None:
    with GuestMemory(4096, gpa=0x10000) as memory:
        assert memory.read(0, 4096) == bytes(4096)
        memory.write(4090, b"abcdef")
        assert memory.read(4088, 8) == b"\0\0abcdef"
        with pytest.raises(IndexError):
            memory.write(4091, b"abcdef")
        with pytest.raises(IndexError):
            memory.read(4096, 1)
        with pytest.raises(IndexError):
            memory.read(2**64 - 1, 2)
        assert memory.read(4088, 8) == b"\0\0abcdef"  # the refused write changed nothing


def test_little_endian_helpers() -> None:
    with GuestMemory(64) as memory:
        memory.write_u16(0, 0xBEEF)
        memory.write_u32(2, 0x01020304)
        memory.write_u64(8, 2**64 - 2)
        assert memory.read(0, 6) == bytes([0xEF, 0xBE, 4, 3, 2, 1])
        assert (memory.read_u16(0), memory.read_u32(2), memory.read_u64(8)) == (0xBEEF, 0x01020304, 2**64 - 2)


def test_uaddr_is_a_real_process_address_of_the_bytes() -> None:
    import ctypes

    with GuestMemory(4096) as memory:
        memory.write(100, b"vdpa")
        assert ctypes.string_at(memory.uaddr + 100, 4) == b"vdpa"
        assert memory.uaddr_of(100) == memory.uaddr + 100
        assert memory.offset_of_uaddr(memory.uaddr + 100) == 100


def test_registry_resolves_only_whole_ranges_inside_live_regions() -> None:
    registry = MemoryRegistry()
    first = GuestMemory(8192, gpa=0x100000, register=False)
    second = GuestMemory(4096, gpa=0x200000, register=False)
    registry.add(first)
    registry.add(second)
    assert registry.lookup(first.uaddr + 8000, 192) == (first, 8000)
    assert registry.lookup(first.uaddr + 8000, 193) is None  # one byte past the region
    assert registry.lookup(second.uaddr, 4096) == (second, 0)
    below = min(first.uaddr, second.uaddr) - 1  # mmap may place the two regions back to back
    assert registry.lookup(below, 1) is None
    second.close()
    assert second not in registry and len(registry) == 1
    assert registry.lookup(second.uaddr, 1) is None
    first.close()
    assert len(registry) == 0


def test_new_memory_joins_the_default_registry_and_leaves_on_close() -> None:
    memory = GuestMemory(4096)
    assert memory in default_registry()
    assert default_registry().lookup(memory.uaddr, 4096) == (memory, 0)
    memory.close()
    assert memory not in default_registry()
    with pytest.raises(ValueError):
        memory.read(0, 1)
    memory.close()  # idempotent


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        GuestMemory(0)
    with pytest.raises(ValueError):
        GuestMemory(8192, gpa=2**64 - 4096)


def test_shared_memory_is_a_shared_mapping() -> None:
    """``shared=True`` is MAP_SHARED (what a use_va vhost-vdpa parent can map); the default is private."""
    with GuestMemory(8192, register=False, shared=True) as shared, GuestMemory(8192, register=False) as private:
        with open("/proc/self/maps") as file:
            maps = file.read().splitlines()

        def flags(memory: GuestMemory) -> str:
            """The permission flags of the mapping holding the region (the kernel may merge neighbours)."""
            for line in maps:
                low, high = (int(part, 16) for part in line.split()[0].split("-"))
                if low <= memory.uaddr < high:
                    return line.split()[1]
            raise AssertionError(f"{memory.uaddr:#x} is in no mapping")

        assert flags(shared)[3] == "s" and flags(private)[3] == "p"
        shared.write(0, b"vdpa")
        assert shared.read(0, 4) == b"vdpa"
