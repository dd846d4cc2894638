"""cffi API-mode builds of the virtio fast paths (``blk_dataplane.c``, ``net_dataplane.c``).

Built at install time like the KVM bindings (setup.py names ``blk`` and ``net`` here);
when one is missing (no compiler at install) its device moves everything in Python,
with the same results.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def fast_path(name: str) -> FFI:
    """The builder of ``_<name>_dataplane`` from ``<name>_dataplane.h`` and ``.c``."""
    with open(os.path.join(HERE, f"{name}_dataplane.h")) as f:
        cdef = f.read()
    with open(os.path.join(HERE, f"{name}_dataplane.c")) as f:
        source = f.read()
    builder = FFI()
    builder.cdef(cdef)
    builder.set_source(f"stratovirt_py.devices.virtio._{name}_dataplane", source,
                       include_dirs=[HERE], extra_compile_args=["-O2", "-Wall"])
    return builder


blk = fast_path("blk")
net = fast_path("net")

if __name__ == "__main__":
    blk.compile(verbose=True)
    net.compile(verbose=True)
