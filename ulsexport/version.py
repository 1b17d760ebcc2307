"""The package version, in one place (the manifests ulsexport writes record it)."""
__version__ = "0.1.0"
