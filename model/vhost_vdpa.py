"""The ``/dev/vhost-vdpa-N`` interface: what each ioctl and IOTLB message must answer.

The virtio spec does not define this interface; Linux's ``drivers/vhost/vdpa.c`` and
``drivers/vhost/vhost.c`` do, so every rule here cites the Linux function that enforces it
(``sections.vhost_vdpa(...)``, ``sections.vhost_core(...)``). Where the answer depends on the
device (FEATURES_OK, queue sizes, resets) the model defers to
:class:`~vdpacert.model.vdpa_device.VdpaDeviceModel`, which follows the spec. Where Linux
departs from the model, the departure is a named quirk in :mod:`vdpacert.model.quirks`.

Facts worth knowing (Linux 6.x):

- Only the vring ioctls, SET_OWNER and IOTLB messages go through ``vhost_dev_ioctl``'s owner
  check (EPERM before SET_OWNER). GET_FEATURES, SET_STATUS, GET_CONFIG, SUSPEND and the
  other vdpa-specific ioctls are served without an owner (:data:`OWNER_EXEMPT`).
- VHOST_SET_LOG_BASE / VHOST_SET_LOG_FD return ``-ENOIOCTLCMD``, which the ioctl syscall turns
  into ENOTTY. A device with ``supports_dirty_log`` behaves like vhost core instead.
- Config bounds errors (``vhost_vdpa_config_validate``) surface as EINVAL, E2BIG included.
- Every error of an IOTLB message's handler (EPERM, EEXIST, EINVAL ...) reaches ``write()`` as
  EFAULT (``vhost_chr_write_iter``); only a bad message type or an UPDATE of size 0 give
  EINVAL directly. :class:`IotlbMessageError` keeps the handler's own errno as ``cause``.
- Without VHOST_BACKEND_F_IOTLB_ASID the message's asid field is not read: it counts as 0.
- SUSPEND / RESUME before DRIVER_OK succeed and do nothing; otherwise they need the parent op
  (EOPNOTSUPP), whether or not the backend feature was negotiated.
"""

from __future__ import annotations

import contextlib
import errno
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final

from vdpacert.uapi import vhost as ioctls
from vdpacert.uapi import vhost_types as vt
from vdpacert.uapi.virtio_config import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_RESET

from . import sections
from .iotlb import INVALIDATE_SIZE_ZERO, INVALIDATE_WRAPS, U64_MAX, VALID_PERMS, IotlbMap, IotlbModel
from .quirks import QUIRKS
from .ring_index import PackedVqState, decode_packed_base, encode_packed_base
from .spec import ErrnoRule, ModelErrno
from .status import StatusBit, StatusWrite
from .vdpa_device import (
    VDPA_RESET_F_CLEAN_MAP,
    VQ_STATE_LAYOUT,
    DeviceSnapshot,
    VdpaDeviceModel,
    VdpaDeviceSpec,
)

U32_MAX: Final = 0xFFFFFFFF
_LIVE: Final = StatusBit.DRIVER_OK | StatusBit.FEATURES_OK
MSG_V2_SIZE: Final = vt.VHOST_MSG_V2.size  # write() returns the message size on success

_B = 1
#: Backend features vhost-vdpa always offers (VHOST_VDPA_BACKEND_FEATURES).
BASE_BACKEND_FEATURES: Final = (
    _B << vt.VHOST_BACKEND_F_IOTLB_MSG_V2
    | _B << vt.VHOST_BACKEND_F_IOTLB_BATCH
    | _B << vt.VHOST_BACKEND_F_IOTLB_ASID
)
#: Every backend feature VHOST_SET_BACKEND_FEATURES can accept at all.
KNOWN_BACKEND_FEATURES: Final = (
    BASE_BACKEND_FEATURES
    | _B << vt.VHOST_BACKEND_F_DESC_ASID
    | _B << vt.VHOST_BACKEND_F_IOTLB_PERSIST
    | _B << vt.VHOST_BACKEND_F_SUSPEND
    | _B << vt.VHOST_BACKEND_F_RESUME
    | _B << vt.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK
)

#: ioctl name -> request number, for every ioctl the model answers.
IOCTLS: Final[Mapping[str, int]] = MappingProxyType(
    {
        name: getattr(ioctls, name)
        for name in (
            "VHOST_GET_FEATURES",
            "VHOST_SET_FEATURES",
            "VHOST_SET_OWNER",
            "VHOST_SET_LOG_BASE",
            "VHOST_SET_LOG_FD",
            "VHOST_SET_VRING_NUM",
            "VHOST_SET_VRING_ADDR",
            "VHOST_SET_VRING_BASE",
            "VHOST_GET_VRING_BASE",
            "VHOST_SET_VRING_KICK",
            "VHOST_SET_VRING_CALL",
            "VHOST_SET_VRING_ERR",
            "VHOST_SET_BACKEND_FEATURES",
            "VHOST_GET_BACKEND_FEATURES",
            "VHOST_VDPA_GET_DEVICE_ID",
            "VHOST_VDPA_GET_STATUS",
            "VHOST_VDPA_SET_STATUS",
            "VHOST_VDPA_GET_CONFIG",
            "VHOST_VDPA_SET_CONFIG",
            "VHOST_VDPA_SET_VRING_ENABLE",
            "VHOST_VDPA_GET_VRING_NUM",
            "VHOST_VDPA_SET_CONFIG_CALL",
            "VHOST_VDPA_GET_IOVA_RANGE",
            "VHOST_VDPA_GET_CONFIG_SIZE",
            "VHOST_VDPA_GET_AS_NUM",
            "VHOST_VDPA_GET_VRING_GROUP",
            "VHOST_VDPA_SET_GROUP_ASID",
            "VHOST_VDPA_SUSPEND",
            "VHOST_VDPA_RESUME",
            "VHOST_VDPA_GET_VRING_DESC_GROUP",
            "VHOST_VDPA_GET_VQS_COUNT",
            "VHOST_VDPA_GET_GROUP_NUM",
            "VHOST_VDPA_GET_VRING_SIZE",
        )
    }
)

