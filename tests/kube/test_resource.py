"""The EmbeddingJob resource as a real API server sees it: the CRD, examples, refusals, columns."""

from __future__ import annotations

import pytest
from conftest import REPO
from envtest import ControlPlane

from embedjob.crd import CRD_PATHS


@pytest.mark.parametrize("rel", CRD_PATHS)
def test_server_accepts_the_crd(control_plane: ControlPlane, rel: str) -> None:
    """Both committed copies pass the server's own checks (defaults against CEL rules...)."""
    done = control_plane.kubectl("apply", "--server-side", "--force-conflicts",
                                 "-f", str(REPO / rel), check=False)
    assert done.returncode == 0, f"the server refuses {rel}: {done.stderr.strip()}"
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                          "crd/embeddingjobs.embedjob.io")
