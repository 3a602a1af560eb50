"""ctr.training.synapseml without Spark: jar lookup and its error, network parameters, free port bases."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

import pytest
from ctr.training.synapseml import (
    LIGHTGBM_COORDINATES,
    REQUIRED_JARS,
    SynapseMLSetupError,
    free_port_base,
    jars_dir,
    require_jars,
    synapseml_params,
)
from ctr.training.trainer import TrainConfig


def test_jars_dir_defaults_to_the_venv_and_can_be_pointed_elsewhere(tmp_path: Path):
    import sys

    assert jars_dir({}) == Path(sys.prefix) / "share" / "ctr" / "jars"
    assert jars_dir({"CTR_SPARK_JARS_DIR": str(tmp_path)}) == tmp_path


def test_missing_jars_name_each_missing_coordinate(tmp_path: Path):
    env = {"CTR_SPARK_JARS_DIR": str(tmp_path)}
    with pytest.raises(SynapseMLSetupError) as e:
        require_jars(env)
    msg = str(e.value)
    assert "\n" not in msg and all(c in msg for c in REQUIRED_JARS) and str(tmp_path) in msg
    for name in REQUIRED_JARS.values():
        (tmp_path / name).write_bytes(b"PK")
    (tmp_path / "hadoop-azure-3.3.4.jar").write_bytes(b"PK")
    (tmp_path / REQUIRED_JARS[LIGHTGBM_COORDINATES]).unlink()
    with pytest.raises(SynapseMLSetupError, match=LIGHTGBM_COORDINATES) as e:
        require_jars(env)
    assert "lightgbmlib" not in str(e.value)  # only what is missing
    (tmp_path / REQUIRED_JARS[LIGHTGBM_COORDINATES]).write_bytes(b"PK")
    jars = require_jars(env)
    assert len(jars) == len(REQUIRED_JARS) + 1 and jars == sorted(jars)


def test_network_parameters_reach_the_classifier():
    cfg = TrainConfig(start=dt.date(2026, 11, 1), end=dt.date(2026, 11, 3), seed=7)
    kw = synapseml_params(cfg, executor_cores=4, num_tasks=3, listen_port=31000, timeout=45)
    assert kw["numTasks"] == 3 and kw["defaultListenPort"] == 31000 and kw["timeout"] == 45.0
    assert kw["useBarrierExecutionMode"] is True and kw["dataTransferMode"] == "bulk" and kw["numThreads"] == 3
    assert "numTasks" not in synapseml_params(cfg, executor_cores=4)


def test_free_port_base_finds_a_free_run_of_ports_and_skips_busy_ones():
    bases = {free_port_base(4) for _ in range(5)}
    assert len(bases) > 1  # per job, not one fixed base two jobs would share
    base = free_port_base(4)
    socks = []
    try:
        for port in range(base, base + 4):  # each port of the run really is free now
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", port))
            s.listen()
        with pytest.raises(SynapseMLSetupError, match="no 4 consecutive free ports"):
            free_port_base(4, start=base, stop=base + 5)  # the only candidate base is busy
    finally:
        for s in socks:
            s.close()


def test_spark_and_synapseml_settings_come_from_the_one_parser_and_name_a_bad_variable():
    from ctr.settings import SparkConfigError, SparkSettings, SynapseMLSettings

    s = SparkSettings.from_env({"CTR_SPARK_MASTER": "spark://h:7077", "CTR_SPARK_CONF": " a.b = 1 ;c=x=y;; "})
    assert s.master == "spark://h:7077" and s.driver_memory == "2g" and s.conf_pairs() == {"a.b": "1", "c": "x=y"}
    assert SynapseMLSettings.from_env({"CTR_SYNAPSEML_TIMEOUT": "60"}) == SynapseMLSettings(timeout=60.0, listen_port=0)
    # a malformed entry used to be skipped without a word; now the run fails naming it
    with pytest.raises(SparkConfigError, match="CTR_SPARK_CONF entry 'spark.executor.cores' is not k=v"):
        SparkSettings.from_env({"CTR_SPARK_CONF": "spark.executor.memory=1g;spark.executor.cores"})
    with pytest.raises(SparkConfigError, match="CTR_SYNAPSEML_LISTEN_PORT='x' is not an integer"):
        SynapseMLSettings.from_env({"CTR_SYNAPSEML_LISTEN_PORT": "x"})
    with pytest.raises(SparkConfigError, match="CTR_SYNAPSEML_TIMEOUT=0.0 must be > 0"):
        SynapseMLSettings.from_env({"CTR_SYNAPSEML_TIMEOUT": "0"})