#: ioctls vhost_vdpa_unlocked_ioctl serves itself, before any owner check.
OWNER_EXEMPT: Final = frozenset(
    {
        "VHOST_SET_OWNER",
        "VHOST_SET_BACKEND_FEATURES",
        "VHOST_GET_BACKEND_FEATURES",
        "VHOST_GET_FEATURES",
        "VHOST_SET_FEATURES",
        "VHOST_VDPA_GET_DEVICE_ID",
        "VHOST_VDPA_GET_STATUS",
        "VHOST_VDPA_SET_STATUS",
        "VHOST_VDPA_GET_CONFIG",
        "VHOST_VDPA_SET_CONFIG",
        "VHOST_VDPA_GET_VRING_NUM",
        "VHOST_VDPA_GET_GROUP_NUM",
        "VHOST_VDPA_GET_AS_NUM",
        "VHOST_VDPA_SET_CONFIG_CALL",
        "VHOST_VDPA_GET_IOVA_RANGE",
        "VHOST_VDPA_GET_CONFIG_SIZE",
        "VHOST_VDPA_GET_VQS_COUNT",
        "VHOST_VDPA_SUSPEND",
        "VHOST_VDPA_RESUME",
    }
)

_IOCTL = sections.vhost_vdpa("vhost_vdpa_unlocked_ioctl")
_VRING = sections.vhost_vdpa("vhost_vdpa_vring_ioctl")
_MSG = sections.vhost_vdpa("vhost_vdpa_process_iotlb_msg")

# -- rules ------------------------------------------------------------------------------------
FD_CLOSED = ErrnoRule(
    "vhost_vdpa.fd.closed", errno.EBADF, sections.vhost_vdpa("vhost_vdpa_open"), "the char device is not open"
)
SECOND_OPEN = ErrnoRule(
    "vhost_vdpa.open.exclusive",
    errno.EBUSY,
    sections.vhost_vdpa("vhost_vdpa_open"),
    "the char device has one opener at a time",
)
NOT_OWNER = ErrnoRule(
    "vhost_vdpa.owner.required",
    errno.EPERM,
    sections.vhost_core("vhost_dev_check_owner"),
    "only the owner (after VHOST_SET_OWNER) may issue this",
)
OWNER_TWICE = ErrnoRule(
    "vhost_vdpa.owner.once",
    errno.EBUSY,
    sections.vhost_core("vhost_dev_set_owner"),
    "the device already has an owner",
)
VQ_INDEX = ErrnoRule("vhost_vdpa.vring.index", errno.ENOBUFS, _VRING, "the vring index must be below nvqs")
LOG_UNSUPPORTED = ErrnoRule(
    "vhost_vdpa.log.unsupported",
    errno.ENOTTY,
    _IOCTL,
    "vhost-vdpa has no dirty log (ENOIOCTLCMD becomes ENOTTY)",
)
FEATURES_LOCKED = ErrnoRule(
    "vhost_vdpa.set_features.after_features_ok",
    errno.EBUSY,
    sections.vhost_vdpa("vhost_vdpa_set_features"),
    "features cannot change once FEATURES_OK is set",
)
SET_FEATURES_FAILED = ErrnoRule(
    "vhost_vdpa.set_features.refused",
    errno.EINVAL,
    sections.vhost_vdpa("vhost_vdpa_set_features"),
    "the parent refused set_driver_features",
)
STATUS_CLEARS = ErrnoRule(
    "vhost_vdpa.set_status.clears_bits",
    errno.EINVAL,
    sections.vhost_vdpa("vhost_vdpa_set_status"),
    "a status write other than 0 must keep every bit already set",
)
CONFIG_BOUNDS = ErrnoRule(
    "vhost_vdpa.config.bounds",
    errno.EINVAL,
    sections.vhost_vdpa("vhost_vdpa_config_validate"),
    "len must be non-zero and off + len within the config size (E2BIG reported as EINVAL)",
)
BACKEND_UNKNOWN = ErrnoRule(
    "vhost_vdpa.backend_features.unknown",
    errno.EOPNOTSUPP,
    _IOCTL,
    "backend feature bits vhost-vdpa does not know",
)
BACKEND_UNSUPPORTED = ErrnoRule(
    "vhost_vdpa.backend_features.unsupported",
    errno.EOPNOTSUPP,
    _IOCTL,
    "a backend feature the parent cannot provide",
)
DESC_ASID_NEEDS_ASID = ErrnoRule(
    "vhost_vdpa.backend_features.desc_asid", errno.EINVAL, _IOCTL, "DESC_ASID requires IOTLB_ASID"
)
NO_PARENT_OP = ErrnoRule(
    "vhost_vdpa.parent_op", errno.EOPNOTSUPP, _VRING, "the parent lacks the config op this ioctl needs"
)
GROUP_OUT_OF_RANGE = ErrnoRule(
    "vhost_vdpa.vring_group.range", errno.EIO, _VRING, "the parent reported a group >= ngroups"
)
ASID_OUT_OF_RANGE = ErrnoRule(
    "vhost_vdpa.set_group_asid.asid",
    errno.EINVAL,
    _VRING,
    "the address space id must be below the number of address spaces",
)
VRING_NUM_INVALID = ErrnoRule(
    "vhost_vdpa.vring_num.invalid",
    errno.EINVAL,
    sections.vhost_core("vhost_vring_set_num"),
    "the vring size must be a non-zero power of 2 no larger than 0xffff",
)
VRING_NUM_BOUNDS = ErrnoRule(
    "vhost_vdpa.vring_num.bounds",
    errno.EINVAL,
    sections.VIRTQUEUES,
    "the vring size must lie between the device's minimum and maximum",
)
VRING_ADDR_FLAGS = ErrnoRule(
    "vhost_vdpa.vring_addr.flags",
    errno.EOPNOTSUPP,
    sections.vhost_core("vhost_vring_set_addr"),
    "only VHOST_VRING_F_LOG is defined",
)
VRING_ADDR_ALIGN = ErrnoRule(
    "vhost_vdpa.vring_addr.align",
    errno.EINVAL,
    sections.vhost_core("vhost_vring_set_addr"),
    "avail must be 2-byte, used and log 4-byte aligned",
)
VRING_DESC_ALIGN = ErrnoRule(
    "vhost_vdpa.vring_addr.desc_align",
    errno.EINVAL,
    sections.SPLIT_VIRTQUEUES,
    "the descriptor area must be 16-byte aligned",
)
VRING_BUSY = ErrnoRule(
    "vhost_vdpa.vring.running",
    errno.EINVAL,
    _VRING,
    "a running queue (enabled, DRIVER_OK, not suspended) keeps its addresses and base",
)
VRING_BASE_RANGE = ErrnoRule(
    "vhost_vdpa.vring_base.split_range",
    errno.EINVAL,
    sections.vhost_core("vhost_vring_ioctl"),
    "a split vring base is a 16-bit index",
)
BAD_FD = ErrnoRule(
    "vhost_vdpa.eventfd",
    errno.EBADF,
    sections.vhost_core("vhost_vring_ioctl"),
    "an eventfd is a file descriptor or VHOST_FILE_UNBIND (-1)",
)
MSG_TYPE = ErrnoRule(
    "vhost_vdpa.msg.type",
    errno.EINVAL,
    sections.vhost_core("vhost_chr_write_iter"),
    "a message is VHOST_IOTLB_MSG or VHOST_IOTLB_MSG_V2",
)
MSG_UPDATE_EMPTY = ErrnoRule(
    "vhost_vdpa.msg.update_size_zero",
    errno.EINVAL,
    sections.vhost_core("vhost_chr_write_iter"),
    "an IOTLB update must have a size",
)
MSG_FAILED = ErrnoRule(
    "vhost_vdpa.msg.failed",
    errno.EFAULT,
    sections.vhost_core("vhost_chr_write_iter"),
    "the message handler failed (its errno is reported as EFAULT)",
)
MSG_NO_AS = ErrnoRule(
    "vhost_vdpa.msg.asid",
    errno.EINVAL,
    _MSG,
    "the asid must be below nas, and name an address space already used for non-update messages",
)
MSG_BATCH_ASID = ErrnoRule(
    "vhost_vdpa.msg.batch_asid",
    errno.EINVAL,
    _MSG,
    "inside a batch every message must target the batch's asid",
)
MSG_UADDR_UNBACKED = ErrnoRule(
    "vhost_vdpa.msg.uaddr_unbacked",
    errno.EFAULT,
    sections.vhost_vdpa("vhost_vdpa_pa_map"),
    "every byte of an update's user range must be memory of the owner's process (pinning fails otherwise)",
)
MSG_UNKNOWN = ErrnoRule(
    "vhost_vdpa.msg.iotlb_type",
    errno.EINVAL,
    _MSG,
    "userspace may only send UPDATE, INVALIDATE, BATCH_BEGIN and BATCH_END",
)


