"""stratovirt-pool's settings: the YAML file, its errors, and that the pool obeys them."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stratovirt_py.errors import ConfigError
from stratovirt_py.pool import config

EXAMPLE = Path(__file__).resolve().parent.parent / "tools" / "systemd" / "pool.yaml.example"
POOL = os.path.join(os.path.dirname(sys.executable), "stratovirt-pool")


def test_the_shipped_example_is_valid_and_documents_the_defaults():
    cfg = config.load(str(EXAMPLE))
    default = config.PoolConfig()
    for key in config.PoolConfig.FIELDS:
        assert getattr(cfg, key) == getattr(default, key), key


@pytest.mark.parametrize("text, fragment", [
    ("spares: 2\nsparez: 3\n", "unknown setting 'sparez'"),
    ("spares: two\n", "'spares' must be int"),
    ("spares: 0\n", "'spares' must be positive"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("spares: [1\n", "is not valid YAML"),
])
def test_bad_settings_are_one_clear_error(tmp_path, text, fragment):
    f = tmp_path / "pool.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        config.load(str(f))
    r = subprocess.run([POOL, "--config", str(f), "--socket", str(tmp_path / "p.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and fragment in r.stderr and "Traceback" not in r.stderr


def test_a_missing_explicit_file_is_an_error_and_the_default_file_is_optional(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(str(tmp_path / "nope.yaml"))
    assert config.load(None).socket == config.DEFAULT_SOCKET or os.path.exists(config.DEFAULT_CONFIG)


def test_the_pool_keeps_as_many_spares_as_configured(tmp_path):
    f = tmp_path / "pool.yaml"
    f.write_text(f"socket: {tmp_path}/p.sock\nspares: 3\n")
    proc = subprocess.Popen([POOL, "--config", str(f)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stratovirt-pool: ready"
        assert os.path.exists(tmp_path / "p.sock")
        assert oct(os.stat(tmp_path / "p.sock").st_mode & 0o777) == "0o600"
        deadline = time.time() + 10
        while True:
            kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
            if len(kids) == 3 or time.time() > deadline:
                break
            time.sleep(0.05)
        assert len(kids) == 3
    finally:
        proc.terminate()
        proc.wait(10)
