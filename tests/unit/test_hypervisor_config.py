import json

import pytest

from cloudlet.errors import ConfigMismatch, HypervisorError
from cloudlet.hypervisor.config import VMConfig, resolve_machine
from cloudlet.hypervisor.qemu import guest_devices


def make(**kw) -> VMConfig:
    base = dict(
        machine="pc-i440fx-7.2",
        memory_mib=256,
        kernel_sha256="a" * 64,
        initrd_sha256="b" * 64,
        append="console=ttyS0",
    )
    base.update(kw)
    return VMConfig(**base)


def test_round_trip_through_json():
    cfg = make(vcpus=2, balloon=False)
    again = VMConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert hash(again) == hash(cfg)


def test_disk_boot_config_round_trips_with_no_kernel():
    cfg = VMConfig(machine="pc-i440fx-7.2", memory_mib=512)
    assert cfg.kernel_sha256 is None and cfg.append is None
    assert VMConfig.from_dict(cfg.to_dict()) == cfg


def test_from_dict_names_unknown_and_missing_keys():
    data = make().to_dict()
    data["gpu"] = "virgl"
    del data["cpu"]
    with pytest.raises(ConfigMismatch) as err:
        VMConfig.from_dict(data)
    assert "gpu" in str(err.value) and "cpu" in str(err.value)


def test_from_dict_rejects_bad_values():
    with pytest.raises(ConfigMismatch, match="memory_mib"):
        VMConfig.from_dict(make().to_dict() | {"memory_mib": 0})


def test_compatible_configs_pass():
    make().check_compatible(make())


def test_mismatch_names_each_field_with_both_values():
    saved = make()
    wanted = make(memory_mib=512, nic_model="virtio")
    with pytest.raises(ConfigMismatch) as err:
        saved.check_compatible(wanted)
    msg = str(err.value)
    assert "memory_mib: 256 != 512" in msg
    assert "nic_model: 'e1000' != 'virtio'" in msg
    assert "machine" not in msg.split("):", 1)[1]  # equal fields are not listed


def test_resolve_machine_turns_alias_into_versioned_type():
    concrete = resolve_machine("pc")
    assert concrete.startswith("pc-i440fx-")
    assert resolve_machine(concrete) == concrete


def test_resolve_machine_unknown_type_is_a_clear_error():
    with pytest.raises(HypervisorError, match="no machine type 'no-such-board'"):
        resolve_machine("no-such-board")


def test_display_is_guest_hardware(tmp_path):
    """A VGA card is part of the base's config: only a base created with it shows one."""
    from cloudlet.hypervisor.qemu import LaunchSpec, build_command

    def devices(display: str) -> list[str]:
        cfg = VMConfig(machine=resolve_machine("pc"), memory_mib=128, display=display)
        spec = LaunchSpec(
            config=cfg,
            disk=tmp_path / "d.raw",
            disk_format="raw",
            run_dir=tmp_path,
            vnc="127.0.0.1:5",
        )
        cmd = build_command(spec, tmp_path / "q.sock", tmp_path / "c.sock")
        return [cmd[i + 1] for i, a in enumerate(cmd) if a == "-device"]

    assert any(d.startswith("VGA,") for d in devices("std"))
    assert not any(d.startswith("VGA,") for d in devices("none"))
    with pytest.raises(ConfigMismatch, match="display"):
        VMConfig.from_dict(
            {**VMConfig(machine="pc-i440fx-7.2", memory_mib=1).to_dict(), "display": "cinema"}
        )


def test_a_base_without_network_needs_no_nic_device():
    """A Nova server booted with --nic none records nic_model "none" (cloudlet_nova.basevm):
    importing its base must not ask this host's QEMU for a device called "none"."""
    assert guest_devices(make(nic_model="none", balloon=False)) == ["virtio-blk-pci"]
    assert guest_devices(make(nic_model="virtio", balloon=True)) == [
        "virtio-net-pci", "virtio-blk-pci", "virtio-balloon-pci"]
