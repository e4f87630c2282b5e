"""The rule catalog: every rule has a stable unique id, a level and a citation."""

from __future__ import annotations

from vdpacert.model import rules
from vdpacert.model.spec import LinuxSource, Section


def test_ids_are_unique_and_well_formed() -> None:
    entries = rules.catalog()
    ids = [entry.rule for entry in entries]
    assert len(ids) == len(set(ids))
    for rule_id in ids:
        assert rules.RULE_ID.match(rule_id), rule_id


def test_every_rule_cites_a_section_or_linux_source() -> None:
    for entry in rules.catalog():
        citation = entry.citation
        if isinstance(citation, Section):
            assert citation.number and citation.number[0].isdigit(), entry
            assert citation.version in ("1.3", "1.4"), entry
        else:
            assert isinstance(citation, LinuxSource), entry
            assert citation.path.startswith(("drivers/", "include/uapi/", "include/linux/")), entry
        assert entry.summary, entry


def test_catalog_covers_every_table() -> None:
    sources = {entry.source for entry in rules.catalog()}
    assert {"features", "status", "chains", "notify", "iotlb", "vdpa_device", "vhost_vdpa"} <= sources
    known = rules.by_id()
    assert "net.MQ.requires" in known
    assert "status.driver.never_clears" in known
    assert "ring.bad_input.descriptor_loop" in known
