"""The reference vDPA framework and software devices, compiled with Cython.

Written independently of :mod:`vdpacert.model`: it shares plain constants
(:mod:`vdpacert.uapi`) and nothing else, so a misreading of the spec in one of them shows up
as a disagreement instead of being copied into both.
"""
