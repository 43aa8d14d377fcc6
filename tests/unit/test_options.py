"""ProfilerOptions: validation before anything reaches async-profiler's command string."""
from __future__ import annotations

import dataclasses
import math

import pytest

import asprof
from asprof import ProfilerOptions


def test_defaults_are_the_seed_command() -> None:
    assert ProfilerOptions().start_command() == (
        "start,event=cpu,interval=100000000,wall=1000ms,jfr,cstack=dwarf,alluser"
    )


def test_values_are_formatted_in_async_profiler_units() -> None:
    o = ProfilerOptions(cpu_interval=0.01, wall_interval=0.1, native_mem="10m", all_user=False)
    assert o.start_command() == (
        "start,event=cpu,interval=10000000,wall=100ms,jfr,cstack=dwarf,nativemem=10485760"
    )
    assert ProfilerOptions(native_mem=0).start_command().endswith(",nativemem=0")
    assert ProfilerOptions(native_mem=4096).native_mem == 4096
    assert ProfilerOptions(native_mem="512K").native_mem == 512 * 1024
    assert "wall=" not in ProfilerOptions(wall_interval=None).start_command()
    assert ",cstack=fp," in ProfilerOptions(cstack="fp").start_command() + ","


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"cpu_interval": 0}, "cpu_interval"),
        ({"cpu_interval": -0.1}, "cpu_interval"),
        ({"cpu_interval": math.nan}, "cpu_interval"),
        ({"cpu_interval": math.inf}, "cpu_interval"),
        ({"cpu_interval": "10ms"}, "cpu_interval"),
        ({"cpu_interval": "1,file=/etc/passwd"}, "cpu_interval"),
        ({"cpu_interval": True}, "cpu_interval"),
        ({"cpu_interval": 1e-9}, "cpu_interval"),
        ({"cpu_interval": 7200}, "cpu_interval"),
        ({"wall_interval": 0}, "wall_interval"),
        ({"wall_interval": -1}, "wall_interval"),
        ({"wall_interval": "1s"}, "wall_interval"),
        ({"wall_interval": 0.0001}, "wall_interval"),
        ({"native_mem": -1}, "native_mem"),
        ({"native_mem": "10m,file=/tmp/x"}, "native_mem"),
        ({"native_mem": "10m\n"}, "native_mem"),
        ({"native_mem": "10=m"}, "native_mem"),
        ({"native_mem": "1\x00"}, "native_mem"),
        ({"native_mem": "ten"}, "native_mem"),
        ({"native_mem": "10t"}, "native_mem"),
        ({"native_mem": 1.5}, "native_mem"),
        ({"native_mem": True}, "native_mem"),
        ({"all_user": "yes"}, "all_user"),
        ({"cstack": "dwarf,file=/x"}, "cstack"),
        ({"cstack": "vm"}, "cstack"),
        ({"force_native_mem": 1}, "force_native_mem"),
    ],
)
def test_invalid_values_are_refused_naming_the_option(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ProfilerOptions(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"reporting_interval": 0}, "reporting_interval"),
        ({"reporting_interval": -5}, "reporting_interval"),
        ({"reporting_interval": math.nan}, "reporting_interval"),
        ({"reporting_interval": "30"}, "reporting_interval"),
        ({"reporting_interval": 0.01}, "reporting_interval"),
    ],
)
def test_invalid_profiler_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        asprof.Profiler(**kwargs)


def test_wrong_types_are_refused() -> None:
    with pytest.raises(TypeError, match="reporter"):
        asprof.Profiler(reporter="/tmp/profiles")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="options"):
        asprof.Profiler(options={"cpu_interval": 0.01})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="agent_metadata"):
        asprof.Profiler(agent_metadata={"region": "x"})  # type: ignore[arg-type]


def test_options_are_immutable() -> None:
    o = ProfilerOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.cpu_interval = 1.0  # type: ignore[misc]
