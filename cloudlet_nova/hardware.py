"""The CPU a base VM's memory snapshot was saved on, and whether this host can give it back.

A memory snapshot holds a running kernel that probed its CPU at boot: resumed on a CPU lacking
a feature it uses, the guest faults (Elijah's users' commonest complaint). Nova's default
cpu_mode (host-model) gives every host a different CPU, so a base records the *named* model it
was saved with, plus its feature flags, in QEMU's `-cpu` syntax (`VMConfig.cpu`, e.g.
"Westmere" or "Nehalem,+pcid,-vme"), and:

- every domain resumed from it gets exactly that model and those features (`CpuPin.guest_cpu`:
  `fallback='forbid'`, `check='partial'`), whatever [libvirt] cpu_mode says;
- a host that cannot provide it is refused before anything is downloaded (`HostCPU.check`,
  libvirt's virConnectCompareHypervisorCPU for the configured virt_type: a CPU emulated by TCG
  and one passed through by KVM differ);
- hosts report `CUSTOM_CLOUDLET_CPU_<MODEL>` for every model their hypervisor can run, and a
  base's images require that trait, so the scheduler only picks hosts that can.

A base that recorded no named model (Nova bases made before pinning record the CPU *mode*, e.g.
"host-model") keeps Nova's CPU configuration, as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

from nova.virt.libvirt import config as vconfig

from cloudlet_nova import errors

CPU_PROPERTY = "cloudlet_cpu"  # image property announcing the base's CPU before any download
TRAIT_PREFIX = "CUSTOM_CLOUDLET_CPU_"
# what VMConfig.cpu holds when no model is pinned: libvirt's CPU modes (Nova bases recorded
# the mode before pinning) and QEMU's host-dependent pseudo-models
UNPINNED = frozenset(
    {"default", "none", "custom", "host-model", "host-passthrough", "maximum", "host", "max"}
)
_POLICY = {"+": "require", "-": "disable"}
# VIR_CONNECT_COMPARE_CPU_FAIL_INCOMPATIBLE: an error naming the missing features instead of a
# bare "incompatible" (Nova's fakelibvirt does not define the constant)
_FAIL_INCOMPATIBLE = 1


@dataclass(frozen=True)
class CpuPin:
    """A named CPU model and the feature flags added to (+) or removed from (-) it."""

    model: str
    features: tuple[tuple[str, str], ...] = ()  # (libvirt/QEMU feature name, require|disable)

    @classmethod
    def parse(cls, cpu: str | None) -> CpuPin | None:
        """The pin a VMConfig.cpu records ("Model[,+flag][,-flag]..."), or None when it names no
        model. Raises ValueError for flags written otherwise."""
        if not cpu:
            return None
        model, *flags = (part.strip() for part in cpu.split(","))
        if model in UNPINNED:
            return None
        features = []
        for flag in flags:
            if flag[:1] not in _POLICY or len(flag) < 2:
                raise ValueError(f"CPU {cpu!r}: feature flag {flag!r} is not +name or -name")
            features.append((flag[1:], _POLICY[flag[0]]))
        return cls(model, tuple(features))

    @classmethod
    def from_domain(cls, cpu: ElementTree.Element | None) -> CpuPin | None:
        """The pin of a running domain's live `<cpu>` (libvirt expands host-model into the
        model and features the guest really got), or None when it names no model."""
        if cpu is None or not (model := (cpu.findtext("model") or "").strip()):
            return None
        features = tuple(
            (f.get("name", ""), f.get("policy", "require"))
            for f in cpu.findall("feature")
            if f.get("policy", "require") in _POLICY.values()
        )
        return cls(model, features)

    def spec(self) -> str:
        """As VMConfig.cpu records it (QEMU's -cpu syntax)."""
        flags = (("+" if policy == "require" else "-") + name for name, policy in self.features)
        return ",".join((self.model, *flags))

    @property
    def trait(self) -> str:
        return model_trait(self.model)

    def guest_cpu(self, nova_cpu: Any = None) -> vconfig.LibvirtConfigGuestCPU:
        """Nova's guest CPU config with exactly this model and these features; topology, NUMA
        cells and physical address bits of `nova_cpu` (what Nova computed) are kept."""
        cpu = _PinnedGuestCPU()
        if nova_cpu is not None:
            cpu.sockets, cpu.cores, cpu.threads = nova_cpu.sockets, nova_cpu.cores, nova_cpu.threads
            cpu.numa, cpu.maxphysaddr = nova_cpu.numa, nova_cpu.maxphysaddr
        cpu.mode, cpu.match, cpu.model = "custom", "exact", self.model
        cpu.features = {vconfig.LibvirtConfigGuestCPUFeature(n, p) for n, p in self.features}
        return cpu


class _PinnedGuestCPU(vconfig.LibvirtConfigGuestCPU):
    """Nova's guest CPU config cannot forbid libvirt's fallback to another model, which a pinned
    model needs. The check is 'partial' (libvirt refuses to start a model the host cannot
    provide), not 'full': QEMU adds features of its own to a named model (hypervisor, arat),
    identically wherever the model and machine type are the same, and 'full' refuses them."""

    def format_dom(self) -> Any:
        cpu = super().format_dom()
        cpu.set("check", "partial")
        model = cpu.find("model")
        if model is not None:
            model.set("fallback", "forbid")
        return cpu


def check_domain_cpu(image_id: str, base_id: str, domain_xml: str, cpu: str | None) -> None:
    """Refuse to restore a snapshot saved on pinned CPU `cpu` into a domain with another CPU.
    libvirt does not: it resumes a guest saved on one named model into a domain of another
    without a word (libvirt 9.0, QEMU 7.2), and the guest meets a CPU it never probed."""
    pin = CpuPin.parse(cpu)
    if pin is None:
        return
    got = CpuPin.from_domain(ElementTree.fromstring(domain_xml).find("cpu"))
    if got is None or (got.model, set(got.features)) != (pin.model, set(pin.features)):
        raise errors.RestoreRefused(
            image_id=image_id, base=base_id[:16],
            reason=f"its CPU is {got.spec() if got else 'not a named model'}, the snapshot was "
            f"saved on {pin.spec()}",
        )  # fmt: skip


def model_trait(model: str) -> str:
    """The placement trait of a CPU model ("Skylake-Client-IBRS" ->
    CUSTOM_CLOUDLET_CPU_SKYLAKE_CLIENT_IBRS)."""
    return TRAIT_PREFIX + re.sub(r"[^A-Z0-9]", "_", model.upper())


def image_properties(cpu: str | None) -> dict[str, str]:
    """Properties that announce a base's CPU on its images: the pin itself (checked by the
    host before any download) and the placement trait the scheduler requires for it."""
    pin = CpuPin.parse(cpu)
    if pin is None:
        return {}
    return {CPU_PROPERTY: pin.spec(), f"trait:{pin.trait}": "required"}


class HostCPU:
    """What CPUs this host's hypervisor can give a guest, asked of libvirt (`libvirt`: the
    module whose connection `conn` is, the real one or Nova's fakelibvirt)."""

    def __init__(self, libvirt: Any, conn: Any, virt_type: str, arch: str | None) -> None:
        self.libvirt = libvirt
        self.conn = conn
        self.virt_type = virt_type
        self.arch = arch

    def check(self, image_id: str, cpu: str | None) -> CpuPin | None:
        """The pin of `cpu` when this host can provide it; raises CpuModelUnavailable when it
        cannot, CloudletImageInvalid when `cpu` is malformed. None: nothing pinned."""
        try:
            pin = CpuPin.parse(cpu)
        except ValueError as e:
            raise errors.CloudletImageInvalid(image_id=image_id, reason=str(e)) from e
        if pin is None:
            return None
        xml = pin.guest_cpu().to_xml()
        try:
            result = self.conn.compareHypervisorCPU(
                None, self.arch, None, self.virt_type, xml,
                _FAIL_INCOMPATIBLE,
            )  # fmt: skip
        except self.libvirt.libvirtError as e:
            reason = e.get_error_message()
        else:
            if result != self.libvirt.VIR_CPU_COMPARE_INCOMPATIBLE:
                return pin
            reason = "libvirt: the CPU is incompatible with the host CPU"
        raise errors.CpuModelUnavailable(
            image_id=image_id, model=pin.model, virt_type=self.virt_type, reason=reason
        )

    def model_traits(self) -> set[str]:
        """A trait per CPU model the hypervisor marks usable, and the model of its host-model
        CPU (domain capabilities). The latter is often marked unusable as such (under TCG,
        host-model is "EPYC" with features added and removed), yet it is what every guest
        started with Nova's default cpu_mode runs on, so bases saved from those guests name it.
        A trait names a model only: the features a base adds are checked by `check`."""
        caps = ElementTree.fromstring(
            self.conn.getDomainCapabilities(None, self.arch, None, self.virt_type, 0)
        )
        models = caps.findall("./cpu/mode[@name='custom']/model[@usable='yes']")
        models += caps.findall("./cpu/mode[@name='host-model']/model")
        return {model_trait(m.text.strip()) for m in models if m.text}
