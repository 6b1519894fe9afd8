"""Read the central directory of a zip file: member names, methods, sizes and data offsets.

Only names and offsets are read, never member data, and every count and size is bounded
before anything is allocated. Zip64 records (which torch.save writes for large files) are
followed. Layouts from APPNOTE.TXT 6.3 of PKWARE:

    end of central directory (EOCD), 22 bytes + comment:
        u32 0x06054b50, u16 disk, u16 cd disk, u16 entries here, u16 entries,
        u32 cd size, u32 cd offset, u16 comment length
    zip64 EOCD locator, 20 bytes just before the EOCD:
        u32 0x07064b50, u32 disk, u64 zip64 EOCD offset, u32 disks
    zip64 EOCD: u32 0x06064b50, u64 record size, u16 made by, u16 needed, u32 disk,
        u32 cd disk, u64 entries here, u64 entries, u64 cd size, u64 cd offset
    central directory entry, 46 bytes + name + extra + comment:
        u32 0x02014b50, u16 made by, u16 needed, u16 flags, u16 method, u16 time, u16 date,
        u32 crc, u32 compressed size, u32 size, u16 name length, u16 extra length,
        u16 comment length, u16 disk, u16 internal attributes, u32 external attributes,
        u32 local header offset
    local header, 30 bytes + name + extra, then the member data:
        u32 0x04034b50, ..., u16 name length at 26, u16 extra length at 28
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cas.models.layout import ModelFormatError, ReadAt, Region, read_exact

ZIP_MAGIC = b"PK\x03\x04"
STORED = 0
MAX_CENTRAL_DIRECTORY_SIZE = 64 << 20
MAX_MEMBER_COUNT = 1_000_000
_EOCD = struct.Struct("<IHHHHIIH")
_LOCATOR = struct.Struct("<IIQI")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_ENTRY = struct.Struct("<IHHHHHHIIIHHHHHII")
_LOCAL_SIZE = 30
_MAX_COMMENT = 0xFFFF


@dataclass(frozen=True)
class ZipMember:
    """One member: its name, compression method and where its data lies in the file."""

    name: str
    method: int
    compressed_size: int
    size: int
    header_offset: int
    data_offset: int

    @property
    def data_end(self) -> int:
        """The offset one past the member's stored bytes."""
        return self.data_offset + self.compressed_size


@dataclass(frozen=True)
class ZipDirectory:
    """The members of a zip file and the byte ranges of its local headers and directory."""

    members: tuple[ZipMember, ...]
    header_regions: tuple[Region, ...]


def looks_like_zip(head: bytes) -> bool:
    """Return whether the first bytes of a file are a zip local header."""
    return head[:4] == ZIP_MAGIC


def read_zip_directory(read_at: ReadAt, file_size: int) -> ZipDirectory:
    """Read the central directory and every member's local header."""
    tail_size = min(file_size, _EOCD.size + _MAX_COMMENT + _LOCATOR.size)
    tail = read_exact(read_at, file_size - tail_size, tail_size, "zip end record")
    eocd_at = tail.rfind(b"PK\x05\x06")
    if eocd_at < 0 or eocd_at + _EOCD.size > len(tail):
        raise ModelFormatError("zip end of central directory record not found")
    eocd_offset = file_size - tail_size + eocd_at
    fields = _EOCD.unpack_from(tail, eocd_at)
    entry_count, cd_size, cd_offset = fields[4], fields[5], fields[6]
    if 0xFFFF in (entry_count,) or 0xFFFFFFFF in (cd_size, cd_offset):
        entry_count, cd_size, cd_offset = _read_zip64(read_at, eocd_offset, file_size)
    if cd_size > MAX_CENTRAL_DIRECTORY_SIZE or entry_count > MAX_MEMBER_COUNT:
        raise ModelFormatError(f"zip central directory claims {entry_count} members in {cd_size}")
    if cd_offset + cd_size > eocd_offset:
        raise ModelFormatError(
            f"zip central directory {cd_offset}..{cd_offset + cd_size} overlaps its end record"
        )
    directory = read_exact(read_at, cd_offset, cd_size, "zip central directory")
    members = _parse_entries(directory, entry_count)
    located = tuple(_locate(read_at, member, cd_offset) for member in members)
    headers = [Region(m.header_offset, m.data_offset - m.header_offset) for m in located]
    headers.append(Region(cd_offset, file_size - cd_offset))
    return ZipDirectory(located, tuple(headers))


