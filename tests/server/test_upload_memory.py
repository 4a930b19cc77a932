"""Hostile archives do not amplify memory: the peak memory of parsing them, measured in a
fresh subprocess, stays far below what they unpack or list to (wide margins: the
machines are shared)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="measures peak memory with Linux's /proc"
)

MIB = 1 << 20
# What parsing one of these archives may add to the process's peak memory. Without the
# limits on declared sizes and listings it adds 500 MiB (the zero entries) and some
# 370 MiB (the listing).
BUDGET_MIB = 100

_MEASURE = """
import json, sys
from pathlib import Path
from server.errors import UploadError
from server.settings import ServerSettings
from server.uploads import UploadLimits, parse_archive
from PIL import Image

def peak_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

Image.init()  # the image plugins, loaded before the baseline
limits = UploadLimits.from_settings(ServerSettings())
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
before = peak_kib()
status = None
with open(sys.argv[1], "rb") as stream:
    try:
        parse_archive(stream, limits)
    except UploadError as error:
        status = error.status_code
print(json.dumps({"status": status, "peak_mib": (peak_kib() - before) / 1024}))
"""


def peak_parse(archive: Path, pythonpath: str | None = None) -> dict[str, float]:
    """Parse `archive` with the default settings in a new process: the HTTP status it was
    refused with (None: accepted) and the peak memory it added, in MiB."""
    env = {**os.environ, "PYTHONPATH": pythonpath or os.environ.get("PYTHONPATH", ".")}
    env = {k: v for k, v in env.items() if not k.startswith("DMC_MAX_")}
    done = subprocess.run(
        [sys.executable, "-P", "-c", _MEASURE, str(archive)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def zero_entries_zip(path: Path, entries: int = 2, size: int = 500 * MIB) -> Path:
    """A small zip (zeros compress about 1000:1) whose entries unpack to `size` bytes each."""
    zeros = bytes(MIB)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for index in range(entries):
            with archive.open(f"zeros/{index}.png", "w", force_zip64=True) as entry:
                for _ in range(size // MIB):
                    entry.write(zeros)
    return path


def many_entries_zip(path: Path, entries: int = 400_000) -> Path:
    """A zip listing `entries` empty files, written record by record (fast)."""
    local, central = [], []
    offset = 0
    for index in range(entries):
        name = f"c/{index}.png".encode()
        header = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0)
        local.append(header + name)
        central.append(
            struct.pack(
                "<4s4B4HL2L5H2L",
                *(b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, len(name)),
                *(0, 0, 0, 0, 0o100644 << 16, offset),
            )
            + name
        )
        offset += len(header) + len(name)
    directory = b"".join(central)
    end = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, entries & 0xFFFF, entries & 0xFFFF,
        len(directory), offset, 0,
    )  # fmt: skip
    if entries > 0xFFFF:  # zip64: the counts live in the zip64 end record
        end64 = struct.pack(
            "<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries,
            len(directory), offset,
        )  # fmt: skip
        locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, offset + len(directory), 1)
        end = end64 + locator + struct.pack(
            "<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0
        )  # fmt: skip
    path.write_bytes(b"".join(local) + directory + end)
    return path


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    return {
        "zeros": zero_entries_zip(folder / "zeros.zip"),
        "listing": many_entries_zip(folder / "listing.zip"),
    }


def test_the_hostile_archives_are_what_they_claim(archives: dict[str, Path]) -> None:
    assert archives["zeros"].stat().st_size < 5 * MIB
    with zipfile.ZipFile(archives["zeros"]) as archive:
        assert [i.file_size for i in archive.infolist()] == [500 * MIB] * 2
    with zipfile.ZipFile(archives["listing"]) as archive:
        assert len(archive.infolist()) == 400_000


@pytest.mark.parametrize("name", ["zeros", "listing"])
def test_a_hostile_archive_is_refused_within_a_memory_budget(
    archives: dict[str, Path], name: str
) -> None:
    result = peak_parse(archives[name])
    assert result["status"] == 413, result
    assert result["peak_mib"] < BUDGET_MIB, result
