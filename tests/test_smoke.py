import subprocess
import sys

from controller import __version__


def test_version_command() -> None:
    out = subprocess.run([sys.executable, "-m", "controller", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == f"flux-remote {__version__}"


def test_remote_never_imports_controller() -> None:
    code = ("import sys, remote, remote.plan, remote.__main__; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'controller'], 'controller imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
