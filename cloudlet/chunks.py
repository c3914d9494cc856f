"""Chunk vocabulary shared by every stage: 4 KiB chunks, the two images, the dedup kinds."""

import enum

CHUNK_SIZE = 4096


class Target(enum.IntEnum):
    """Which image of a VM a chunk belongs to."""

    DISK = 0
    MEMORY = 1


class Kind(enum.IntEnum):
    """Where the content of a modified chunk comes from, in dedup order."""

    ZERO = 0  # all zero bytes
    BASE_MEMORY = 1  # same bytes as chunk `ref` of the base memory image
    BASE_DISK = 2  # same bytes as chunk `ref` of the base disk image
    SELF = 3  # same bytes as an earlier chunk of this overlay (in the file: its payload slot)
    NEW = 4  # payload stored in the overlay (payload slot `ref`)


def chunk_count(size: int) -> int:
    """Number of chunks covering `size` bytes (the last one may be partial)."""
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE
