"""Shim: Nova loads compute drivers only as nova.virt.<compute_driver>.

With `[DEFAULT] compute_driver = cloudlet.CloudletDriver` Nova imports this module; the driver
lives in the cloudlet_nova package. Shipped alone by cloudlet's packaging (no nova/__init__.py
of ours), so none of Nova's own files are shadowed.
"""

from cloudlet_nova.driver import CloudletDriver

__all__ = ["CloudletDriver"]
