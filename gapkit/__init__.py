"""gapkit: carry a MicroK8s cluster across an air gap."""

__version__ = "0.1.0"
