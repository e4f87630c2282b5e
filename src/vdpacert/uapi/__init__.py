"""Plain numeric constants mirrored from the Linux UAPI headers and the virtio spec.

Both the executable spec (``vdpacert.model``) and the reference implementation
(``vdpacert.impl``) import these numbers; neither imports behaviour from the other.
Each module is named after the header it mirrors (``include/uapi/linux/<name>.h``),
and each constant keeps the header's spelling so a reader can grep from one to the other.
Nothing here computes anything beyond the ``_IOC`` encoding of ioctl numbers.
"""
