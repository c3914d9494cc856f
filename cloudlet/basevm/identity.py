"""The base id: one content digest that names the same base VM on every machine.

An overlay records the id of its base; a cloudlet can only synthesize it over a base whose
contents hash to that id. The id must therefore depend on every byte the synthesized VM depends
on (disk, memory, device state, VM configuration, kernel) and on nothing local (name, path, time).

Encoding (also in docs/base-vm.md): the id is the lowercase hex sha256 of the UTF-8 bytes of

    {"config":C,"disk":D,"format":"cloudlet-base-v1","initrd":I,"kernel":K,"layout":L,"memory":M}

written exactly so: keys in this (sorted) order, no whitespace, every value a JSON string of 64
lowercase hex digits except `kernel`/`initrd`, which are `null` when absent. D and M are the
image digests (cloudlet.hashing.tree_digest of the 4 KiB chunk digests), L the sha256 of
memory.layout, K/I the sha256 of the kernel/initrd files and C the sha256 of the canonical JSON of
the VM configuration (see `canonical_json`).
"""

import hashlib
import json
import re
from typing import Any

from cloudlet.errors import BaseVMError

FORMAT_TAG = "cloudlet-base-v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def canonical_json(value: Any) -> bytes:
    """The one byte encoding of a JSON value that the id hashes.

    json.dumps with sorted keys, separators "," and ":", non-ASCII characters kept as UTF-8
    (ensure_ascii off), NaN/Infinity refused; encoded as UTF-8.
    """
    try:
        text = json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as e:
        raise BaseVMError(f"VM configuration is not plain JSON: {e}") from e
    return text.encode("utf-8")


def config_sha256(config: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(config)).hexdigest()


def is_base_id(text: str) -> bool:
    return bool(_HEX64.fullmatch(text))


def compute_base_id(
    disk_digest: str,
    memory_digest: str,
    layout_sha256: str,
    config: dict[str, Any],
    kernel_sha256: str | None,
    initrd_sha256: str | None,
) -> str:
    """The base id (64 hex digits) of a base VM from the digests of its parts."""
    if not isinstance(config, dict):
        raise BaseVMError(f"VM configuration must be a JSON object, not {type(config).__name__}")
    fields: dict[str, str | None] = {
        "disk": disk_digest,
        "memory": memory_digest,
        "layout": layout_sha256,
        "kernel": kernel_sha256,
        "initrd": initrd_sha256,
    }
    for key, value in fields.items():
        optional = key in ("kernel", "initrd")
        if value is None and optional:
            continue
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise BaseVMError(f"{key} digest {value!r} is not 64 lowercase hex digits")
    record = dict(fields, config=config_sha256(config), format=FORMAT_TAG)
    return hashlib.sha256(canonical_json(record)).hexdigest()
