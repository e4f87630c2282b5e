"""The virtio / vhost / vDPA specification as an executable model.

Pure Python, no I/O. Given the history of operations on a device, the model says what a
conforming device must answer (a value or an errno) and which states are reachable. Its
rules are data tables (feature dependencies, status transitions, ioctl preconditions) from
which both the Python checks and the Z3 encodings are built, and every rule cites the spec
section, or the Linux source, that it encodes.

Modules, from the bottom up:

- :mod:`.spec` and :mod:`.sections`: citations, levels, violations.
- :mod:`.feature_bits` and :mod:`.features`: feature bits and negotiation rules.
- :mod:`.status`: the device status field as a transition table.
"""
