"""Settings from the environment, `.env` and keyword arguments; every bad value is one clear line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fishmp.config import ConfigError, Settings


def test_defaults() -> None:
    s = Settings.from_env({})
    assert (s.multiprocess_mode, s.model_memory_gb, s.precision, s.compile) == ("auto", 8.0, "bfloat16", False)
    assert (s.memory_reserve, s.cpu_workers, s.max_workers, s.devices) == (0.10, 1, None, None)
    assert s.checkpoint_dir == "checkpoints/openaudio-s1-mini" and s.engine == "fish"


def test_environment_values_and_keyword_overrides() -> None:
    env = {"FISH_MULTIPROCESS_MODE": "TRUE", "FISH_MODEL_MEMORY_GB": "6.5", "FISH_COMPILE": "yes",
           "FISH_MAX_WORKERS": "3", "FISH_DEVICES": "0,1", "FISH_PRECISION": "float16"}
    s = Settings.from_env(env, model_memory_gb=7.0)
    assert (s.multiprocess_mode, s.model_memory_gb, s.compile, s.max_workers, s.devices, s.precision) == (
        "true", 7.0, True, 3, "0,1", "float16")


@pytest.mark.parametrize("var,value", [
    ("FISH_MODEL_MEMORY_GB", "abc"), ("FISH_MODEL_MEMORY_GB", "0"), ("FISH_MODEL_MEMORY_GB", "-3"),
    ("FISH_MODEL_MEMORY_GB", "nan"), ("FISH_PRECISION", "fp8"), ("FISH_MULTIPROCESS_MODE", "maybe"),
    ("FISH_MEMORY_RESERVE", "1.5"), ("FISH_CPU_WORKERS", "0"), ("FISH_MAX_WORKERS", "two"), ("FISH_COMPILE", "perhaps"),
    ("FISH_ENGINE", "gpt"),
])
def test_bad_environment_value(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({var: value})
    assert var in str(err.value) and repr(value) in str(err.value)


def test_bad_keyword_value_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="model_memory_gb"):
        Settings(model_memory_gb=0)
    with pytest.raises(ConfigError, match="not a fishmp setting"):
        Settings.from_env({}, model_memory=8)


def run_cli(args: list[str], cwd, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "fishmp", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=60)


@pytest.mark.parametrize("var,value", [("FISH_MODEL_MEMORY_GB", "abc"), ("FISH_MODEL_MEMORY_GB", "0"),
                                       ("FISH_MODEL_MEMORY_GB", "-3"), ("FISH_PRECISION", "fp8")])
def test_cli_bad_value_is_one_line_exit_2(var: str, value: str, tmp_path) -> None:
    out = run_cli(["plan", "--gpus", "24"], tmp_path, {var: value})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and var in lines[0] and value in lines[0]


def test_dotenv_is_loaded_and_environment_wins(tmp_path) -> None:
    (tmp_path / ".env").write_text("FISH_MODEL_MEMORY_GB=6.0\nFISH_MEMORY_RESERVE=0.10\n")
    out = run_cli(["plan", "--gpus", "24", "--json"], tmp_path, {})
    assert json.loads(out.stdout)["workers"] == 3  # from .env
    out = run_cli(["plan", "--gpus", "24", "--json"], tmp_path, {"FISH_MODEL_MEMORY_GB": "8.0"})
    assert json.loads(out.stdout)["workers"] == 2  # the real environment wins


def test_bad_value_in_dotenv_is_reported(tmp_path) -> None:
    (tmp_path / ".env").write_text("FISH_PRECISION=fp8\n")
    out = run_cli(["plan", "--gpus", "24"], tmp_path, {})
    assert out.returncode == 2 and "FISH_PRECISION" in out.stderr and "Traceback" not in out.stderr


def test_library_import_does_not_read_dotenv(tmp_path) -> None:
    (tmp_path / ".env").write_text("FISH_MODEL_MEMORY_GB=6.0\n")
    code = "import fishmp, os; from fishmp.config import Settings; print(os.environ.get('FISH_MODEL_MEMORY_GB'))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.stdout.strip() == "None"


def test_help_explains_every_option(tmp_path) -> None:
    out = run_cli(["--help"], tmp_path, {})
    assert out.returncode == 0 and "plan" in out.stdout and "generate" in out.stdout
    out = run_cli(["plan", "--help"], tmp_path, {})
    assert "--gpus" in out.stdout and "--json" in out.stdout


def test_batch_size_and_output_root() -> None:
    s = Settings.from_env({})
    assert s.batch_size == 1 and s.output_root is None
    s = Settings.from_env({"FISH_BATCH_SIZE": "16", "FISH_OUTPUT_ROOT": "/srv/dub"})
    assert s.batch_size == 16 and s.output_root == "/srv/dub"
    assert Settings.from_env({"FISH_OUTPUT_ROOT": ""}).output_root is None
    for bad in ("0", "257", "-1", "2.5", "many"):
        with pytest.raises(ConfigError, match="FISH_BATCH_SIZE.*1 to 256"):
            Settings.from_env({"FISH_BATCH_SIZE": bad})
    with pytest.raises(ConfigError, match="batch_size"):
        Settings(batch_size=0)
