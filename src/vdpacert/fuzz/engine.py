"""Runs the fuzzers: coverage-guided under atheris (libFuzzer) in a subprocess, or a seeded in-process mutator.

Why two engines. atheris is the one that reaches the 10-million-execution goal with coverage
feedback: libFuzzer's mutators, corpus minimisation and comparison tracing over instrumented
Python code (``atheris.instrument_imports``). But ``atheris.Fuzz()`` ends the process when it is
done, so it runs in a subprocess (:mod:`vdpacert.fuzz.worker`) whose output the engine reads back:
the execution count from libFuzzer's final statistics, crashes from its ``crash-*`` artifacts.
Under the sanitizer build (gcc's libasan preloaded) atheris still runs, but libasan then provides
the coverage callbacks and atheris's coverage is lost (it says so), so there the dependency-free
``mutate`` engine is the honest choice: deterministic for a seed, in-process, no coverage, the
same AFL-style havoc mutations over the same corpus. ``auto`` picks atheris when it imports and
libasan is not preloaded.

Both stop at the first failing input (libFuzzer does), write it to the work directory, and report
it as a :class:`Crash`: ``invariant`` when the fuzzer raised
:class:`~vdpacert.fuzz.base.InvariantBroken`, ``crash`` for any other exception. The shipped
corpus is never written: atheris gets a copy in the work directory.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from vdpacert.fuzz.base import Fuzzer, InvariantBroken

__all__ = [
    "ENGINES", "FUZZER_MODULES", "Crash", "FuzzError", "FuzzStats", "UnknownFuzzer", "available", "classify",
    "corpus", "corpus_dir", "load", "mutate_run", "prepare", "reproduce", "resolve_engine", "run",
]

#: Every fuzzer by name, and the module whose ``FUZZER`` it is.
FUZZER_MODULES: Final[dict[str, str]] = {
    "rings": "vdpacert.fuzz.rings",
    "iotlb": "vdpacert.fuzz.iotlb",
    "ioctls": "vdpacert.fuzz.ioctls",
    "state": "vdpacert.fuzz.state",
}
ENGINES: Final = ("auto", "atheris", "mutate")
#: libFuzzer's default, kept for the mutate engine too: every fuzzer decodes with ByteReader, which reads
#: zeros past the end, so longer inputs only add bytes nobody reads.
MAX_LEN: Final = 4096
#: A line the worker prints before re-raising a failing input's exception: the classification, as JSON.
CRASH_MARKER: Final = "vdpacert-fuzz-crash: "
#: A line the worker prints just before libFuzzer starts: time.monotonic() then (CLOCK_MONOTONIC, system-wide).
START_MARKER: Final = "vdpacert-fuzz-start: "

Kind = Literal["invariant", "crash"]


class UnknownFuzzer(LookupError):
    """A fuzzer name that is not in :data:`FUZZER_MODULES` (nor a ``module:ATTR`` spec)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown fuzzer {name!r}: the fuzzers are {', '.join(FUZZER_MODULES)}")
        self.name = name


class FuzzError(RuntimeError):
    """The engine itself failed (the atheris worker did not start, printed no statistics): not a finding."""


@dataclass(frozen=True)
class Crash:
    """One failing input: ``kind`` says whether an invariant broke or something else escaped."""

    fuzzer: str
    kind: Kind
    message: str
    input_path: Path | None

    @property
    def reproducer(self) -> str:
        """The command that runs the failing input again."""
        where = self.input_path if self.input_path is not None else "FILE"
        return f"vdpacert fuzz {self.fuzzer} --reproduce {where}"

    def to_json(self) -> dict[str, Any]:
        return {"fuzzer": self.fuzzer, "kind": self.kind, "message": self.message,
                "input_path": None if self.input_path is None else str(self.input_path),
                "reproducer": self.reproducer}


@dataclass
class FuzzStats:
    """What one run did: ``seconds`` is the fuzzing time, without process start and ``setup``."""

    name: str
    engine: str
    executions: int
    seconds: float
    crashes: list[Crash] = field(default_factory=list)

    @property
    def exec_per_second(self) -> float:
        return self.executions / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "engine": self.engine, "executions": self.executions,
                "seconds": round(self.seconds, 3), "exec_per_second": round(self.exec_per_second, 1),
                "crashes": [crash.to_json() for crash in self.crashes]}


# ----- finding fuzzers and their corpora ------------------------------------------------------------

