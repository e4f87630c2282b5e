"""What a rule cites, how binding it is, and how a broken rule is reported.

Every rule in the model carries a :class:`Citation`: a numbered section of the virtio
specification (v1.3 numbering; rules that only v1.4 has are marked with ``version="1.4"``),
or, where the spec is silent (the vhost ioctl interface is not part of virtio), the Linux
source that defines the behaviour. A broken rule is reported as a :class:`Violation`
that names the rule, its level and its citation, so every failure can be traced back to
the sentence it enforces.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Level(enum.Enum):
    """How binding a rule is, in RFC 2119 terms as the virtio spec uses them."""

    MUST = "MUST"
    SHOULD = "SHOULD"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Section:
    """A numbered section of the virtio specification."""

    number: str
    title: str
    version: str = "1.3"

    def __str__(self) -> str:
        return f"virtio v{self.version} §{self.number} {self.title}"

    @property
    def v14_only(self) -> bool:
        return self.version == "1.4"


@dataclass(frozen=True)
class LinuxSource:
    """Linux behaviour the model follows where the virtio spec says nothing.

    The vhost and vhost-vdpa interfaces are defined by the kernel, not by virtio, so their
    rules cite the UAPI header or the function of ``drivers/vhost/vdpa.c`` that defines them.
    """

    path: str
    symbol: str

    def __str__(self) -> str:
        return f"Linux {self.path} {self.symbol}"


Citation = Section | LinuxSource


@dataclass(frozen=True)
class Violation:
    """One broken rule: which rule, how binding, where it is written, and what happened."""

    rule: str
    level: Level
    citation: Citation
    message: str

    @property
    def section(self) -> Citation:
        """The citation; named ``section`` because most rules cite a spec section."""
        return self.citation

    def __str__(self) -> str:
        return f"{self.level} {self.rule}: {self.message} [{self.citation}]"


@dataclass(frozen=True)
class Rule:
    """A rule that is not a table row of its own kind: id, level, citation and our summary of it.

    Rule ids are stable (reports and target quirks refer to them), dotted, and start with the
    area they belong to: ``status.driver.init_order``, ``features.VERSION_1.accepted``.
    """

    rule: str
    level: Level
    citation: Citation
    summary: str

    def violation(self, detail: str) -> Violation:
        return Violation(self.rule, self.level, self.citation, f"{self.summary}: {detail}")


@dataclass(frozen=True)
class ErrnoRule:
    """A rule whose breach a conforming target answers with one errno.

    Rules are data so that the conformance suite can list them, and so that a failure names
    the rule it enforces. :meth:`fail` builds the :class:`ModelErrno` to raise. An interface
    that must answer with this errno has no latitude, so the level is always MUST.
    """

    rule: str
    errno: int
    citation: Citation
    summary: str

    @property
    def level(self) -> Level:
        return Level.MUST

    def fail(self, detail: str) -> ModelErrno:
        return ModelErrno(self.errno, self.rule, self.citation, f"{self.summary}: {detail}")


class SpecError(Exception):
    """Base of the model's own typed errors (misuse of the model, not device outcomes)."""


class ModelErrno(SpecError):
    """The error a conforming device or interface must answer with, and the rule behind it.

    The model raises this where the target must fail an operation; the conformance suite
    compares ``errno`` with the ``OSError.errno`` the target gave.
    """

    def __init__(self, errno: int, rule: str, citation: Citation, message: str) -> None:
        super().__init__(f"errno {errno} ({rule}): {message} [{citation}]")
        self.errno = errno
        self.rule = rule
        self.citation = citation
        self.message = message
