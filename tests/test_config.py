"""Settings from the environment, `.env` and keyword arguments; every bad value is one clear line and exit 2."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from fishmp.config import ConfigError, Settings, warn_unknown_variables


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def fishmp_log() -> Iterator[list[str]]:
    """Messages logged to the "fishmp" logger during the test (attached directly: the CLI turns propagation off)."""
    handler = _Lines()
    logger = logging.getLogger("fishmp")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


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


@pytest.mark.parametrize("value", ["1e-5", "1e-320", "inf", "-inf", "nan", "0.4", "1025", "1e308"])
def test_model_memory_outside_a_plausible_range(value: str) -> None:
    with pytest.raises(ConfigError, match=r"FISH_MODEL_MEMORY_GB.*from 0\.5 to 1024"):
        Settings.from_env({"FISH_MODEL_MEMORY_GB": value})
    with pytest.raises(ConfigError, match="model_memory_gb"):
        Settings(model_memory_gb=float(value))


def test_model_memory_range_ends_are_allowed() -> None:
    assert Settings.from_env({"FISH_MODEL_MEMORY_GB": "0.5"}).model_memory_gb == 0.5
    assert Settings.from_env({"FISH_MODEL_MEMORY_GB": "1024"}).model_memory_gb == 1024


@pytest.mark.parametrize("value", ["1e-5", "1e-6", "1e-320"])
def test_cli_tiny_model_memory_is_exit_2_at_once(value: str, tmp_path) -> None:
    out = run_cli(["plan", "--gpus", "24"], tmp_path, {"FISH_MODEL_MEMORY_GB": value})
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "0.5 to 1024" in lines[0] and "Traceback" not in out.stderr


@pytest.mark.parametrize("var,value,says", [("FISH_MAX_WORKERS", "0", "empty: no cap"),
                                            ("FISH_MAX_SEQ_LEN", "0", "empty: the checkpoint's")])
def test_zero_is_not_a_silent_no_cap(var: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=f"{var}='0'.*{says}"):
        Settings.from_env({var: value})
    field = var[len("FISH_"):].lower()
    assert getattr(Settings.from_env({var: ""}), field) is None


def test_unknown_fish_variable_warns_with_the_closest_name(fishmp_log) -> None:
    s = Settings.from_env({"FISH_MODEL_MEMORY_GBB": "6", "FISH_PRECISSION": "float16", "FISH_ZZZ_TOTALLY_ELSE": "1",
                           "FISH_SYNTHETIC_LOAD_S": "1", "FISH_BATCH_REFILL": "0", "OTHER": "x"})
    assert s.model_memory_gb == 8.0  # ignored, not guessed
    assert len(fishmp_log) == 3
    gbb, prec, other = fishmp_log  # in name order
    assert "FISH_MODEL_MEMORY_GBB is not a fishmp setting" in gbb and "did you mean FISH_MODEL_MEMORY_GB?" in gbb
    assert "did you mean FISH_PRECISION?" in prec and "FISH_ZZZ_TOTALLY_ELSE" in other and "\n" not in other
    Settings.from_env({"FISH_MODEL_MEMORY_GBB": "6"})  # once per process, not once per Settings
    assert len(fishmp_log) == 3
    assert warn_unknown_variables({"FISH_SYNTHETIC_ANYTHING": "1", "FISH_COMPILE": "1"}) == []


def test_cli_warns_about_a_typo_in_dotenv(tmp_path) -> None:
    (tmp_path / ".env").write_text("FISH_MODEL_MEMORY_GBB=6.0\n")
    out = run_cli(["plan", "--gpus", "24", "--json"], tmp_path, {})
    assert out.returncode == 0 and json.loads(out.stdout)["workers"] == 2
    assert "FISH_MODEL_MEMORY_GBB" in out.stderr and "did you mean FISH_MODEL_MEMORY_GB?" in out.stderr


@pytest.mark.parametrize("content,says", [
    (b'FISH_PRECISION=float16\nFISH_MODEL_MEMORY_GB="abc\n', "line 2 cannot be parsed"),
    (b"export FISH_MODEL_MEMORY_GB='6\n", "line 1 cannot be parsed"),
    ("FISH_MODEL_MEMORY_GB=6.0\n".encode("utf-16"), "not UTF-8 text"),
    (bytes(range(256)), "not UTF-8 text"),
    (b"FISH_MODEL_MEMORY_GB=6.0\x00\n", "not UTF-8 text"),
])
def test_cli_unusable_dotenv_is_exit_2_one_line(tmp_path, content: bytes, says: str) -> None:
    (tmp_path / ".env").write_bytes(content)
    out = run_cli(["plan", "--gpus", "24"], tmp_path, {})
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(lines) == 1 and says in lines[0] and ".env" in lines[0]


def test_dotenv_broken_line_of_another_program_is_not_fishmps_business(tmp_path) -> None:
    (tmp_path / ".env").write_text('OTHER_APP="unterminated\nFISH_MODEL_MEMORY_GB=6.0\n')
    out = run_cli(["plan", "--gpus", "24", "--json"], tmp_path, {})
    assert out.returncode == 0 and "Traceback" not in out.stderr


def test_dotenv_utf8_bom_is_fine(tmp_path) -> None:
    (tmp_path / ".env").write_bytes("FISH_MODEL_MEMORY_GB=6.0\n".encode("utf-8-sig"))
    out = run_cli(["plan", "--gpus", "24", "--json"], tmp_path, {})
    assert out.returncode == 0 and json.loads(out.stdout)["workers"] == 3


def test_dotenv_of_a_parent_directory_is_not_loaded(tmp_path) -> None:
    (tmp_path / ".env").write_text("FISH_MODEL_MEMORY_GB=6.0\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    out = run_cli(["plan", "--gpus", "24", "--json"], sub, {})
    assert out.returncode == 0 and json.loads(out.stdout)["workers"] == 2  # the default 8.0, not the parent's 6.0