def _module_of(name: str) -> tuple[str, str]:
    """(module, attribute) of a fuzzer name; ``module:ATTR`` reaches fuzzers outside the package (tests' toys)."""
    spec = FUZZER_MODULES.get(name, name if ":" in name else None)
    if spec is None:
        raise UnknownFuzzer(name)
    module, _, attr = spec.partition(":")
    return module, attr or "FUZZER"


def load(name: str) -> Fuzzer:
    """The fuzzer called ``name`` (a key of :data:`FUZZER_MODULES`, or ``module:ATTR``).

    UnknownFuzzer for a name that is neither; ImportError when its module is not there (yet); only
    that module is imported, so a missing or broken fuzzer never stops the others.
    """
    module_name, attr = _module_of(name)
    module = importlib.import_module(module_name)
    fuzzer = getattr(module, attr, None)
    if not isinstance(fuzzer, Fuzzer):
        raise TypeError(f"{module_name}.{attr} is not a vdpacert.fuzz.base.Fuzzer")
    return fuzzer


def available() -> list[str]:
    """The names in :data:`FUZZER_MODULES` whose module exists (importable or not: a broken one must show)."""
    return [name for name in FUZZER_MODULES if importlib.util.find_spec(_module_of(name)[0]) is not None]


def corpus_dir(name: str) -> Path:
    """The shipped corpus of fuzzer ``name``: the package's ``corpus/<name>/`` folder (it may not exist)."""
    return Path(__file__).resolve().parent / "corpus" / name


def corpus(name: str, fuzzer: Fuzzer | None = None) -> list[bytes]:
    """The fuzzer's seeds, then every file of its shipped corpus (sorted by file name)."""
    fuzzer = load(name) if fuzzer is None else fuzzer
    inputs = [bytes(seed) for seed in fuzzer.seeds()]
    folder = corpus_dir(name)
    if folder.is_dir():
        inputs += [path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()]
    return inputs


_prepared: set[str] = set()


def prepare(fuzzer: Fuzzer) -> None:
    """Run ``fuzzer.setup`` once in this process (later calls do nothing)."""
    if fuzzer.name in _prepared:
        return
    if fuzzer.setup is not None:
        fuzzer.setup()
    _prepared.add(fuzzer.name)


def classify(error: BaseException) -> tuple[Kind, str]:
    """``invariant`` for InvariantBroken, ``crash`` for anything else; and the message to report."""
    if isinstance(error, InvariantBroken):
        return "invariant", str(error)
    return "crash", f"{type(error).__name__}: {error}"


def reproduce(name: str, data: bytes) -> Crash | None:
    """Run ``data`` once through fuzzer ``name``: the Crash it causes, or None when every invariant held."""
    fuzzer = load(name)
    prepare(fuzzer)
    try:
        fuzzer.one_input(data)
    except Exception as error:
        kind, message = classify(error)
        return Crash(name, kind, message, None)
    return None


def asan_preloaded() -> bool:
    """True under the sanitizer build's runtime (gcc's libasan in LD_PRELOAD), where atheris sees no coverage."""
    return "libasan" in os.environ.get("LD_PRELOAD", "")


