"""Native parts built at install time: the cffi KVM bindings and the ``stratovirt`` front end."""

import os
import subprocess

from distutils.command.build_scripts import build_scripts

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
FRONTEND_SRC = os.path.join("stratovirt_py", "frontend", "stratovirt.c")
FRONTEND = os.path.join("build", "frontend", "stratovirt")


def build_frontend() -> str:
    """Compile the front end; its fast path execs this tree's _start.py (an editable install)."""
    out = os.path.join(HERE, FRONTEND)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    start = os.path.join(HERE, "stratovirt_py", "_start.py")
    cc = os.environ.get("CC", "cc")
    subprocess.check_call([cc, "-O2", "-Wall", f'-DSV_START_PY="{start}"', "-o", out,
                           os.path.join(HERE, FRONTEND_SRC)])
    return FRONTEND


class BuildScripts(build_scripts):
    """Copy the front end as it is: it is a binary, not a script to rewrite."""

    def copy_scripts(self):
        self.mkpath(self.build_dir)
        outfiles = []
        for script in self.scripts:
            out = os.path.join(self.build_dir, os.path.basename(script))
            self.copy_file(script, out)
            os.chmod(out, 0o755)
            outfiles.append(out)
        return outfiles, outfiles


setup(cffi_modules=["stratovirt_py/kvm/_build.py:ffibuilder",
                     "stratovirt_py/devices/virtio/_fastpath_build.py:blk",
                     "stratovirt_py/devices/virtio/_fastpath_build.py:net",
                     "stratovirt_py/_privs_build.py:ffibuilder"],
      scripts=[build_frontend()],
      cmdclass={"build_scripts": BuildScripts})
