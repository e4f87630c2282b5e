"""Structure-aware fuzzers of the reference device, the vhost-vdpa front and the migration state loader.

Each fuzzer (:class:`~vdpacert.fuzz.base.Fuzzer`) turns an arbitrary byte string into one structured
input (a ring layout, an IOTLB message stream, an ioctl sequence, a mutated state blob), feeds it to
the component under test and checks the invariants that must hold whatever the input: nothing written
outside what the device may write, nothing applied from a rejected input, every refusal a typed error.
A broken invariant raises :class:`~vdpacert.fuzz.base.InvariantBroken`; any other exception escaping
a fuzzer is a crash. :mod:`vdpacert.fuzz.engine` runs them (coverage-guided under atheris, or a
seeded mutation engine where atheris is missing, e.g. under the sanitizer build).
"""