#: Quirks of :mod:`vdpacert.model.quirks` this model can predict: a target that declares one gets the
#: quirk's answer from the model instead of the rule's, and :attr:`VhostVdpaModel.quirks_taken` counts
#: every time the quirk decided an answer (so a report lists it instead of hiding it).
MODELLED_QUIRKS: Final = frozenset(
    {
        "vhost_vdpa.vring_num_bounds_unchecked",
        "vhost_vdpa.iotlb_perm_unchecked",
        "vhost_vdpa.invalidate_range_unchecked",
        "vdpa_sim.set_features_requires_access_platform",
        "vdpa_sim.features_ok_never_refused",
    }
)
assert MODELLED_QUIRKS <= QUIRKS.keys(), "a modelled quirk must be in the quirk registry"


class IotlbMessageError(ModelErrno):
    """A ``write()`` of an IOTLB message failed; ``cause`` is the handler's own error."""

    def __init__(self, cause: ModelErrno) -> None:
        super().__init__(
            MSG_FAILED.errno,
            MSG_FAILED.rule,
            MSG_FAILED.citation,
            f"{MSG_FAILED.summary}; cause: errno {cause.errno} ({cause.rule}) {cause.message}",
        )
        self.cause = cause


@dataclass(frozen=True)
class VringEnable:
    """The outcome of VHOST_VDPA_SET_VRING_ENABLE.

    The ioctl itself always succeeds (``set_vq_ready`` cannot fail). Before DRIVER_OK the
    device records readiness; after DRIVER_OK enabling a queue is defined only with
    VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK negotiated and disabling one only with
    VIRTIO_F_RING_RESET; otherwise ``determined`` is False and the suite only checks the device
    survives.
    """

    index: int
    ready: bool
    determined: bool
    note: str = ""


@dataclass(frozen=True)
class VhostVq:
    """What vhost-vdpa itself keeps per vring besides the device's state."""

    kick: bool = False
    call: bool = False
    err: bool = False
    log_used: bool = False
    log_addr: int = 0


@dataclass(frozen=True)
class VhostSnapshot:
    """Everything observable about the char device and its device, as one comparable value."""

    opened: bool
    owner: bool
    backend_features: int
    acked_features: int
    in_batch: bool
    batch_asid: int
    address_spaces: tuple[tuple[int, tuple[IotlbMap, ...]], ...]
    vqs: tuple[VhostVq, ...]
    config_call: bool
    log_base: int | None
    log_fd: bool
    suspended: bool
    device: DeviceSnapshot


def _u(name: str, value: int, top: int) -> None:
    if not 0 <= value <= top:
        raise ValueError(f"{name} must be 0..{top:#x}, got {value}")


@dataclass
class _State:
    owner: bool = False
    backend_features: int = 0
    acked_features: int = 0
    in_batch: bool = False
    batch_asid: int = 0
    address_spaces: dict[int, IotlbModel] = field(default_factory=dict)
    vqs: list[VhostVq] = field(default_factory=list)
    config_call: bool = False
    log_base: int | None = None
    log_fd: bool = False
    suspended: bool = False
    #: Queues that started -> the size they started with (0: the start failed), see ``_note_starts``.
    started: dict[int, int] = field(default_factory=dict)


