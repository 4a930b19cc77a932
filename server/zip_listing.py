"""How many entries a zip archive lists, counted from its central directory one record at
a time, before `zipfile` reads the whole listing into memory (an object per entry)."""

from __future__ import annotations

import io
import struct
from typing import IO

# The records of the zip format (APPNOTE.TXT 4.3.12 to 4.3.16), as `zipfile` reads them.
_END = struct.Struct("<4s4H2LH")
_END_SIGNATURE = b"PK\x05\x06"
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_END64 = struct.Struct("<4sQ2H2L4Q")
_END64_SIGNATURE = b"PK\x06\x06"
_ENTRY = struct.Struct("<4s4B4HL2L5H2L")
_ENTRY_SIGNATURE = b"PK\x01\x02"
_MAX_COMMENT = 0xFFFF


def count_zip_entries(stream: IO[bytes], limit: int) -> int | None:
    """The number of entries in the central directory of the zip in `stream`, counting no
    further than `limit + 1`; None when the directory cannot be found (`zipfile` then says
    what is wrong)."""
    stream.seek(0, io.SEEK_END)
    size = stream.tell()
    tail_start = max(0, size - _END.size - _MAX_COMMENT)
    stream.seek(tail_start)
    tail = stream.read()
    at = tail.rfind(_END_SIGNATURE)
    if at < 0 or len(tail) - at < _END.size:
        return None
    end_offset = tail_start + at
    fields = _END.unpack_from(tail, at)
    directory_size, end_of_directory = fields[5], end_offset
    locator_offset = end_offset - _END64_LOCATOR.size
    if locator_offset >= _END64.size:
        stream.seek(locator_offset)
        locator = stream.read(_END64_LOCATOR.size)
        if locator.startswith(_END64_LOCATOR_SIGNATURE):
            end_of_directory = locator_offset - _END64.size
            stream.seek(end_of_directory)
            record = stream.read(_END64.size)
            if len(record) < _END64.size or not record.startswith(_END64_SIGNATURE):
                return None
            directory_size = _END64.unpack(record)[8]
    # Like `zipfile`: the directory ends where the end record starts (data may precede
    # the archive, as in self-extracting files).
    start = end_of_directory - directory_size
    if start < 0:
        return None
    stream.seek(start)
    count = 0
    read = 0
    while read < directory_size and count <= limit:
        header = stream.read(_ENTRY.size)
        if len(header) < _ENTRY.size or not header.startswith(_ENTRY_SIGNATURE):
            break
        fields = _ENTRY.unpack(header)
        skip = fields[12] + fields[13] + fields[14]  # name, extra field, comment
        stream.seek(skip, io.SEEK_CUR)
        read += _ENTRY.size + skip
        count += 1
    return count
