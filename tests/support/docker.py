"""What the Docker tests share: the sandbox image, its user, and this test run's owner label."""
from __future__ import annotations

import os
import uuid

IMAGE = os.environ.get("SELFPROG_SANDBOX_IMAGE", "selfprog-sandbox:latest")
SANDBOX_UID = 10001
# Every container these tests make carries this owner label, so reaping and the
# "nothing left behind" checks never touch containers of other test runs on the engine.
OWNER = f"selfprog-test-{uuid.uuid4().hex[:10]}"
