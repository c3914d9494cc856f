"""cloudlet: VM synthesis from a base VM and a deduplicated disk + memory overlay."""

__version__ = "0.1.0"
