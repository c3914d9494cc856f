"""`conn.cloudlet`: every operation of cloudlet-api (docs/api-ref.md)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from openstack import exceptions, proxy

from cloudlet.overlay.reader import OverlayReader
from cloudletclient.sdk.resources import Base, Overlay, Synthesis, Task

MICROVERSION = "1.0"
PACKAGE = "application/octet-stream"
CHUNK = 1 << 20
R = TypeVar("R", Base, Overlay)


class _ProgressFile:
    """A file an upload reads, reporting bytes sent; len() keeps the upload non-chunked."""

    def __init__(self, f: BinaryIO, size: int, progress: Callable[[int, int], None]) -> None:
        self._f, self._size, self._done, self._progress = f, size, 0, progress

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._done += len(data)
        self._progress(self._done, self._size)
        return data


@dataclass
class Download:
    """A streamed download: its length (0 if the service did not say) and its chunks; the
    connection is released once `chunks` is exhausted or closed."""

    size: int
    chunks: Iterator[bytes]


def _chunks(resp: Any) -> Iterator[bytes]:
    with resp:
        yield from resp.iter_content(CHUNK)


class Proxy(proxy.Proxy):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("default_microversion", MICROVERSION)
        super().__init__(*args, **kwargs)

    def request(self, url: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Every call; an error answer raises with the service's own message."""
        kwargs["raise_exc"] = False
        response = super().request(url, method, *args, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json()["errors"][0]["detail"]
            except (ValueError, KeyError, IndexError, TypeError):
                detail = None
            exceptions.raise_from_response(response, error_message=detail)
        return response

    # -- lookup by name or id ------------------------------------------------------------

    def _find_one(self, kind: type[R], name_or_id: str) -> R:
        try:
            return self._get(kind, name_or_id)
        except exceptions.NotFoundException:
            pass
        found = [r for r in self._list(kind) if r.name == name_or_id]
        noun = kind.__name__.lower()
        if not found:
            raise exceptions.NotFoundException(f"no {noun} with id or name {name_or_id!r}")
        if len(found) > 1:
            raise exceptions.DuplicateResource(
                f"{len(found)} {noun}s are named {name_or_id!r}: give the id"
            )
        return found[0]

    # -- bases ---------------------------------------------------------------------------

    def bases(self, **query: Any) -> Iterator[Base]:
        return self._list(Base, **query)

    def get_base(self, base: str | Base) -> Base:
        return self._get(Base, base)

    def find_base(self, name_or_id: str) -> Base:
        return self._find_one(Base, name_or_id)

    def delete_base(self, base: str | Base) -> None:
        self._delete(Base, base, ignore_missing=False)

    def export_base(
        self, base: str | Base, output: BinaryIO, progress: Callable[[int, int], None] | None = None
    ) -> int:
        """Stream the base as a package (.cbase) into `output`; returns the bytes written."""
        return self._stream_to(f"/bases/{resource_id(base)}/package", output, progress)

    def open_base_package(self, base: str | Base) -> Download:
        """The base's package (.cbase) as a stream, for a caller relaying it (a web UI)."""
        return self._download(f"/bases/{resource_id(base)}/package")

    def _download(self, url: str) -> Download:
        resp = self.get(url, stream=True)
        return Download(int(resp.headers.get("Content-Length") or 0), _chunks(resp))

    def _stream_to(
        self, url: str, output: BinaryIO, progress: Callable[[int, int], None] | None
    ) -> int:
        download = self._download(url)
        done = 0
        for chunk in download.chunks:
            output.write(chunk)
            done += len(chunk)
            if progress:
                progress(done, download.size)
        return done

    def import_base(
        self,
        package: BinaryIO | None = None,
        size: int | None = None,
        *,
        url: str | None = None,
        name: str | None = None,
        public: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> Task:
        """Import a package: the open file `package` (`size` bytes), or fetched from `url`."""
        if (package is None) == (url is None):
            raise ValueError("give a package file or a URL, not both")
        if url is not None:
            body: dict[str, Any] = {"url": url, "public": public}
            if name:
                body["name"] = name
            resp = self.post("/bases/import", json=body)
        else:
            assert size is not None
            params = {"public": "true" if public else "false"}
            if name:
                params["name"] = name
            data = _ProgressFile(package, size, progress) if progress else package
            resp = self.post(
                "/bases/import", data=data, params=params, headers={"Content-Type": PACKAGE}
            )
        return Task.existing(**resp.json()["task"])

    def create_base(self, server_id: str, name: str, public: bool = False) -> Task:
        body = {"server_id": server_id, "name": name, "public": public}
        return Task.existing(**self.post("/bases", json=body).json()["task"])

    # -- overlays ------------------------------------------------------------------------

    def overlays(self, **query: Any) -> Iterator[Overlay]:
        return self._list(Overlay, **query)

    def get_overlay(self, overlay: str | Overlay) -> Overlay:
        return self._get(Overlay, overlay)

    def find_overlay(self, name_or_id: str) -> Overlay:
        return self._find_one(Overlay, name_or_id)

    def delete_overlay(self, overlay: str | Overlay) -> None:
        self._delete(Overlay, overlay, ignore_missing=False)

    def create_overlay(
        self,
        server_id: str,
        name: str,
        after: str = "resume",
        codec: str | None = None,
        public: bool = False,
    ) -> Task:
        body: dict[str, Any] = {
            "server_id": server_id,
            "name": name,
            "after": after,
            "public": public,
        }
        if codec:
            body["codec"] = codec
        return Task.existing(**self.post("/overlays", json=body).json()["task"])

    def download_overlay(
        self,
        overlay: str | Overlay,
        output: BinaryIO,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Stream the overlay file into `output`; returns the bytes written."""
        return self._stream_to(f"/overlays/{resource_id(overlay)}/file", output, progress)

    def open_overlay_file(self, overlay: str | Overlay) -> Download:
        """The overlay file as a stream, for a caller relaying it (a web UI)."""
        return self._download(f"/overlays/{resource_id(overlay)}/file")

    def overlay_summary(self, overlay: str | Overlay) -> dict[str, Any]:
        """What the overlay holds (image sizes, chunks by kind, frames, codec, access order),
        from its verified header, manifest and chunk map: reads the head of the file only,
        the frames are never downloaded. Raises the engine's overlay errors for a bad file."""
        ident = resource_id(overlay)
        resp = self.get(f"/overlays/{ident}/file", stream=True)
        with resp:
            resp.raw.decode_content = True
            with OverlayReader.open(resp.raw, name=f"overlay {ident}") as reader:
                return reader.summary()

    # -- syntheses -----------------------------------------------------------------------

    def synthesize(
        self,
        overlay_id: str,
        name: str,
        flavor_id: str,
        network_id: str | None = None,
        network: str | None = None,
    ) -> Synthesis:
        """network_id: a network to attach; or network "none" (no network) / "auto"."""
        body = {"overlay_id": overlay_id, "name": name, "flavor_id": flavor_id}
        if network_id:
            body["network_id"] = network_id
        if network:
            body["network"] = network
        return Synthesis.existing(**self.post("/syntheses", json=body).json()["synthesis"])

    def syntheses(self) -> Iterator[Synthesis]:
        return self._list(Synthesis)

    def get_synthesis(self, synthesis: str | Synthesis) -> Synthesis:
        return self._get(Synthesis, synthesis)

    # -- tasks ---------------------------------------------------------------------------

    def tasks(self, **query: Any) -> Iterator[Task]:
        return self._list(Task, **query)

    def get_task(self, task: str | Task) -> Task:
        return self._get(Task, task)

    def wait_for_task(
        self,
        task: str | Task,
        timeout: float = 3600,
        interval: float = 2.0,
        callback: Callable[[Task], None] | None = None,
    ) -> Task:
        """Poll until the task ends; returns it if it succeeded, raises ResourceFailure (with
        the service's reason) if it failed and ResourceTimeout past `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.get_task(task)
            if callback:
                callback(current)
            if current.state == "succeeded":
                return current
            if current.state == "failed":
                raise exceptions.ResourceFailure(
                    f"task {current.id} ({current.kind}) failed: {current.error}"
                )
            if time.monotonic() >= deadline:
                raise exceptions.ResourceTimeout(
                    f"task {current.id} still {current.stage} after {timeout:.0f} s"
                )
            time.sleep(interval)


def resource_id(value: str | Any) -> str:
    return value if isinstance(value, str) else value.id
