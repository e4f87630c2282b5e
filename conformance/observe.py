"""Everything a user of a vhost-vdpa target can observe, read through the client only.

Two kinds of reads. :func:`read_identity` takes what a device reports about itself at open
(identity, offer, geometry, groups, which optional ops answer) and turns it into the model's
:class:`~vdpacert.model.vdpa_device.VdpaDeviceSpec`, so the model predicts *this* device and not a
generic one. The observables compared after every lockstep step are :data:`OBSERVABLES`: one
getter per row, asked of the model and of the target in the same words, each answer an
:class:`Outcome` (a value or an errno), so "the target answers EPERM where the model answers EPERM"
is as much a match as equal values.

Two more checks read what a device says about itself against what its device type allows, since
the model cannot predict a device's own choices: :func:`offer_checks` (the offered feature word
obeys the dependency table and includes VERSION_1, §2.2.2, §6.2) and :func:`config_value_checks`
(the values a device puts in its configuration, e.g. virtio-net's mtu, §5.1.4.1). A configuration
space reported larger than the device type's structure is cut to it (:meth:`Identity.spec`): bytes
past the structure are not configuration space, so an access there must be refused.

Probing the optional ops needs an owner (the vring ioctls go through ``vhost_dev_ioctl``'s owner
check) and one harmless write (SET_GROUP_ASID of group 0 to address space 0, where it already is;
SET_LOG_FD to -1, which unbinds nothing): :func:`probe_spec` therefore reopens the target when done,
so the first example starts from a fresh open like every other.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vdpacert.model import blk, net
from vdpacert.model import features as feature_rules
from vdpacert.model.vdpa_device import OPTIONAL_OPS, VdpaDeviceSpec
from vdpacert.model.vhost_vdpa import VhostVdpaModel
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_ids import VIRTIO_ID_BLOCK, VIRTIO_ID_NET

if TYPE_CHECKING:
    from vdpacert.conformance.client import VhostClient
    from vdpacert.conformance.targets import Target
    from vdpacert.model.config_space import ConfigLayout
    from vdpacert.model.spec import Violation

__all__ = ["OBSERVABLES", "Identity", "Observable", "Outcome", "config_layout", "config_value_checks",
           "offer_checks", "probe_spec", "read_identity", "target_outcome"]

#: What an answer may be: an int, config bytes, or the IOVA range pair.
Value = int | bytes | tuple[int, int] | None


@dataclass(frozen=True)
class Outcome:
    """One answer: ``value`` when the call succeeded, else ``errno``."""

    value: Value = None
    errno: int | None = None

    @property
    def ok(self) -> bool:
        return self.errno is None

    def __str__(self) -> str:
        if self.errno is not None:
            return f"errno {self.errno} ({errno.errorcode.get(self.errno, '?')})"
        if isinstance(self.value, int) and not isinstance(self.value, bool):
            return f"{self.value:#x}"
        if isinstance(self.value, bytes):
            return self.value.hex()
        return repr(self.value)


def target_outcome(call: Callable[[], Value]) -> Outcome:
    """Run one client call: its value, or the errno of the OSError (TargetDied is not caught)."""
    try:
        return Outcome(call())
    except OSError as error:
        return Outcome(errno=error.errno)


@dataclass(frozen=True)
class Identity:
    """What a device says about itself at open (all of it constant until the device is re-created)."""

    device_id: int
    features: int
    backend_features: int
    nvqs: int
    ngroups: int
    nas: int
    vring_num_max: int
    config: bytes
    iova_range: tuple[int, int]
    vq_groups: tuple[int, ...] | None
    vq_desc_groups: tuple[int, ...] | None
    optional_ops: frozenset[str]
    supports_dirty_log: bool

    def spec(self) -> VdpaDeviceSpec:
        """The model's description of this device (what the interface cannot show keeps its default).

        The configuration space is what the device reports, cut to its device type's structure: a
        device claiming more has no fields there, so the model predicts accesses past it refused.
        """
        layout = config_layout(self.device_id)
        return VdpaDeviceSpec(
            device_id=self.device_id,
            device_features=self.features,
            nvqs=self.nvqs,
            vq_num_max=max(1, self.vring_num_max),
            config=self.config if layout is None else self.config[:layout.size],
            ngroups=self.ngroups,
            nas=self.nas,
            vq_groups=self.vq_groups,
            vq_desc_groups=self.vq_desc_groups,
            iova_range=self.iova_range,
            backend_features=self.backend_features & _PARENT_BACKEND_BITS,
            optional_ops=self.optional_ops,
            supports_dirty_log=self.supports_dirty_log,
        )


_LAYOUTS: dict[int, ConfigLayout] = {VIRTIO_ID_NET: net.NET_CONFIG_LAYOUT, VIRTIO_ID_BLOCK: blk.BLK_CONFIG_LAYOUT}


def config_layout(device_id: int) -> ConfigLayout | None:
    """The configuration structure of a device type the model knows (None: unknown type)."""
    return _LAYOUTS.get(device_id)


@functools.cache
def offer_checks(device_id: int, offered: int) -> tuple[tuple[str, ...], tuple[Violation, ...]]:
    """The feature rules an offer is held to, and those it breaks (§2.2.2: "a device MUST NOT offer a feature
    which requires another feature which was not offered"; §6.2: VERSION_1 is offered).

    A dependency row binds the offer only when the device offers its feature; the others have nothing to say.
    Cached: a device's offer does not change, and this runs after every step.
    """
    checked = [feature_rules.VERSION_1_OFFER_RULE]
    checked += [dep.rule for dep in feature_rules.dependency_rules(device_id)
                if offered & feature_rules.mask_of(device_id, dep.feature)]
    return tuple(checked), tuple(feature_rules.offer_violations(device_id, offered))


#: The feature that makes the field of each config value rule exist (§5.1.4).
_VALUE_RULE_FEATURE: dict[str, int] = {
    net.CONFIG_MTU_RANGE.rule: N.VIRTIO_NET_F_MTU,
    net.CONFIG_MTU_MIN_1280.rule: N.VIRTIO_NET_F_MTU,
    net.CONFIG_SPEED_RANGE.rule: N.VIRTIO_NET_F_SPEED_DUPLEX,
    net.CONFIG_DUPLEX_VALUE.rule: N.VIRTIO_NET_F_SPEED_DUPLEX,
}


@functools.lru_cache(maxsize=64)
def config_value_checks(device_id: int, config: bytes, offered: int) -> tuple[tuple[str, ...], tuple[Violation, ...]]:
    """The device-side rules on the values in a configuration space, and those broken (virtio-net §5.1.4.1).

    Only the rows whose field the offer makes exist are checked (mtu with VIRTIO_NET_F_MTU, speed and duplex
    with VIRTIO_NET_F_SPEED_DUPLEX); other device types have no value rules in the model.
    """
    if device_id != VIRTIO_ID_NET or len(config) < net.NET_CONFIG_LAYOUT.size:
        return (), ()
    values = net.NET_CONFIG_LAYOUT.decode(config)
    state = net.NetDeviceState(mtu=int(values["mtu"]), speed=int(values["speed"]), duplex=int(values["duplex"]))
    checked = [rule.rule for rule in net.CONFIG_VALUE_RULES if offered >> _VALUE_RULE_FEATURE[rule.rule] & 1]
    return tuple(checked), tuple(net.config_violations(state, offered))


#: Backend feature bits only a parent's get_backend_features can add (vhost-vdpa adds the others itself).
_PARENT_BACKEND_BITS = 1 << T.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK


def _has(outcome: Outcome) -> bool:
    return outcome.errno != errno.EOPNOTSUPP


def read_identity(client: VhostClient) -> Identity:
    """Read a freshly opened device's identity; makes the opener the owner (see :func:`probe_spec`)."""
    backend = client.get_backend_features()
    nvqs = client.get_vqs_count()
    config_size = client.get_config_size()
    config = client.get_config(0, config_size) if config_size else b""
    client.set_owner()
    groups = [target_outcome(functools.partial(client.get_vring_group, i)) for i in range(nvqs)]
    desc_groups = [target_outcome(functools.partial(client.get_vring_desc_group, i)) for i in range(nvqs)]
    sizes = target_outcome(lambda: client.get_vring_size(0))
    asid = target_outcome(lambda: client.set_group_asid(0, 0))
    log = target_outcome(lambda: client.set_log_fd(T.VHOST_FILE_UNBIND))
    ops = {"compat_reset"}  # what a reset does to the parent's maps is not visible here; Linux parents have it
    for op, present in (
        ("get_vq_group", all(_has(g) for g in groups)),
        ("get_vq_desc_group", bool(backend >> T.VHOST_BACKEND_F_DESC_ASID & 1)),
        ("set_group_asid", _has(asid)),
        ("get_vq_size", _has(sizes)),
        ("suspend", bool(backend >> T.VHOST_BACKEND_F_SUSPEND & 1)),
        ("resume", bool(backend >> T.VHOST_BACKEND_F_RESUME & 1)),
        ("reset_map", bool(backend >> T.VHOST_BACKEND_F_IOTLB_PERSIST & 1)),
    ):
        if present:
            ops.add(op)
    assert ops <= OPTIONAL_OPS

    def group_list(found: list[Outcome]) -> tuple[int, ...] | None:
        values = [g.value for g in found]
        return tuple(v for v in values if isinstance(v, int)) if all(g.ok for g in found) else None

    return Identity(
        device_id=client.get_device_id(),
        features=client.get_features(),
        backend_features=backend,
        nvqs=nvqs,
        ngroups=client.get_group_num(),
        nas=client.get_as_num(),
        vring_num_max=client.get_vring_num(),
        config=config,
        iova_range=client.get_iova_range(),
        vq_groups=group_list(groups),
        vq_desc_groups=group_list(desc_groups) if "get_vq_desc_group" in ops else None,
        optional_ops=frozenset(ops),
        supports_dirty_log=log.ok,
    )


def probe_spec(target: Target) -> VdpaDeviceSpec:
    """The model's spec of ``target``, read from a fresh open; the target is reopened afterwards."""
    target.reopen()
    try:
        return read_identity(target.client).spec()
    finally:
        target.reopen()


@dataclass(frozen=True)
class Observable:
    """One thing both sides are asked after every step: the model's getter and the client's, same words.

    ``clause`` is the suite clause a disagreement fails; ``index`` is the vring index for per-queue rows.
    """

    name: str
    clause: str
    model: Callable[[VhostVdpaModel], Value]
    target: Callable[[VhostClient], Value]
    index: int | None = None


def _config(model: VhostVdpaModel) -> bytes:
    return model.VHOST_VDPA_GET_CONFIG(0, model.VHOST_VDPA_GET_CONFIG_SIZE())


def _target_config(client: VhostClient) -> bytes:
    return client.get_config(0, client.get_config_size())


#: Device-level observables (ask :func:`vq_observables` for the per-queue ones).
OBSERVABLES: tuple[Observable, ...] = (
    Observable("VHOST_VDPA_GET_STATUS", "suite.lockstep.status",
               lambda m: m.VHOST_VDPA_GET_STATUS(), lambda c: c.get_status()),
    Observable("VHOST_GET_FEATURES", "suite.lockstep.features",
               lambda m: m.VHOST_GET_FEATURES(), lambda c: c.get_features()),
    Observable("VHOST_GET_BACKEND_FEATURES", "suite.lockstep.features",
               lambda m: m.VHOST_GET_BACKEND_FEATURES(), lambda c: c.get_backend_features()),
    # The size first: the bound of every config access, compared with the device type's structure.
    Observable("VHOST_VDPA_GET_CONFIG_SIZE", "vdpa_device.config.bounds",
               lambda m: m.VHOST_VDPA_GET_CONFIG_SIZE(), lambda c: c.get_config_size()),
    Observable("VHOST_VDPA_GET_CONFIG", "suite.lockstep.config", _config, _target_config),
    Observable("VHOST_VDPA_GET_DEVICE_ID", "suite.lockstep.errno",
               lambda m: m.VHOST_VDPA_GET_DEVICE_ID(), lambda c: c.get_device_id()),
    Observable("VHOST_VDPA_GET_VQS_COUNT", "suite.lockstep.errno",
               lambda m: m.VHOST_VDPA_GET_VQS_COUNT(), lambda c: c.get_vqs_count()),
    Observable("VHOST_VDPA_GET_GROUP_NUM", "suite.lockstep.errno",
               lambda m: m.VHOST_VDPA_GET_GROUP_NUM(), lambda c: c.get_group_num()),
    Observable("VHOST_VDPA_GET_AS_NUM", "suite.lockstep.errno",
               lambda m: m.VHOST_VDPA_GET_AS_NUM(), lambda c: c.get_as_num()),
    Observable("VHOST_VDPA_GET_VRING_NUM", "suite.lockstep.vq_state",
               lambda m: m.VHOST_VDPA_GET_VRING_NUM(), lambda c: c.get_vring_num()),
    Observable("VHOST_VDPA_GET_IOVA_RANGE", "suite.lockstep.errno",
               lambda m: m.VHOST_VDPA_GET_IOVA_RANGE(), lambda c: c.get_iova_range()),
)


def vq_observables(nvqs: int) -> tuple[Observable, ...]:
    """GET_VRING_BASE, GET_VRING_GROUP, GET_VRING_DESC_GROUP and GET_VRING_SIZE of every queue (EPERM before
    SET_OWNER, EOPNOTSUPP without the parent op, on both sides)."""
    rows = (("VHOST_GET_VRING_BASE", "suite.lockstep.vq_state", "get_vring_base"),
            ("VHOST_VDPA_GET_VRING_GROUP", "suite.lockstep.errno", "get_vring_group"),
            ("VHOST_VDPA_GET_VRING_DESC_GROUP", "suite.lockstep.errno", "get_vring_desc_group"),
            ("VHOST_VDPA_GET_VRING_SIZE", "suite.lockstep.vq_state", "get_vring_size"))
    return tuple(_vq_row(name, clause, method, i) for i in range(nvqs) for name, clause, method in rows)


def _vq_row(name: str, clause: str, client_method: str, index: int) -> Observable:
    """The model method is the ioctl's name, the client's the UAPI verb: both asked about queue ``index``."""
    return Observable(f"{name}[{index}]", clause, lambda m: getattr(m, name)(index),
                      lambda c: getattr(c, client_method)(index), index)
