"""Launch scripts: the commands they print or run, and their usage errors. Nothing is launched.

gcloud, git, sbatch, srun and scontrol are replaced by stubs on PATH that record their arguments.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))

import gpu_host  # noqa: E402
import slurm  # noqa: E402
import tpu_vm  # noqa: E402

TPU_ARGS = ["--tpu=vq-pod", "--zone=us-central2-b", "--accelerator-type=v4-32",
            "--config=configs/tiny.py", "--workdir=gs://bucket/runs/tiny"]
SLURM_ARGS = ["--nodes=2", "--gpus-per-node=4", "--partition=gpu", "--config=configs/tiny.py",
              "--workdir=/shared/runs/tiny"]


def dry_run(script, argv, capsys) -> list[str]:
  script.main(["--dry-run", *argv])
  return capsys.readouterr().out.splitlines()


def usage_error(script, argv, capsys) -> str:
  with pytest.raises(SystemExit) as exit_info:
    script.main(argv)
  assert exit_info.value.code == 2
  error = capsys.readouterr().err
  assert error.startswith("usage: ")
  return error


def write_stub(directory: Path, name: str, log: Path, body: str = "") -> None:
  """An executable ``name`` that appends its arguments (one shell-quoted line) to ``log``."""
  stub = directory / name
  stub.write_text(f'#!/bin/bash\nprintf "%q " {name} "$@" >> {log}\necho >> {log}\n{body}')
  stub.chmod(0o755)


def test_tpu_dry_run_creates_copies_installs_and_trains_on_all_workers(capsys):
  lines = dry_run(tpu_vm, [*TPU_ARGS, "--", "--mode=train_vqgan"], capsys)
  commands = [shlex.split(line) for line in lines]
  assert commands[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "vq-pod",
                         "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
                         "--zone=us-central2-b"]
  assert commands[1][:3] == ["git", "-C", str(REPO)] and commands[1][-1] == "HEAD"
  archive = commands[1][-2].removeprefix("--output=")
  assert commands[2] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
                         "vq-pod:vqvdm_jax.tar.gz", "--zone=us-central2-b", "--worker=all"]
  install, train = commands[3], commands[4]
  for command in (install, train):
    assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vq-pod"]
    assert "--worker=all" in command and command[-2] == "--command"
  assert "tar -xzf vqvdm_jax.tar.gz" in install[-1] and '"jax[tpu]"' in install[-1]
  assert train[-1] == ("cd ~/vqvdm_jax && python3 -m vqvdm_jax.main --config=configs/tiny.py "
                       "--workdir=gs://bucket/runs/tiny --mode=train_vqgan")
  assert len(commands) == 5


def test_tpu_clone_spot_and_runtime_version_follow_the_arguments(capsys):
  argv = [arg for arg in TPU_ARGS if not arg.startswith("--accelerator-type")]
  lines = dry_run(tpu_vm, [*argv, "--accelerator-type=v5litepod-16", "--spot", "--project=p1",
                           "--repo-url=https://example.com/vqvdm_jax.git", "--branch=v1",
                           "--detach"], capsys)
  assert lines[0].endswith("--version=v2-alpha-tpuv5-lite --zone=us-central2-b --project=p1 "
                           "--spot")
  assert not any(line.startswith("git ") or " scp " in line for line in lines)
  install, train = (shlex.split(line)[-1] for line in lines[1:])
  assert "git clone --depth=1 --branch=v1 https://example.com/vqvdm_jax.git ~/vqvdm_jax" in install
  assert train.startswith("cd ~/vqvdm_jax && nohup python3 -m vqvdm_jax.main ")
  assert train.endswith("> ~/vqvdm_jax.log 2>&1 &")


def test_tpu_skip_create_resumes_on_an_existing_vm(capsys):
  lines = dry_run(tpu_vm, [*TPU_ARGS, "--skip-create"], capsys)
  assert not any(" create " in line for line in lines)


def test_tpu_without_dry_run_runs_the_printed_commands_in_order(tmp_path, monkeypatch, capsys):
  log = tmp_path / "calls.log"
  for name in ("gcloud", "git"):
    write_stub(tmp_path, name, log)
  monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
  printed = dry_run(tpu_vm, TPU_ARGS, capsys)
  tpu_vm.main(TPU_ARGS)
  ran = [shlex.split(line) for line in log.read_text().splitlines()]
  assert ran == [shlex.split(line) for line in printed]


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: --config, --workdir, --tpu, --zone"),
    ([*TPU_ARGS[:-1], "--workdir=/tmp/run"], "must be a Cloud Storage path"),
    ([*TPU_ARGS[:-2], "--config=configs/missing.py", TPU_ARGS[-1]], "does not exist"),
    ([*TPU_ARGS[:-2], "--config=configs/tiny", TPU_ARGS[-1]], "must name a config file"),
    ([*TPU_ARGS, "--accelerator-type=tpu8"], "is not a TPU type"),
    ([*TPU_ARGS, "--branch=main"], "--branch needs --repo-url"),
    ([*TPU_ARGS, "--", "train"], "is not a flag"),
    ([*TPU_ARGS, "--", "--workdir=gs://other"], "give --workdir before the --"),
])
def test_tpu_bad_arguments_fail_with_a_usage_message(argv, message, capsys):
  assert message in usage_error(tpu_vm, argv, capsys)


def test_gpu_host_dry_run_prints_install_and_training_on_the_chosen_gpus(capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  lines = dry_run(gpu_host, ["--config=configs/tiny.py:x", "--workdir=workdirs/tiny",
                             "--gpus=2,3", "--install", "--python=/opt/py/bin/python", "--",
                             "--mode=sample"], capsys)
  assert lines == [
      f"/opt/py/bin/python -m pip install -e {REPO} 'jax[cuda12]'",
      "CUDA_VISIBLE_DEVICES=2,3 /opt/py/bin/python -m vqvdm_jax.main "
      "--config=configs/tiny.py:x --workdir=workdirs/tiny --mode=sample"]


def test_gpu_host_without_gpus_uses_every_visible_gpu(capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  lines = dry_run(gpu_host, ["--config=configs/tiny.py", "--workdir=w", "--python=python"],
                  capsys)
  assert lines == ["python -m vqvdm_jax.main --config=configs/tiny.py --workdir=w"]


@pytest.mark.parametrize("argv, message", [
    (["--workdir=w"], "the following arguments are required: --config"),
    (["--config=configs/tiny.py", "--workdir=w", "--gpus=0,a"], "comma-separated GPU indices"),
    (["--config=configs/tiny.py", "--workdir=w", "--gpus=1,1"], "names a GPU twice"),
    (["--config=configs/none.py", "--workdir=w"], "does not exist"),
])
def test_gpu_host_bad_arguments_fail_with_a_usage_message(argv, message, capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  assert message in usage_error(gpu_host, argv, capsys)


def test_slurm_dry_run_prints_the_sbatch_script_as_a_heredoc(capsys):
  lines = dry_run(slurm, [*SLURM_ARGS, "--requeue", "--", "--mode=train_diffusion"], capsys)
  assert lines[0] == "sbatch <<'EOF'" and lines[-1] == "EOF"
  script = "\n".join(lines[1:-1])
  for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=gpu",
                    "--time=24:00:00", "--signal=TERM@120", "--requeue"):
    assert f"#SBATCH {directive}\n" in script
  assert f"cd {REPO}\n" in script
  assert "srun " in script and "--account" not in script


def test_slurm_job_gives_each_node_coordinator_process_count_and_id(tmp_path, capsys):
  """Runs the generated batch script with stub srun/scontrol/python: what each task receives."""
  log = tmp_path / "calls.log"
  write_stub(tmp_path, "scontrol", log, "printf 'gpu-node-7\\ngpu-node-8\\n'\n")
  # Like srun: run the command once per task, each with its own SLURM_PROCID.
  write_stub(tmp_path, "srun", log, 'shift 3\nfor id in 0 1; do SLURM_PROCID=$id "$@"; done\n')
  write_stub(tmp_path, "python", log)
  lines = dry_run(slurm, [*SLURM_ARGS, f"--python={tmp_path / 'python'}", "--port=4000"], capsys)
  script = tmp_path / "job.sbatch"
  script.write_text("\n".join(lines[1:-1]) + "\n")
  env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
         "SLURM_JOB_NODELIST": "gpu-node-[7-8]", "SLURM_NNODES": "2", "SLURM_NTASKS": "2"}
  subprocess.run(["bash", str(script)], env=env, check=True, cwd=tmp_path)
  calls = [shlex.split(line) for line in log.read_text().splitlines()]
  assert calls[0] == ["scontrol", "show", "hostnames", "gpu-node-[7-8]"]
  assert calls[1][:4] == ["srun", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  for process_id, call in enumerate(calls[2:]):
    assert call == ["python", "-m", "vqvdm_jax.main", "--config=configs/tiny.py",
                    "--workdir=/shared/runs/tiny", "--coordinator_address=gpu-node-7:4000",
                    "--num_processes=2", f"--process_id={process_id}"]
  assert len(calls) == 4


def test_slurm_auto_leaves_distributed_settings_to_jax(capsys):
  script = "\n".join(dry_run(slurm, [*SLURM_ARGS, "--distributed=auto"], capsys))
  assert "--coordinator_address" not in script and "--process_id" not in script
  assert "exec python -m vqvdm_jax.main --config=configs/tiny.py" in script


@pytest.mark.parametrize("argv, message", [
    (["--config=configs/tiny.py", "--workdir=/w"], "the following arguments are required: --nodes"),
    ([*SLURM_ARGS, "--nodes=0"], "is not a whole number >= 1"),
    ([*SLURM_ARGS[:-1], "--workdir=runs/tiny"], "must be an absolute path"),
    ([*SLURM_ARGS, "--time=1day"], "is not a SLURM time limit"),
    ([*SLURM_ARGS, "--repo-dir=/nonexistent"], "is not a vqvdm_jax checkout"),
    ([*SLURM_ARGS, "--port=70000"], "is not a TCP port"),
])
def test_slurm_bad_arguments_fail_with_a_usage_message(argv, message, capsys):
  assert message in usage_error(slurm, argv, capsys)


@pytest.mark.parametrize("script", ["tpu_vm.py", "gpu_host.py", "slurm.py"])
def test_scripts_run_from_the_command_line_and_print_usage_without_arguments(script):
  result = subprocess.run([sys.executable, str(REPO / "launch" / script)], capture_output=True,
                          text=True, cwd=REPO, check=False)
  assert result.returncode == 2
  assert result.stderr.startswith(f"usage: launch/{script}")
  assert "required" in result.stderr
