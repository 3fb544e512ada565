"""What the Docker tests share: the sandbox image, its user, and this test run's owner label."""
from __future__ import annotations

import os
import uuid

IMAGE = os.environ.get("SELFPROG_SANDBOX_IMAGE", "selfprog-sandbox:latest")
SANDBOX_UID = 10001
# Every container these tests make carries this owner label, so reaping and the
# "nothing left behind" checks never touch containers of other test runs on the engine.
OWNER = f"selfprog-test-{uuid.uuid4().hex[:10]}"


def require_runtime(client, runtime: str) -> None:
    """Skip unless the engine has `runtime` (e.g. runsc, gVisor). Fail instead where it
    should be there: under SELFPROG_REQUIRE_RUNSC=1, and in CI (CI set) when the runsc
    binary is installed (scripts/docker-engine.sh installs it where the package exists and
    registers it with the engine)."""
    import pytest
    import shutil

    if runtime in (client.info().get("Runtimes") or {}):
        return
    if os.environ.get("SELFPROG_REQUIRE_RUNSC") == "1" or (
            runtime == "runsc" and os.environ.get("CI") and shutil.which("runsc")):
        pytest.fail(f"the engine has no {runtime} runtime, but it must (runsc is installed "
                    "here: scripts/docker-engine.sh registers it)")
    pytest.skip(f"the engine has no {runtime} runtime; scripts/docker-engine.sh registers "
                "runsc where the package installs")
