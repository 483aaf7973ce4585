"""The wheel a user installs: the package, both integrations and the shipped cold-start profile."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVE = """
import json, adaskip_rag, langchain_adaskip, llama_index.llms.adaskip
from adaskip_rag import AdaSkipEngine
engine = AdaSkipEngine.from_pretrained("default")
stats = engine.generate("What is the capital of France?", collection="cold", max_new_tokens=4).stats
print(json.dumps({"package": adaskip_rag.__file__, "source": stats.profile_source, "mode": stats.mode}))
"""


@pytest.mark.slow
def test_a_wheel_installed_without_the_source_tree_ships_the_cold_start_profile(tmp_path):
    """The repository keeps the shipped profiles top-level, in ``profiles/``; the wheel maps them into the package."""
    assert (ROOT / "profiles" / "SmolLM2-135M-Instruct.json").is_file() and not (
        ROOT / "adaskip_rag" / "profiles"
    ).exists()
    source, wheels = tmp_path / "source", tmp_path / "wheels"
    # a clean copy of the sources: no build folder of an earlier run can stand in for the package data
    skip = shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "results", ".cache"
    )
    shutil.copytree(ROOT, source, ignore=skip)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
        ],
        check=True,
        cwd=tmp_path,
        timeout=600,
    )
    [wheel] = wheels.glob("adaskip_rag-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True, timeout=300
    )
    # the dependencies come from this environment's site-packages as a plain path entry: its .pth files (the
    # editable install of the source tree among them) are not processed there
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"], "ADASKIP_PROFILE_DB": str(tmp_path / "p.db")}
    env.pop("ADASKIP_PROFILES", None)
    run = subprocess.run([python, "-c", SERVE], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    served = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(served["package"]).is_relative_to(venv) and not Path(served["package"]).is_relative_to(ROOT)
    assert (served["source"], served["mode"]) == ("shipped", "skip")  # the shipped profile plans a cold collection
