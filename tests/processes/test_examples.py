"""The examples: their rewards, the code sandbox (real child processes), and one end-to-end example run."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from actors.rewards import load_prompt_records
from actors.sandbox import SandboxLimits, isolation, run_python_tests
from examples.code_generation import CodeGenerationTrainer, code_reward, extract_code
from examples.dialogue import DialogueTrainer, dialogue_reward
from examples.summarization import SummarizationTrainer, summary_reward

ROOT = Path(__file__).resolve().parents[2]
LIMITS = SandboxLimits(wall_s=3.0, cpu_s=1, memory_mb=256, output_kb=64)
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_correct_code_passes_and_wrong_code_fails():
    good = run_python_tests(ADD, ADD_TESTS, LIMITS)
    assert good.passed and good.returncode == 0 and not good.timed_out
    wrong = run_python_tests(ADD.replace("+", "-"), ADD_TESTS, LIMITS)
    assert not wrong.passed and wrong.results == [{"value": -1}, {"value": -2}]
    assert not run_python_tests("def add(a, b:\n", ADD_TESTS, LIMITS).passed  # a syntax error
    for path in (good.workdir, wrong.workdir):
        assert not os.path.exists(path)  # the scratch folder is gone


@pytest.mark.parametrize(
    "code",
    [
        "import sys\nsys.exit(0)\n",  # leaving before the tests is not a pass, even with code 0
        "import os\nos._exit(0)\n",
    ],
)
def test_exiting_early_is_not_a_pass(code):
    result = run_python_tests(code + ADD, ADD_TESTS, LIMITS)
    assert not result.passed


def test_an_endless_loop_is_stopped_by_the_cpu_limit():
    start = time.monotonic()
    result = run_python_tests("while True:\n    pass\n", "", LIMITS)
    assert not result.passed and not result.timed_out and result.returncode < 0  # killed by SIGXCPU/SIGKILL
    assert time.monotonic() - start < LIMITS.wall_s


def test_a_sleeper_is_stopped_by_the_wall_clock():
    start = time.monotonic()
    result = run_python_tests("import time\ntime.sleep(60)\n", "", SandboxLimits(wall_s=1.0))
    assert result.timed_out and not result.passed and result.returncode is None
    assert time.monotonic() - start < 5
    assert not os.path.exists(result.workdir)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux")
def test_a_memory_bomb_fails_inside_its_limit():
    result = run_python_tests("x = bytearray(2 ** 33)\n", "", LIMITS)
    assert not result.passed and "MemoryError" in result.output


@pytest.mark.parametrize(
    "code,blocked",
    [
        (
            "import os\ntry:\n    os.system('touch /tmp/sandbox-was-here')\nexcept BaseException:\n    pass\n",
            "os.system",
        ),
        ("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", "socket."),
        ("import subprocess\nsubprocess.run(['true'])\n", "subprocess.Popen"),
        ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", "os.kill"),  # the actor survives
    ],
)
def test_shell_network_and_process_calls_end_the_child(code, blocked):
    result = run_python_tests(code + ADD, ADD_TESTS, LIMITS)
    assert not result.passed and result.blocked.startswith(blocked)
    assert not os.path.exists("/tmp/sandbox-was-here")


def test_files_stay_in_the_scratch_folder(tmp_path):
    outside = tmp_path / "escaped.txt"
    result = run_python_tests(f"open({str(outside)!r}, 'w').write('x')\n", "", LIMITS)
    assert (
        not result.passed and not outside.exists()
    )  # blocked by the hook, or not there in bubblewrap's view
    # Inside it anything goes, even a read-only folder tree: it is removed all the same.
    inside = "import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\nos.chmod('a', 0o500)\n"
    result = run_python_tests(inside, "", LIMITS)
    assert result.passed and not os.path.exists(result.workdir)


def test_the_isolation_is_the_strongest_this_machine_has():
    import shutil

    expected = "bwrap" if sys.platform.startswith("linux") and shutil.which("bwrap") else isolation()
    assert isolation() in ("bwrap", "sandbox-exec", "audit-hook") and isolation() == expected


def test_code_reward_extracts_fenced_code_and_scores_a_batch():
    fenced = f"Here you go:\n```python\n{ADD}```\nThis adds."
    assert extract_code(fenced) == ADD and extract_code(ADD) == ADD
    scores = code_reward(
        ["p"] * 4, [fenced, ADD.replace("+", "*"), "raise SystemExit(0)", ADD], [ADD_TESTS] * 3 + [None]
    )
    assert scores == [1.0, 0.0, 0.0, 0.0]  # no tests: nothing to pass


def test_example_data_and_rewards_fit_together():
    prompts, extras = load_prompt_records(str(ROOT / "examples" / "data" / "summarization.jsonl"))
    assert len(prompts) == 30 and all(extras[p]["passage"] in p for p in prompts)
    passage = extras[prompts[0]]["passage"]
    grounded = "The council will turn the old railway yard into a public park with paths and a lake."
    assert summary_reward(prompts[0], grounded, passage, 25) > summary_reward(
        prompts[0], passage, passage, 25
    )
    assert summary_reward(prompts[0], "Penguins like snow.", passage, 25) == 0.0
    request = "I lost my wallet on the bus this morning. What should I do?"
    helpful = "I'm sorry to hear that. Please call the bus company and ask whether anyone found your wallet."
    assert dialogue_reward(request, helpful) > dialogue_reward(request, "Penguins cannot fly.") > 0
    assert dialogue_reward(request, "Whatever, not my problem. Go away!") < 0
    code_prompts, code_extras = load_prompt_records(str(ROOT / "examples" / "data" / "code.jsonl"))
    assert len(code_prompts) >= 20 and all("assert" in code_extras[p]["tests"] for p in code_prompts)


def test_trainers_build_launcher_commands(tmp_path):
    trainer = DialogueTrainer(model="tiny", run_dir=tmp_path, reward_model=tmp_path / "rm")
    command = trainer.command("/data/d.jsonl", 3)
    assert command[1] == str(ROOT / "launch.py") and "--config" in command
    reward_model = f"rm:{tmp_path / 'rm'}"
    assert f"run.reward={json.dumps(reward_model)}" in command
    assert DialogueTrainer.reward == "examples.dialogue:dialogue_reward"  # the class default is untouched
    # One epoch of 30 passages at 16 / 4 = 4 prompts an update.
    summarization = SummarizationTrainer()
    assert summarization.updates_for(summarization.prompts_spec(None), num_epochs=1) == 8
    assert summarization.prompts_spec("hf:cnn_dailymail:test:article") == "hf:cnn_dailymail:test:article"


def test_code_generation_example_runs_end_to_end(model_cache, tmp_path):
    run_dir = tmp_path / "run"
    small = ["sampling.batch_size=4", "sampling.max_new_tokens=16", "ppo.batch_size=4", "ppo.group_size=2"]
    small += ["ppo.micro_batch_size=4", "lora.rank=4"]
    small += ["ppo.dynamic_sampling=false"]  # the random model never passes a test: every group scores 0
    argv = ["--model", "tiny", "--max-updates", "2", "--run-dir", str(run_dir)]
    argv += [arg for s in [*small, f'model.cache_dir="{model_cache}"'] for arg in ("--set", s)]
    log = tmp_path / "run.log"
    # Not a TMPDIR of its own for the run: MLX keeps its compiled CPU kernels there (a fresh one costs ~30 s).
    scratch_before = set(Path(tempfile.gettempdir()).glob("mlx-ppo-sandbox-*"))
    with log.open("w") as out:  # a file, not a pipe: a full pipe would block the run
        proc = subprocess.run(
            [sys.executable, "-m", "examples.code_generation", *argv],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=240,
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0.0 <= r["rollout/score_mean"] <= 1.0 for r in rows)
    assert "reward examples.code_generation:code_reward" in text
    assert set(Path(tempfile.gettempdir()).glob("mlx-ppo-sandbox-*")) <= scratch_before  # all removed
    assert (
        CodeGenerationTrainer.reward in (ROOT / "examples" / "configs" / "code_generation.toml").read_text()
    )
