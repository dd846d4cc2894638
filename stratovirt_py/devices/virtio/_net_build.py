"""cffi API-mode build of the virtio-net fast path (``net_dataplane.c``).

Built at install time like the KVM bindings; when it is missing (no compiler at install)
virtio-net moves every frame in Python, with the same results.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "net_dataplane.h")) as f:
    CDEF = f.read()
with open(os.path.join(HERE, "net_dataplane.c")) as f:
    SOURCE = f.read()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("stratovirt_py.devices.virtio._net_dataplane", SOURCE,
                      include_dirs=[HERE], extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
