"""The registry side of gapkit: serve a bundle (or any image archive or layout) as a read-only
OCI registry, and push images into the registry a site already runs.

Import the submodules (`gapkit.registry.server`, …) directly: this package imports nothing,
so the CLI starts fast.
"""