def _read_zip64(read_at: ReadAt, eocd_offset: int, file_size: int) -> tuple[int, int, int]:
    if eocd_offset < _LOCATOR.size:
        raise ModelFormatError("zip64 end record locator is missing")
    locator = _LOCATOR.unpack(
        read_exact(read_at, eocd_offset - _LOCATOR.size, _LOCATOR.size, "zip64 locator")
    )
    if locator[0] != 0x07064B50:
        raise ModelFormatError("zip64 end record locator has a wrong signature")
    record_offset = locator[2]
    if record_offset + _EOCD64.size > eocd_offset:
        raise ModelFormatError(f"zip64 end record offset {record_offset} is out of range")
    record = _EOCD64.unpack(read_exact(read_at, record_offset, _EOCD64.size, "zip64 end record"))
    if record[0] != 0x06064B50:
        raise ModelFormatError("zip64 end record has a wrong signature")
    return record[7], record[8], record[9]


def _parse_entries(directory: bytes, entry_count: int) -> list[ZipMember]:
    members: list[ZipMember] = []
    position = 0
    for _ in range(entry_count):
        if position + _ENTRY.size > len(directory):
            raise ModelFormatError("zip central directory is truncated")
        fields = _ENTRY.unpack_from(directory, position)
        if fields[0] != 0x02014B50:
            raise ModelFormatError(f"zip central directory entry at {position} is invalid")
        name_size, extra_size, comment_size = fields[10], fields[11], fields[12]
        name_start = position + _ENTRY.size
        extra_start = name_start + name_size
        next_position = extra_start + extra_size + comment_size
        if next_position > len(directory):
            raise ModelFormatError("zip central directory entry runs past the directory")
        name = directory[name_start:extra_start].decode("utf-8", errors="replace")
        sizes = [fields[8], fields[9], fields[16]]
        _apply_zip64_extra(directory[extra_start : extra_start + extra_size], sizes)
        members.append(ZipMember(name, fields[4], sizes[0], sizes[1], sizes[2], 0))
        position = next_position
    return members


def _apply_zip64_extra(extra: bytes, sizes: list[int]) -> None:
    """Replace 0xFFFFFFFF sizes and offset (compressed, size, offset) by their zip64 values.

    The zip64 extra field lists the original size first, then the compressed size, then
    the offset, each only when its 32-bit field is 0xFFFFFFFF.
    """
    position = 0
    while position + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, position)
        body = extra[position + 4 : position + 4 + size]
        position += 4 + size
        if tag != 0x0001:
            continue
        cursor = 0
        for index in (1, 0, 2):
            if sizes[index] == 0xFFFFFFFF:
                if cursor + 8 > len(body):
                    raise ModelFormatError("zip64 extra field is truncated")
                (sizes[index],) = struct.unpack_from("<Q", body, cursor)
                cursor += 8
        return


def _locate(read_at: ReadAt, member: ZipMember, limit: int) -> ZipMember:
    """Read a member's local header to learn where its data starts."""
    if member.header_offset + _LOCAL_SIZE > limit:
        raise ModelFormatError(f"zip member {member.name!r}: local header is out of range")
    local = read_exact(read_at, member.header_offset, _LOCAL_SIZE, "zip local header")
    if local[:4] != ZIP_MAGIC:
        raise ModelFormatError(f"zip member {member.name!r}: local header signature is wrong")
    name_size, extra_size = struct.unpack_from("<HH", local, 26)
    data_offset = member.header_offset + _LOCAL_SIZE + name_size + extra_size
    data_end = data_offset + member.compressed_size
    if data_end > limit:
        raise ModelFormatError(
            f"zip member {member.name!r}: data {data_offset}..{data_end} runs into the "
            f"central directory at {limit}"
        )
    return ZipMember(
        member.name,
        member.method,
        member.compressed_size,
        member.size,
        member.header_offset,
        data_offset,
    )
