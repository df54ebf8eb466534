"""The command line as a user meets it: --version, help texts, one-line errors on stderr with exit 2 for
what the user got wrong, and `visionflow run` working outside the repository."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import COMMANDS, main

BIN = Path(sys.executable).with_name("visionflow")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("visionflow ")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_texts_are_for_users(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "PydanticUndefined" not in text and "``" not in text and "usage: visionflow" in text


def test_a_refused_input_is_one_line_on_stderr_with_exit_2(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--data", str(tmp_path), "--no-dashboard",
                 "--address", "local"]) in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("visionflow eval: ") for line in err), err
    assert "Traceback" not in "\n".join(err)


def test_run_outside_the_repository_uses_the_packaged_quickstart(tmp_path):
    r = subprocess.run([str(BIN), "run", "--plan", "--plan-png", str(tmp_path / "p.png")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train/resnet18" in r.stdout and (tmp_path / "p.png").exists()