class VhostVdpaModel:
    """One ``/dev/vhost-vdpa-N`` over one vDPA device; methods are named after the ioctls."""

    def __init__(self, device: VdpaDeviceModel | VdpaDeviceSpec, *, quirks: Iterable[str] = ()) -> None:
        self.device = device if isinstance(device, VdpaDeviceModel) else VdpaDeviceModel(device)
        self.spec = self.device.spec
        self.opened = False
        self._s = _State(vqs=[VhostVq()] * self.spec.nvqs)
        self.quirks = frozenset(quirks)
        unknown = self.quirks - MODELLED_QUIRKS
        if unknown:
            known = sorted(MODELLED_QUIRKS)
            raise ValueError(f"quirks {sorted(unknown)} are not modelled here; modelled: {known}")
        #: How often each declared quirk decided an answer.
        self.quirks_taken: Counter[str] = Counter()
        #: The same decisions by (the rule whose answer the quirk replaced, quirk name): one quirk may stand in
        #: for more than one rule (an unchecked invalidation is both the size-0 and the wrapping case).
        self.quirks_decided: Counter[tuple[str, str]] = Counter()
        #: The owner's process memory as ``(uaddr, size)`` ranges; None: unknown, so not checked.
        self.user_memory: tuple[tuple[int, int], ...] | None = None

    def set_user_memory(self, ranges: Iterable[tuple[int, int]] | None) -> None:
        """Tell the model which user addresses are memory of the owner (None: unknown, nothing is checked).

        Linux pins the pages of an UPDATE's user range (``vhost_vdpa_pa_map``) or looks up their
        VMAs (``vhost_vdpa_va_map``); a range with no memory behind it fails.
        """
        self.user_memory = None if ranges is None else tuple(sorted((int(a), int(n)) for a, n in ranges))

    def _quirk(self, name: str, rule: str | None = None) -> bool:
        """Whether quirk ``name`` is declared; counts it as taken (call only where it changes the answer).

        ``rule`` is the rule whose answer the quirk replaces here (default: the rule the quirk names).
        """
        if name not in self.quirks:
            return False
        self.quirks_taken[name] += 1
        self.quirks_decided[(rule or QUIRKS[name].rule, name)] += 1
        return True

    def _backed(self, uaddr: int, size: int) -> bool:
        if self.user_memory is None:
            return True
        end = uaddr + size
        for start, length in self.user_memory:  # sorted: walk the ranges covering [uaddr, end)
            if start <= uaddr < start + length:
                uaddr = start + length
                if uaddr >= end:
                    return True
        return False

    # -- file lifetime -------------------------------------------------------------------------------
    def open(self) -> None:
        """open(2): one opener at a time; the device is reset and vhost state starts afresh."""
        if self.opened:
            raise SECOND_OPEN.fail("already open")
        self.opened = True
        self._s = _State(vqs=[VhostVq()] * self.spec.nvqs)
        self.device.reset()

    def close(self) -> None:
        """release: reset the device, drop every mapping (each address space back to initial)."""
        self._check_open()
        self._reset_device()
        for asid in range(self.spec.nas):
            self.device.iotlb(asid).clear()
        self._s = _State(vqs=[VhostVq()] * self.spec.nvqs)
        self.opened = False

    def snapshot(self) -> VhostSnapshot:
        s = self._s
        return VhostSnapshot(
            opened=self.opened,
            owner=s.owner,
            backend_features=s.backend_features,
            acked_features=s.acked_features,
            in_batch=s.in_batch,
            batch_asid=s.batch_asid,
            address_spaces=tuple(sorted((a, t.snapshot()) for a, t in s.address_spaces.items())),
            vqs=tuple(s.vqs),
            config_call=s.config_call,
            log_base=s.log_base,
            log_fd=s.log_fd,
            suspended=s.suspended,
            device=self.device.snapshot(),
        )

    def address_space(self, asid: int) -> IotlbModel | None:
        """vhost-vdpa's own record of address space ``asid`` (None until first used)."""
        return self._s.address_spaces.get(asid)

    @property
    def backend_features(self) -> int:
        return self._s.backend_features

    def has_backend_feature(self, bit: int) -> bool:
        return bool(self._s.backend_features >> bit & 1)

    # -- shared checks -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if not self.opened:
            raise FD_CLOSED.fail("ioctl on a closed file")

    def _owner(self, name: str) -> None:
        self._check_open()
        if name not in OWNER_EXEMPT and not self._s.owner:
            raise NOT_OWNER.fail(name)

    def _vring(self, name: str, idx: int) -> None:
        self._owner(name)
        _u("vring index", idx, U32_MAX)
        if idx >= self.spec.nvqs:
            raise VQ_INDEX.fail(f"{name} index {idx}, nvqs {self.spec.nvqs}")

    def _running(self, index: int) -> bool:
        """Queue ``index`` runs: the device is live (DRIVER_OK over accepted features, §3.1.1; the driver has
        not given up with FAILED, §2.1; not suspended) and the queue started with a configuration a device
        can run (§2.7 / §2.8 sizes and alignments; see :meth:`_note_starts`). Like mlx5_vdpa (a queue object
        in the RDY state refuses a new state), the refusal is per queue; vdpa_sim never refuses."""
        self._note_starts()
        status = self.device.status
        return (status & _LIVE == _LIVE and not status & StatusBit.FAILED and not self._s.suspended
                and self._s.started.get(index, 0) > 0)

    def _note_starts(self) -> None:
        """Record the queues that start: when the device goes live with them enabled, or when they are enabled
        on a live device, with the configuration they have at that moment. A later change of that
        configuration (a size a declared quirk stores unchecked) neither starts nor stops the queue: it took
        effect, or failed, then. A queue disabled, or a reset, forgets its start."""
        live = self.device.status & _LIVE == _LIVE
        started = self._s.started
        for index, vq in enumerate(self.device.vqs):
            if not (live and vq.ready):
                started.pop(index, None)
            elif index not in started:
                started[index] = vq.num if self._startable(index) else 0

    def _startable(self, index: int) -> bool:
        """A queue configuration a device can run: a size it supports (a power of 2 for split rings, §2.7)
        and areas aligned for the layout (§2.7: 16/2/4; §2.8.10.1: 16/4/4)."""
        vq, packed = self.device.vqs[index], self.device.packed
        size_ok = self.spec.vq_num_min <= vq.num <= self.spec.vq_num_max and (packed or not vq.num & (vq.num - 1))
        return (size_ok and vq.desc_addr % 16 == 0 and vq.driver_addr % (4 if packed else 2) == 0
                and vq.device_addr % 4 == 0)

    def _persistent_map(self) -> bool:
        return (
            self.spec.map_op == "platform"
            or "reset_map" in self.spec.optional_ops
            or bool(self.device.get_backend_features() >> vt.VHOST_BACKEND_F_IOTLB_PERSIST & 1)
        )

    def _reset_device(self) -> None:
        """_compat_vdpa_reset: clean maps on reset unless IOTLB_PERSIST was negotiated."""
        self._s.suspended = False
        self._s.started.clear()
        clean = not self.has_backend_feature(vt.VHOST_BACKEND_F_IOTLB_PERSIST)
        if clean and "compat_reset" in self.spec.optional_ops:
            self.device.compat_reset(VDPA_RESET_F_CLEAN_MAP)
        else:
            self.device.reset()

    @staticmethod
    def _fd(fd: int) -> bool:
        if fd < vt.VHOST_FILE_UNBIND:
            raise BAD_FD.fail(f"fd {fd}")
        return fd != vt.VHOST_FILE_UNBIND

    # -- owner and features --------------------------------------------------------------------------
    def VHOST_SET_OWNER(self) -> None:  # noqa: N802 - named after the ioctl
        self._owner("VHOST_SET_OWNER")
        if self._s.owner:
            raise OWNER_TWICE.fail("VHOST_SET_OWNER twice")
        self._s.owner = True

    def VHOST_GET_FEATURES(self) -> int:  # noqa: N802
        self._owner("VHOST_GET_FEATURES")
        return self.device.get_device_features()

    def VHOST_SET_FEATURES(self, features: int) -> None:  # noqa: N802
        self._owner("VHOST_SET_FEATURES")
        _u("features", features, U64_MAX)
        if self.device.status & StatusBit.FEATURES_OK:
            # vhost.h: VHOST_F_LOG_ALL "can be changed while device is active" (how a VMM starts and stops
            # logging for a migration); on a device that logs, that one change is not frozen by FEATURES_OK.
            log_all = _B << vt.VHOST_F_LOG_ALL
            if not (self.spec.supports_dirty_log and features ^ self._s.acked_features == log_all
                    and self.device.get_device_features() & log_all):
                raise FEATURES_LOCKED.fail(f"status {self.device.status:#x}")
            self.device.set_log_all(bool(features & log_all))
            self._s.acked_features = self.device.get_driver_features()
            return
        if not features >> VIRTIO_F_ACCESS_PLATFORM & 1 and self._quirk(
                "vdpa_sim.set_features_requires_access_platform"):
            raise SET_FEATURES_FAILED.fail("the parent refuses any feature set without ACCESS_PLATFORM")
        try:
            self.device.set_driver_features(features)
        except ModelErrno as e:
            raise SET_FEATURES_FAILED.fail(e.message) from e
        self._s.acked_features = self.device.get_driver_features()

    def VHOST_GET_BACKEND_FEATURES(self) -> int:  # noqa: N802
        self._owner("VHOST_GET_BACKEND_FEATURES")
        ops = self.spec.optional_ops
        offered = BASE_BACKEND_FEATURES | self.device.get_backend_features()
        if "suspend" in ops:
            offered |= _B << vt.VHOST_BACKEND_F_SUSPEND
        if "resume" in ops:
            offered |= _B << vt.VHOST_BACKEND_F_RESUME
        if "get_vq_desc_group" in ops:
            offered |= _B << vt.VHOST_BACKEND_F_DESC_ASID
        if self._persistent_map():
            offered |= _B << vt.VHOST_BACKEND_F_IOTLB_PERSIST
        return offered

    def VHOST_SET_BACKEND_FEATURES(self, features: int) -> None:  # noqa: N802
        self._owner("VHOST_SET_BACKEND_FEATURES")
        _u("backend features", features, U64_MAX)
        if features & ~KNOWN_BACKEND_FEATURES:
            raise BACKEND_UNKNOWN.fail(f"{features & ~KNOWN_BACKEND_FEATURES:#x}")
        ops = self.spec.optional_ops

        def has(bit: int) -> bool:
            return bool(features >> bit & 1)

        if has(vt.VHOST_BACKEND_F_SUSPEND) and "suspend" not in ops:
            raise BACKEND_UNSUPPORTED.fail("SUSPEND without a suspend op")
        if has(vt.VHOST_BACKEND_F_RESUME) and "resume" not in ops:
            raise BACKEND_UNSUPPORTED.fail("RESUME without a resume op")
        if has(vt.VHOST_BACKEND_F_DESC_ASID) and not has(vt.VHOST_BACKEND_F_IOTLB_ASID):
            raise DESC_ASID_NEEDS_ASID.fail(f"{features:#x}")
        if has(vt.VHOST_BACKEND_F_DESC_ASID) and "get_vq_desc_group" not in ops:
            raise BACKEND_UNSUPPORTED.fail("DESC_ASID without get_vq_desc_group")
        if has(vt.VHOST_BACKEND_F_IOTLB_PERSIST) and not self._persistent_map():
            raise BACKEND_UNSUPPORTED.fail("IOTLB_PERSIST without a persistent map")
        if (
            has(vt.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK)
            and not self.device.get_backend_features() >> vt.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK & 1
        ):
            raise BACKEND_UNSUPPORTED.fail("ENABLE_AFTER_DRIVER_OK not reported by the parent")
        self._s.backend_features = features

    # -- status, config, identity ----------------------------------------------------------------------
    def VHOST_VDPA_GET_DEVICE_ID(self) -> int:  # noqa: N802
        self._owner("VHOST_VDPA_GET_DEVICE_ID")
        return self.device.get_device_id()

    def VHOST_VDPA_GET_STATUS(self) -> int:  # noqa: N802
        self._owner("VHOST_VDPA_GET_STATUS")
        return self.device.get_status()

    def VHOST_VDPA_SET_STATUS(self, status: int) -> StatusWrite:  # noqa: N802
        """Write the status byte; 0 resets (maps cleaned unless IOTLB_PERSIST was negotiated)."""
        self._owner("VHOST_VDPA_SET_STATUS")
        _u("status", status, 0xFF)
        old = self.device.get_status()
        if status != 0 and old & ~status:
            raise STATUS_CLEARS.fail(f"{old:#x} -> {status:#x}")
        if status == 0:
            self._reset_device()
            return StatusWrite(status=0, reset=True)
        newly_ok = status & ~old & StatusBit.FEATURES_OK
        accept_any = bool(newly_ok) and not self.device.features_valid() and self._quirk(
            "vdpa_sim.features_ok_never_refused")
        written = self.device.set_status(status, accept_any_features=accept_any)
        self._note_starts()
        return written

    def _config_window(self, name: str, off: int, length: int) -> None:
        self._owner(name)
        _u("off", off, U32_MAX)
        _u("len", length, U32_MAX)
        size = self.device.get_config_size()
        if length == 0 or off > size or length > size - off:
            raise CONFIG_BOUNDS.fail(f"off {off} len {length} size {size}")

    def VHOST_VDPA_GET_CONFIG(self, off: int, length: int) -> bytes:  # noqa: N802
        self._config_window("VHOST_VDPA_GET_CONFIG", off, length)
        return self.device.get_config(off, length)

    def VHOST_VDPA_SET_CONFIG(self, off: int, data: bytes) -> None:  # noqa: N802
        self._config_window("VHOST_VDPA_SET_CONFIG", off, len(data))
        self.device.set_config(off, bytes(data))

    def VHOST_VDPA_GET_CONFIG_SIZE(self) -> int:  # noqa: N802
        self._owner("VHOST_VDPA_GET_CONFIG_SIZE")
        return self.device.get_config_size()

    def VHOST_VDPA_SET_CONFIG_CALL(self, fd: int) -> None:  # noqa: N802
        self._owner("VHOST_VDPA_SET_CONFIG_CALL")
        self._s.config_call = self._fd(fd)

    def VHOST_VDPA_GET_VRING_NUM(self) -> int:  # noqa: N802
        self._owner("VHOST_VDPA_GET_VRING_NUM")
        return self.device.get_vq_num_max()

    def VHOST_VDPA_GET_VQS_COUNT(self) -> int:  # noqa: N802
        self._owner("VHOST_VDPA_GET_VQS_COUNT")
        return self.spec.nvqs

    def VHOST_VDPA_GET_GROUP_NUM(self) -> int:  # noqa: N802
        self._owner("VHOST_VDPA_GET_GROUP_NUM")
        return self.spec.ngroups

    def VHOST_VDPA_GET_AS_NUM(self) -> int:  # noqa: N802
        self._owner("VHOST_VDPA_GET_AS_NUM")
        return self.spec.nas

    def VHOST_VDPA_GET_IOVA_RANGE(self) -> tuple[int, int]:  # noqa: N802
        self._owner("VHOST_VDPA_GET_IOVA_RANGE")
        return self.device.get_iova_range()

    # -- suspend / resume ------------------------------------------------------------------------------
    def VHOST_VDPA_SUSPEND(self) -> None:  # noqa: N802
        self._owner("VHOST_VDPA_SUSPEND")
        if not self.device.status & StatusBit.DRIVER_OK:
            return
        if "suspend" not in self.spec.optional_ops:
            raise NO_PARENT_OP.fail("suspend")
        self.device.suspend()
        self._s.suspended = True

    def VHOST_VDPA_RESUME(self) -> None:  # noqa: N802
        self._owner("VHOST_VDPA_RESUME")
        if not self.device.status & StatusBit.DRIVER_OK:
            return
        if "resume" not in self.spec.optional_ops:
            raise NO_PARENT_OP.fail("resume")
        self.device.resume()
        self._s.suspended = False

    # -- dirty log -------------------------------------------------------------------------------------
    def VHOST_SET_LOG_BASE(self, log_base: int) -> None:  # noqa: N802
        self._check_open()
        if not self.spec.supports_dirty_log:
            raise LOG_UNSUPPORTED.fail("VHOST_SET_LOG_BASE")
        self._owner("VHOST_SET_LOG_BASE")
        _u("log base", log_base, U64_MAX)
        self._s.log_base = log_base

    def VHOST_SET_LOG_FD(self, fd: int) -> None:  # noqa: N802
        self._check_open()
        if not self.spec.supports_dirty_log:
            raise LOG_UNSUPPORTED.fail("VHOST_SET_LOG_FD")
        self._owner("VHOST_SET_LOG_FD")
        self._s.log_fd = self._fd(fd)

    # -- vrings ----------------------------------------------------------------------------------------
    def VHOST_SET_VRING_NUM(self, index: int, num: int) -> None:  # noqa: N802
        self._vring("VHOST_SET_VRING_NUM", index)
        _u("num", num, U32_MAX)
        if num == 0 or num > 0xFFFF or num & (num - 1):
            raise VRING_NUM_INVALID.fail(str(num))
        if not self.spec.vq_num_min <= num <= self.spec.vq_num_max:
            if self._quirk("vhost_vdpa.vring_num_bounds_unchecked"):
                # set_vq_num cannot fail: the parent stores the size (and refuses it at DRIVER_OK, if ever);
                # a queue already running goes on with the size it started with.
                self._note_starts()
                self.device.vqs[index] = replace(self.device.vqs[index], num=num)
                return
            raise VRING_NUM_BOUNDS.fail(f"{num} outside [{self.spec.vq_num_min}, {self.spec.vq_num_max}]")
        self.device.set_vq_num(index, num)

    def VHOST_SET_VRING_ADDR(  # noqa: N802
        self,
        index: int,
        desc_user_addr: int,
        avail_user_addr: int,
        used_user_addr: int,
        *,
        flags: int = 0,
        log_guest_addr: int = 0,
    ) -> None:
        self._vring("VHOST_SET_VRING_ADDR", index)
        for name, value in (
            ("desc", desc_user_addr),
            ("avail", avail_user_addr),
            ("used", used_user_addr),
            ("log", log_guest_addr),
        ):
            _u(f"{name} address", value, U64_MAX)
        _u("flags", flags, U32_MAX)
        if flags & ~(1 << vt.VHOST_VRING_F_LOG):
            raise VRING_ADDR_FLAGS.fail(f"flags {flags:#x}")
        if avail_user_addr & 1 or used_user_addr & 3 or log_guest_addr & 3:
            raise VRING_ADDR_ALIGN.fail(
                f"avail {avail_user_addr:#x} used {used_user_addr:#x} log {log_guest_addr:#x}"
            )
        if desc_user_addr & 15:
            raise VRING_DESC_ALIGN.fail(f"desc {desc_user_addr:#x}")
        if self._running(index):
            raise VRING_BUSY.fail(f"VHOST_SET_VRING_ADDR of running queue {index}")
        self.device.set_vq_address(index, desc_user_addr, avail_user_addr, used_user_addr)
        self._s.vqs[index] = replace(
            self._s.vqs[index], log_used=bool(flags & 1 << vt.VHOST_VRING_F_LOG), log_addr=log_guest_addr
        )

    def VHOST_SET_VRING_BASE(self, index: int, num: int) -> None:  # noqa: N802
        """Set where the queue resumes: split = last_avail_idx; packed = ring_index encoding."""
        self._vring("VHOST_SET_VRING_BASE", index)
        _u("num", num, U32_MAX)
        if not self.device.packed and num > 0xFFFF:
            raise VRING_BASE_RANGE.fail(f"{num:#x}")
        if self._running(index):
            raise VRING_BUSY.fail(f"VHOST_SET_VRING_BASE of running queue {index}")
        state: int | PackedVqState = decode_packed_base(num) if self.device.packed else num
        started_with = self._s.started.get(index, 0)
        if isinstance(state, PackedVqState) and started_with and max(state.last_avail_idx,
                                                                     state.last_used_idx) >= started_with:
            # A packed position is a slot of the ring (§2.8): on a queue that started with N slots, one
            # at N or beyond is no position at all.
            raise VQ_STATE_LAYOUT.fail(f"packed position {state} on queue {index} of {started_with} entries")
        self.device.set_vq_state(index, state)

    def VHOST_GET_VRING_BASE(self, index: int) -> int:  # noqa: N802
        self._vring("VHOST_GET_VRING_BASE", index)
        state = self.device.get_vq_state(index)
        return encode_packed_base(state) if isinstance(state, PackedVqState) else state

    def VHOST_SET_VRING_KICK(self, index: int, fd: int) -> None:  # noqa: N802
        self._vring("VHOST_SET_VRING_KICK", index)
        self._s.vqs[index] = replace(self._s.vqs[index], kick=self._fd(fd))

    def VHOST_SET_VRING_CALL(self, index: int, fd: int) -> None:  # noqa: N802
        self._vring("VHOST_SET_VRING_CALL", index)
        bound = self._fd(fd)
        self.device.set_vq_cb(index, bound)
        self._s.vqs[index] = replace(self._s.vqs[index], call=bound)

    def VHOST_SET_VRING_ERR(self, index: int, fd: int) -> None:  # noqa: N802
        self._vring("VHOST_SET_VRING_ERR", index)
        self._s.vqs[index] = replace(self._s.vqs[index], err=self._fd(fd))

    def VHOST_VDPA_SET_VRING_ENABLE(self, index: int, num: int) -> VringEnable:  # noqa: N802
        self._vring("VHOST_VDPA_SET_VRING_ENABLE", index)
        _u("num", num, U32_MAX)
        ready = bool(num)
        determined, note = True, ""
        if self.device.status & StatusBit.DRIVER_OK:
            if ready and not self.has_backend_feature(vt.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK):
                determined, note = False, "enable after DRIVER_OK without ENABLE_AFTER_DRIVER_OK"
            if not ready and not self.device.driver_features >> VIRTIO_F_RING_RESET & 1:
                determined, note = False, "disable after DRIVER_OK without VIRTIO_F_RING_RESET"
        self.device.set_vq_ready(index, ready)
        self._note_starts()
        return VringEnable(index, ready, determined, note)

    def VHOST_VDPA_GET_VRING_GROUP(self, index: int) -> int:  # noqa: N802
        self._vring("VHOST_VDPA_GET_VRING_GROUP", index)
        if "get_vq_group" not in self.spec.optional_ops:
            raise NO_PARENT_OP.fail("get_vq_group")
        group = self.device.get_vq_group(index)
        if group >= self.spec.ngroups:
            raise GROUP_OUT_OF_RANGE.fail(str(group))
        return group

    def VHOST_VDPA_GET_VRING_DESC_GROUP(self, index: int) -> int:  # noqa: N802
        self._vring("VHOST_VDPA_GET_VRING_DESC_GROUP", index)
        if "get_vq_desc_group" not in self.spec.optional_ops:
            raise NO_PARENT_OP.fail("get_vq_desc_group")
        return self.device.get_vq_desc_group(index)

    def VHOST_VDPA_SET_GROUP_ASID(self, group: int, asid: int) -> None:  # noqa: N802
        """Bind a group to an address space. The group travels in ``index``, so it is checked
        against nvqs (ENOBUFS) before the parent checks it against ngroups (EINVAL)."""
        self._vring("VHOST_VDPA_SET_GROUP_ASID", group)
        _u("asid", asid, U32_MAX)
        if asid >= self.spec.nas:
            raise ASID_OUT_OF_RANGE.fail(f"asid {asid}, nas {self.spec.nas}")
        if "set_group_asid" not in self.spec.optional_ops:
            raise NO_PARENT_OP.fail("set_group_asid")
        self.device.set_group_asid(group, asid)

    def VHOST_VDPA_GET_VRING_SIZE(self, index: int) -> int:  # noqa: N802
        self._vring("VHOST_VDPA_GET_VRING_SIZE", index)
        if "get_vq_size" not in self.spec.optional_ops:
            raise NO_PARENT_OP.fail("get_vq_size")
        return self.device.get_vq_size(index)

    # -- IOTLB messages --------------------------------------------------------------------------------
    def write_msg(
        self,
        msg_type: int,
        asid: int = 0,
        iova: int = 0,
        size: int = 0,
        uaddr: int = 0,
        perm: int = 0,
        *,
        version: int = vt.VHOST_IOTLB_MSG_V2,
    ) -> int:
        """write(2) of one IOTLB message; returns the bytes consumed or raises.

        Handler failures raise :class:`IotlbMessageError` (EFAULT) with the handler's errno as
        ``cause``. A failure changes nothing, except that an UPDATE or BATCH_BEGIN for a valid
        asid leaves that address space's (empty) record behind, as Linux allocates it first.
        """
        self._check_open()
        for name, value in (("iova", iova), ("size", size), ("uaddr", uaddr)):
            _u(name, value, U64_MAX)
        _u("asid", asid, U32_MAX)
        _u("perm", perm, 0xFF)
        _u("msg_type", msg_type, 0xFF)
        if version not in (vt.VHOST_IOTLB_MSG, vt.VHOST_IOTLB_MSG_V2):
            raise MSG_TYPE.fail(f"message type {version}")
        if version != vt.VHOST_IOTLB_MSG_V2 or not self.has_backend_feature(vt.VHOST_BACKEND_F_IOTLB_ASID):
            asid = 0  # the asid field is only read with IOTLB_ASID negotiated
        if msg_type == vt.VHOST_IOTLB_UPDATE and size == 0:
            raise MSG_UPDATE_EMPTY.fail(f"iova {iova:#x}")
        try:
            self._handle_msg(msg_type, asid, iova, size, uaddr, perm)
        except ModelErrno as cause:
            raise IotlbMessageError(cause) from cause
        return MSG_V2_SIZE

    def _handle_msg(self, msg_type: int, asid: int, iova: int, size: int, uaddr: int, perm: int) -> None:
        s = self._s
        if not s.owner:
            raise NOT_OWNER.fail("IOTLB message")
        # UPDATE and BATCH_BEGIN create the address space record first, so it survives even when
        # the message then fails (vhost_vdpa_find_alloc_as runs before any other check).
        allocates = msg_type in (vt.VHOST_IOTLB_UPDATE, vt.VHOST_IOTLB_BATCH_BEGIN)
        book = s.address_spaces.get(asid)
        if book is None and allocates and asid < self.spec.nas:
            book = s.address_spaces[asid] = IotlbModel(iova_range=self.spec.iova_range)
        if book is None:
            raise MSG_NO_AS.fail(f"asid {asid} (nas {self.spec.nas}, allocated {sorted(s.address_spaces)})")
        if s.in_batch and s.batch_asid != asid:
            raise MSG_BATCH_ASID.fail(f"batch asid {s.batch_asid}, message asid {asid}")
        direct = self.spec.map_op != "set_map"

        if msg_type == vt.VHOST_IOTLB_UPDATE:
            check_perm = perm in VALID_PERMS or not self._quirk("vhost_vdpa.iotlb_perm_unchecked")
            new = book.check_update(iova, size, uaddr, perm, check_perm=check_perm)
            if not self._backed(uaddr, size):
                raise MSG_UADDR_UNBACKED.fail(f"uaddr {uaddr:#x} size {size:#x}")
            if direct:
                self.device.dma_map(asid, iova, size, uaddr, perm, check_perm=check_perm)
            elif not s.in_batch:
                self.device.set_map(asid, (*book.maps, new))
            book.update(iova, size, uaddr, perm, check_perm=check_perm)
        elif msg_type == vt.VHOST_IOTLB_INVALIDATE:
            unchecked = size == 0 or iova > U64_MAX - size + 1
            skipped = INVALIDATE_SIZE_ZERO if size == 0 else INVALIDATE_WRAPS
            if unchecked and self._quirk("vhost_vdpa.invalidate_range_unchecked", skipped.rule):
                # vhost_vdpa_unmap computes last = iova + size - 1 modulo 2^64 and drops every
                # mapping the interval tree finds for [iova, last], even when last < iova.
                gone = book.overlapping(iova, (iova + size - 1) & U64_MAX)
                book.replace(m for m in book.maps if m not in gone)
            elif size == 0:
                raise INVALIDATE_SIZE_ZERO.fail(f"iova {iova:#x}")
            elif unchecked:
                raise INVALIDATE_WRAPS.fail(f"iova {iova:#x} size {size:#x}")
            else:
                gone = book.invalidate(iova, size)
            if direct:
                for m in gone:
                    self.device.dma_unmap(asid, m.start, m.size)
            elif not s.in_batch:
                self.device.set_map(asid, book.maps)
        elif msg_type == vt.VHOST_IOTLB_BATCH_BEGIN:
            s.in_batch, s.batch_asid = True, asid
        elif msg_type == vt.VHOST_IOTLB_BATCH_END:
            if s.in_batch and not direct:
                # vhost-vdpa ignores set_map's result here; a failing device keeps its old map.
                with contextlib.suppress(ModelErrno):
                    self.device.set_map(asid, book.maps)
            s.in_batch = False
        else:
            raise MSG_UNKNOWN.fail(f"type {msg_type}")


VHOST_VDPA_RULES: Final = (
    FD_CLOSED,
    SECOND_OPEN,
    NOT_OWNER,
    OWNER_TWICE,
    VQ_INDEX,
    LOG_UNSUPPORTED,
    FEATURES_LOCKED,
    SET_FEATURES_FAILED,
    STATUS_CLEARS,
    CONFIG_BOUNDS,
    BACKEND_UNKNOWN,
    BACKEND_UNSUPPORTED,
    DESC_ASID_NEEDS_ASID,
    NO_PARENT_OP,
    GROUP_OUT_OF_RANGE,
    ASID_OUT_OF_RANGE,
    VRING_NUM_INVALID,
    VRING_NUM_BOUNDS,
    VRING_ADDR_FLAGS,
    VRING_ADDR_ALIGN,
    VRING_DESC_ALIGN,
    VRING_BUSY,
    VRING_BASE_RANGE,
    BAD_FD,
    MSG_TYPE,
    MSG_UPDATE_EMPTY,
    MSG_FAILED,
    MSG_NO_AS,
    MSG_BATCH_ASID,
    MSG_UADDR_UNBACKED,
    MSG_UNKNOWN,
)
