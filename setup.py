from setuptools import setup

setup(cffi_modules=["stratovirt_py/kvm/_build.py:ffibuilder",
                     "stratovirt_py/devices/virtio/_blk_build.py:ffibuilder"])
