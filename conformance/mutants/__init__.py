"""The seeded-bug zoo: parent drivers built on the reference devices, each with one realistic bug.

The suite's own yardstick (issue 4, "Seeded-bug zoo"): a conformance run that passes a device
with one of these bugs has a hole. :mod:`.registry` names them all (``MUTANTS``, ``make``);
the bugs live in small modules by area: :mod:`.features`, :mod:`.status`, :mod:`.rings`,
:mod:`.suspend`, :mod:`.config`, :mod:`.iotlb`, :mod:`.dirty_log`, :mod:`.net`, :mod:`.blk`,
with :mod:`.guest` holding what a mutant needs to touch guest memory on its own.
"""
