"""vdpacert: an executable virtio/vhost/vDPA spec, a reference device, and a suite that holds
devices to the spec and proves they migrate without losing a byte.

Subpackages: :mod:`vdpacert.model` (the spec as state machines and Z3 encodings),
:mod:`vdpacert.impl` (the compiled reference vDPA framework and devices),
:mod:`vdpacert.conformance` (the suite) and :mod:`vdpacert.migration`.
"""

from ._version import __version__

__all__ = ["__version__"]
