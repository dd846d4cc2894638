from setuptools import setup

setup(cffi_modules=["stratovirt_py/kvm/_build.py:ffibuilder"])
