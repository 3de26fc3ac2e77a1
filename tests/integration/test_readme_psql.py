"""The README's psql audit commands run as written against a migrated PostgreSQL database.

They are taken from the "Auditing the database" section of README.md at the repository
root and run in bash with only ``DATABASE_URL`` set (as the services are given it), so a
variable the text never defines, or a URL psql cannot read, fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Auditing the database"
SH_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_psql_script() -> str:
    """The README's psql block(s) of the audit section, as one shell script."""
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    blocks = [block for block in SH_BLOCK.findall(section) if re.search(r"^psql ", block, re.M)]
    assert blocks, f"no psql block in README section {SECTION!r}"
    return "\n".join(blocks)


def test_readme_has_psql_commands() -> None:
    script = readme_psql_script()

    assert len(re.findall(r"^psql ", script, re.MULTILINE)) >= 3


@pytest.mark.postgres
def test_readme_psql_commands_run_as_written(postgres_database: str) -> None:
    if shutil.which("psql") is None:
        pytest.skip("needs the psql client")
    # Nothing from the test's own environment may stand in for what the README defines.
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("PG") and name != "PSQL_URL"
    }
    environment["DATABASE_URL"] = postgres_database

    finished = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_psql_script()],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert finished.returncode == 0, finished.stderr
    assert finished.stderr == ""
    # Each query printed its header: the commands reached the database and its tables.
    # psql pads its columns to the widest value: compare with the padding folded.
    shown = " ".join(finished.stdout.split())
    assert "status | count" in shown
    assert "second | released" in shown
