"""The virtio / vhost / vDPA specification as an executable model.

Pure Python, no I/O. Given the history of operations on a device, the model says what a
conforming device must answer (a value or an errno) and which states are reachable. Its
rules are data tables (feature dependencies, status transitions, ioctl preconditions) from
which both the Python checks and the Z3 encodings are built, and every rule cites the spec
section, or the Linux source, that it encodes.

Modules, from the bottom up:

- :mod:`.spec`, :mod:`.sections`: citations (spec sections, Linux sources), levels, rules,
  violations and the errno a target must answer with; :mod:`.rules` is the catalog of them all.
- :mod:`.feature_bits`, :mod:`.features`: feature bits by device type and the negotiation rules.
- :mod:`.status`: the device status field as a transition table.
- :mod:`.ring_index`, :mod:`.dirty_log`: 16-bit ring index arithmetic, vring base encodings,
  and the pages a device write dirties.
- :mod:`.guest_memory`, :mod:`.chains`, :mod:`.vring_split`, :mod:`.vring_packed`,
  :mod:`.notify`: virtqueues, driver side and device obligations, hostile chains,
  notification suppression.
- :mod:`.config_space`, :mod:`.net`, :mod:`.blk`: the device types.
- :mod:`.iotlb`, :mod:`.vdpa_device`, :mod:`.vhost_vdpa`, :mod:`.quirks`: the vDPA config ops,
  the vhost-vdpa ioctl and IOTLB interface, and where Linux departs from the spec.
- :mod:`.z3_features`, :mod:`.z3_proofs`: Z3 encodings built from the same tables, and proofs
  of the index arithmetic over all 16-bit values.
"""
