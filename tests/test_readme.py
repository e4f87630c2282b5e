"""The README's two fresh-machine commands exist, and CI runs the test command exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command_after(marker: str) -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```sh\n(.+?)\n```", readme, re.S)
    assert match, f"README has no command block after <!-- {marker} -->"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command() -> None:
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert command_after("test-command") in ci_script.splitlines()


def test_main_job_installs_and_certifies_through_the_cli() -> None:
    main_job = command_after("main-job")
    assert "pip install ." in main_job
    assert ".venv/bin/vdpacert " in main_job
