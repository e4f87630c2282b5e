"""Type stub of the compiled ``vdpacert.impl.net_datapath`` (Python-visible API only; see net_datapath.pyx)."""

from typing import Final, Self

from vdpacert.impl.virtqueue import VirtQueue

ERR_WORK: Final = -64
GSO_OK_TCPV4: Final = 1
GSO_OK_TCPV6: Final = 2
GSO_OK_UDP: Final = 4
GSO_OK_USO4: Final = 8
GSO_OK_USO6: Final = 16
GSO_OK_ECN: Final = 32
HDR_LEN: Final = 12
TX_BATCH: Final = 64
MAX_GSO_FRAME: Final = 65553

def gso_ok_from_features(features: int) -> int: ...

class NetLoopback:
    def __init__(
        self, *, mrg_rxbuf: bool = False, guest_csum: bool = False, gso_ok: int = 0, mtu: int = 1500, budget: int = 0
    ) -> None: ...
    @classmethod
    def from_features(cls, features: int, mtu: int = 1500, budget: int = 0) -> Self: ...
    def run(self, tx: VirtQueue, rx: VirtQueue) -> tuple[int, int, bool, bool]: ...
    @property
    def more(self) -> bool: ...
    @property
    def rx_starved(self) -> bool: ...
    @property
    def stats(self) -> dict[str, int]: ...
    @property
    def last_stats(self) -> dict[str, int]: ...
    @property
    def config(self) -> dict[str, int]: ...

def loopback(
    tx: VirtQueue,
    rx: VirtQueue,
    mrg_rxbuf: bool = False,
    guest_csum: bool = False,
    mtu: int = 1500,
    *,
    gso_ok: int = 0,
    budget: int = 0,
) -> tuple[int, int, bool, bool]: ...