def resolve_engine(engine: str) -> str:
    """``auto`` -> atheris when it imports and libasan is not preloaded (its coverage would be lost), else mutate.

    Asking for atheris under a preloaded libasan is refused (ValueError): libasan takes the coverage hooks, so
    the run would be a blind one presented as coverage-guided.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    if engine == "atheris" and asan_preloaded():
        raise ValueError("the atheris engine cannot follow coverage with gcc's libasan preloaded (it takes the "
                         "coverage hooks): use the mutate engine under the sanitizer build")
    if engine != "auto":
        return engine
    if asan_preloaded():
        return "mutate"
    return "atheris" if importlib.util.find_spec("atheris") is not None else "mutate"


def run(name: str, *, engine: str = "auto", seconds: float | None = None, runs: int | None = None, seed: int = 0,
        workdir: Path) -> FuzzStats:
    """Fuzz ``name`` until ``seconds`` pass or ``runs`` inputs ran (whichever comes first), or the first failure.

    Failing inputs are written under ``workdir/<name>/``; so is atheris's working corpus.
    """
    if seconds is None and runs is None:
        raise ValueError("give seconds or runs (or both): a fuzz run needs a bound")
    chosen = resolve_engine(engine)
    if chosen == "atheris":
        return _atheris_run(name, seconds=seconds, runs=runs, seed=seed, workdir=workdir)
    fuzzer = load(name)
    return mutate_run(fuzzer, seconds=seconds, runs=runs, seed=seed, workdir=workdir,
                      inputs=corpus(name, fuzzer), name=name)


def _output_dir(workdir: Path, name: str) -> Path:
    folder = Path(workdir) / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _save_input(folder: Path, data: bytes) -> Path:
    path = folder / f"crash-{hashlib.sha1(data).hexdigest()}"
    path.write_bytes(data)
    return path


# ----- the mutate engine ------------------------------------------------------------------------------

#: AFL's "interesting" values: the boundaries where length and index arithmetic goes wrong.
INTERESTING: Final = ((1, 0x00), (1, 0x01), (1, 0x7F), (1, 0x80), (1, 0xFF), (2, 0xFFFF), (2, 0x8000),
                      (2, 0x7FFF), (4, 0xFFFFFFFF), (4, 0x80000000), (4, 0x7FFFFFFF), (8, 0xFFFFFFFFFFFFFFFF))


class Mutator:
    """Havoc-style mutations of byte strings, all drawn from one seeded ``random.Random`` (deterministic)."""

    def __init__(self, seed: int, pool: Sequence[bytes], max_len: int = MAX_LEN) -> None:
        self.rng = random.Random(seed)
        self.pool = [bytes(item) for item in pool] or [b""]
        self.max_len = max_len

    def next_input(self) -> bytes:
        """A mutant of a pool entry: one to eight stacked mutations, as AFL's havoc stage stacks them."""
        data = bytearray(self.rng.choice(self.pool))
        for _ in range(1 << self.rng.randrange(4)):
            self.mutate(data)
        return bytes(data[:self.max_len])

    def mutate(self, data: bytearray) -> None:
        rng = self.rng
        operation = rng.randrange(10)
        if not data and operation not in (4, 7):
            operation = 4  # nothing to change in an empty input: grow it
        if operation == 0:  # flip one bit
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif operation == 1:  # an interesting value, little- or big-endian
            size, value = rng.choice(INTERESTING)
            at = rng.randrange(len(data))
            data[at:at + size] = value.to_bytes(size, rng.choice(("little", "big")))
        elif operation == 2:  # a random byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif operation == 3:  # small arithmetic on one byte
            at = rng.randrange(len(data))
            data[at] = (data[at] + rng.choice((-1, 1)) * rng.randint(1, 35)) & 0xFF
        elif operation == 4:  # insert random bytes, or one byte repeated
            at = rng.randint(0, len(data))
            count = rng.randint(1, 16)
            data[at:at] = bytes([rng.randrange(256)]) * count if rng.randrange(2) else rng.randbytes(count)
        elif operation == 5:  # delete a chunk
            at = rng.randrange(len(data))
            del data[at:at + rng.randint(1, 16)]
        elif operation == 6:  # duplicate a chunk somewhere else
            at = rng.randrange(len(data))
            chunk = data[at:at + rng.randint(1, 16)]
            to = rng.randint(0, len(data))
            data[to:to] = chunk
        elif operation == 7:  # splice: a prefix of this input, a suffix of another
            other = rng.choice(self.pool)
            cut = rng.randint(0, len(data))
            data[cut:] = other[rng.randint(0, len(other)):] if other else b""
        elif operation == 8:  # truncate
            del data[rng.randrange(len(data)):]
        else:  # overwrite a chunk with a copy of another chunk of the same input
            at, to = rng.randrange(len(data)), rng.randrange(len(data))
            chunk = data[at:at + rng.randint(1, 8)]
            data[to:to + len(chunk)] = chunk


def mutate_run(fuzzer: Fuzzer, *, seconds: float | None = None, runs: int | None = None, seed: int = 0,
               workdir: Path, inputs: Sequence[bytes] | None = None, name: str | None = None) -> FuzzStats:
    """The mutate engine over ``fuzzer`` (in this process): replay ``inputs`` (default: its seeds), then mutants.

    Executions count every input run, the replayed ones too (libFuzzer counts them as well).
    """
    if seconds is None and runs is None:
        raise ValueError("give seconds or runs (or both): a fuzz run needs a bound")
    label = fuzzer.name if name is None else name
    prepare(fuzzer)
    pool = [bytes(item) for item in (fuzzer.seeds() if inputs is None else inputs)]
    mutator = Mutator(seed, pool)
    limit = math.inf if runs is None else runs
    deadline = math.inf if seconds is None else seconds
    executions = 0
    crashes: list[Crash] = []
    started = time.monotonic()
    while executions < limit and time.monotonic() - started < deadline:
        data = pool[executions] if executions < len(pool) else mutator.next_input()
        executions += 1
        try:
            fuzzer.one_input(data)
        except Exception as error:
            kind, message = classify(error)
            crashes.append(Crash(label, kind, message, _save_input(_output_dir(workdir, label), data)))
            break
    return FuzzStats(label, "mutate", executions, time.monotonic() - started, crashes)


