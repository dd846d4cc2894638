"""``stratovirt-pool``: a warm interpreter that forks VM processes for ``stratovirt``."""
