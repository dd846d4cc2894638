"""cffi API-mode build of ``privs.c``: dropping capabilities on every thread of the VMM."""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "privs.c")) as f:
    SOURCE = f.read()

ffibuilder = FFI()
ffibuilder.cdef("""
int sv_drop_privs_all(uint64_t keep, int signo, int timeout_ms);
""")
ffibuilder.set_source("stratovirt_py._privs_cffi", SOURCE, extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