# ----- the atheris engine (a subprocess) -----------------------------------------------------------------

_EXECUTED = re.compile(r"^stat::number_of_executed_units:\s*(\d+)", re.MULTILINE)
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second", re.MULTILINE)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_UNCAUGHT = re.compile(r"=== Uncaught Python exception: ===\n(?P<body>.*?)(?:\n\n|\n==\d+==)", re.DOTALL)


def _libfuzzer_seed(seed: int) -> int:
    # libFuzzer takes -seed=0 as "pick one at random": shift by one so every seed, 0 included, is reproducible.
    return seed % 0xFFFFFFFF + 1


def _worker_env() -> dict[str, str]:
    """The parent's environment with its sys.path, so the worker imports exactly what this process does."""
    env = dict(os.environ)
    paths = [p for p in sys.path if p]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _atheris_run(name: str, *, seconds: float | None, runs: int | None, seed: int, workdir: Path) -> FuzzStats:
    fuzzer = load(name)  # fail here, with a clear error, rather than in the worker
    folder = _output_dir(workdir, name)
    work_corpus = folder / "corpus"
    if work_corpus.exists():
        shutil.rmtree(work_corpus)
    work_corpus.mkdir()
    for position, data in enumerate(corpus(name, fuzzer)):  # seeds and shipped files, copied: never the repo's
        (work_corpus / f"seed-{position:04d}").write_bytes(data)
    log = folder / "libfuzzer.log"
    command = [sys.executable, "-m", "vdpacert.fuzz.worker", name, f"-seed={_libfuzzer_seed(seed)}",
               f"-artifact_prefix={folder}{os.sep}", "-print_final_stats=1", f"-max_len={MAX_LEN}",
               "-timeout=60", "-rss_limit_mb=4096"]
    if seconds is not None:
        command.append(f"-max_total_time={max(1, math.ceil(seconds))}")
    if runs is not None:
        command.append(f"-runs={runs}")
    command.append(str(work_corpus))
    before = {path.name for path in folder.iterdir()}
    with log.open("w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=_worker_env(), check=False)
    ended = time.monotonic()
    text = log.read_text(errors="replace")
    return FuzzStats(name, "atheris", _executions(text, log), _seconds(text, ended),
                     _atheris_crashes(name, text, folder, before, result.returncode))


def _executions(text: str, log: Path) -> int:
    found = _EXECUTED.findall(text) or _DONE.findall(text)
    if not found:
        tail = "\n".join(text.splitlines()[-15:])
        raise FuzzError(f"the atheris worker printed no libFuzzer statistics (log {log}):\n{tail}")
    last = found[-1]
    return int(last[0] if isinstance(last, tuple) else last)


def _seconds(text: str, ended: float) -> float:
    starts = [line[len(START_MARKER):] for line in text.splitlines() if line.startswith(START_MARKER)]
    if starts:
        return max(0.0, ended - float(starts[-1]))
    done = _DONE.findall(text)
    return float(done[-1][1]) if done else 0.0


def _atheris_crashes(name: str, text: str, folder: Path, before: set[str], returncode: int) -> list[Crash]:
    artifacts = [Path(path) for path in _ARTIFACT.findall(text)]
    artifacts += [path for path in sorted(folder.iterdir()) if path.name not in before
                  and path.name.split("-")[0] in ("crash", "timeout", "oom", "leak") and path not in artifacts]
    if not artifacts and returncode == 0:
        return []
    kind, message = _classify_output(text)
    path = artifacts[0] if artifacts else None
    if path is not None and not path.name.startswith("crash-"):
        kind, message = "crash", f"libFuzzer {path.name.split('-')[0]}: {message}"
    return [Crash(name, kind, message, path)]


def _classify_output(text: str) -> tuple[Kind, str]:
    """The worker's marker line when it printed one, else the last line of the Python traceback, else the tail."""
    for line in reversed(text.splitlines()):
        if line.startswith(CRASH_MARKER):
            record = json.loads(line[len(CRASH_MARKER):])
            kind: Kind = "invariant" if record["kind"] == "invariant" else "crash"
            return kind, str(record["message"])
    found = _UNCAUGHT.search(text)
    if found:
        last = found.group("body").strip().splitlines()[-1]
        return ("invariant" if "InvariantBroken" in last else "crash"), last
    tail = [line for line in text.splitlines() if line.strip()][-3:]
    return "crash", " / ".join(tail) or "the worker died without output"
