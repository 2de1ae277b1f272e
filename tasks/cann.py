"""Where CANN's environment script lives: ``ascend-toolkit/`` until CANN 8.5, ``cann/`` from it.

Named in every line that tells a user to set CANN up; nothing here imports torch, so
``runner doctor`` can use it on a host that has only the Ascend packages.
"""
from __future__ import annotations

SET_ENV_SCRIPTS = ("/usr/local/Ascend/ascend-toolkit/set_env.sh", "/usr/local/Ascend/cann/set_env.sh")
SET_ENV = f"{SET_ENV_SCRIPTS[0]} (or {SET_ENV_SCRIPTS[1]} on CANN 8.5+)"
