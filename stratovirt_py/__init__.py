"""stratovirt-py: a StratoVirt-compatible KVM microVM monitor with fast warm start."""

__version__ = "0.1.0"
