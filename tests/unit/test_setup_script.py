"""scripts/setup installs packages without their recommends (docker-compose recommends docker.io
and containerd, ~240 MB, while the tests only ask it to validate the compose file)."""

from pathlib import Path

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup"


def test_apt_installs_without_recommends():
    installs = [line for line in SETUP.read_text().splitlines()
                if "apt-get install" in line and not line.lstrip().startswith(("#", "echo"))]
    assert installs and all("--no-install-recommends" in line for line in installs)
