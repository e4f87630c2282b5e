"""The conformance suite: drives a target and the model side by side, through the interface a real user has.

``client`` turns operations into vhost-vdpa ioctls and IOTLB messages; ``targets`` opens the device
a ``--target`` string names; ``driver`` builds rings and traffic in guest memory.
"""
