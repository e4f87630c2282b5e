"""Seeded feature-negotiation bugs (virtio v1.3 §2.2, §3.1.1, §5.1.3.1): what is offered, what FEATURES_OK takes."""

from __future__ import annotations

from vdpacert.impl.sim_net import SimNet
from vdpacert.uapi import virtio_net as N  # noqa: N812 - read like the C names
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1

__all__ = ["FeaturesOkBrokenDependency", "FeaturesOkWithoutVersion1", "LaxFeaturesOk", "OfferMissingDependency"]


class LaxFeaturesOk(SimNet):
    """sim-net whose FEATURES_OK check is the vendor's own :meth:`vendor_accepts` where sim-net's refuses."""

    def vendor_accepts(self, features: int) -> bool:
        return False

    def set_status(self, status: int) -> None:
        accepting = bool(status & VIRTIO_CONFIG_S_FEATURES_OK and not self.get_status() & VIRTIO_CONFIG_S_FEATURES_OK)
        super().set_status(status)
        if accepting and not self.get_status() & VIRTIO_CONFIG_S_FEATURES_OK and self.vendor_accepts(self.features):
            self._status |= VIRTIO_CONFIG_S_FEATURES_OK
            self.last_error = ""
            for index in range(self.nvqs):
                self._apply_log(index)
            self.features_ok(self.features)


class FeaturesOkBrokenDependency(LaxFeaturesOk):
    """Bug: FEATURES_OK checks only that the features were offered and include VERSION_1, not the dependency
    rules between them (CTRL_RX without CTRL_VQ is accepted)."""

    def vendor_accepts(self, features: int) -> bool:
        return not features & ~self.get_device_features() and bool(features >> VIRTIO_F_VERSION_1 & 1)


class FeaturesOkWithoutVersion1(LaxFeaturesOk):
    """Bug: FEATURES_OK checks only that the features were offered; a set without VERSION_1 (a legacy driver,
    which this device has no interface for) is accepted."""

    def vendor_accepts(self, features: int) -> bool:
        return not features & ~self.get_device_features()


class OfferMissingDependency(SimNet):
    """Bug: the offer hides CTRL_VQ (this SKU has no control queue) but still offers CTRL_RX, CTRL_RX_EXTRA and
    CTRL_MAC_ADDR, which need it."""

    def get_device_features(self) -> int:
        return super().get_device_features() & ~(1 << N.VIRTIO_NET_F_CTRL_VQ)
