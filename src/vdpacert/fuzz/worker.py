"""``python -m vdpacert.fuzz.worker NAME [libFuzzer flags...] CORPUS_DIR``: one fuzzer under atheris.

A process of its own because ``atheris.Fuzz()`` never returns: libFuzzer exits when its run is
over or at the first failing input. The fuzzer's module is imported inside
``atheris.instrument_imports`` so the code it drives (the vdpacert modules it imports first) reports
coverage; the package modules this worker needs itself were imported before and are not
instrumented, which costs nothing that matters (they only decode bytes).

Before re-raising a failing input's exception the worker prints one marker line with its
classification (:data:`~vdpacert.fuzz.engine.CRASH_MARKER`), so the engine needs no traceback
parsing to tell a broken invariant from a crash; and it prints the monotonic time just before
libFuzzer starts (:data:`~vdpacert.fuzz.engine.START_MARKER`) so the fuzzing time excludes setup.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence

from vdpacert.fuzz.engine import CRASH_MARKER, FUZZER_MODULES, START_MARKER, classify, load


def main(argv: Sequence[str]) -> None:
    if len(argv) < 2:
        print("usage: python -m vdpacert.fuzz.worker NAME [libFuzzer flags...] CORPUS_DIR", file=sys.stderr)
        raise SystemExit(2)
    import atheris  # type: ignore[import-untyped, unused-ignore]  # only here: the package imports without it

    name = argv[1]
    module = FUZZER_MODULES.get(name, name).partition(":")[0]
    with atheris.instrument_imports(include=["vdpacert", module]):
        fuzzer = load(name)
    if fuzzer.setup is not None:
        fuzzer.setup()
    one_input = fuzzer.one_input

    def test_one_input(data: bytes) -> None:
        try:
            one_input(data)
        except Exception as error:
            kind, message = classify(error)
            print(CRASH_MARKER + json.dumps({"kind": kind, "message": message}), file=sys.stderr, flush=True)
            raise

    atheris.Setup([argv[0], *argv[2:]], test_one_input)
    print(f"{START_MARKER}{time.monotonic()!r}", file=sys.stderr, flush=True)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
